"""PNG plots of a run and of a comparison (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedbabu.results.paired import PairedDifference


def _save(fig: plt.Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _label_columns(ax: plt.Axes, labels: Sequence[str]) -> None:
    """One x tick per column, slanted when the labels would overlap upright."""
    crowded = len(labels) > 4 or max((len(label) for label in labels), default=0) > 12
    ax.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")


def plot_rounds(metrics: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Mean training loss per round, and the global model's accuracy where it was evaluated."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    rounds = [m["round"] for m in metrics]
    ax_loss.plot(rounds, [m["train_loss"] for m in metrics], color="tab:red")
    ax_loss.set(xlabel="round", ylabel="mean train loss", title="training loss")
    evaluated = [m for m in metrics if "test_accuracy" in m]
    ax_acc.plot([m["round"] for m in evaluated], [100 * m["test_accuracy"] for m in evaluated], marker="o")
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="global model on client test sets")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def plot_clients(curves: np.ndarray, path: Path, title: str) -> None:
    """Initial vs personalized accuracy for every client, sorted by personalized accuracy."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    order = np.argsort(curves[:, -1], kind="stable")
    x = np.arange(len(order))
    ax.bar(x - 0.2, 100 * curves[order, 0], width=0.4, label="initial")
    ax.bar(x + 0.2, 100 * curves[order, -1], width=0.4, label="personalized")
    ax.set(xlabel="client (sorted by personalized accuracy)", ylabel="accuracy (%)", title=title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_finetune_curves(curves: dict[str, np.ndarray], path: Path, title: str,
                         xlabel: str = "fine-tuning epochs") -> None:
    """Mean (+- std over clients) accuracy after each fine-tuning epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (label, curve) in enumerate(curves.items()):
        epochs = np.arange(curve.shape[1])
        mean, std = 100 * np.nanmean(curve, axis=0), 100 * np.nanstd(curve, axis=0)
        ax.plot(epochs, mean, marker="os^"[index // 10 % 3], linestyle=("-", "--", ":")[index // 10 % 3], label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_comparison(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars: initial and personalized accuracy (mean +- std) per algorithm."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.2, "initial", "initial"), (0.2, "personalized", "personalized")):
        ax.bar(x + offset, [100 * r[f"{key}_mean"] for r in rows], width=0.4,
               yerr=[100 * r[f"{key}_std"] for r in rows], capsize=3, label=label)
    _label_columns(ax, [r["algorithm"] for r in rows])
    ax.set(ylabel="accuracy (%)", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_paired_differences(pairs: dict[str, Sequence[PairedDifference]], path: Path, title: str) -> None:
    """Per cell, each seed's paired difference as a dot with its standard error, and a bar at the mean.

    Two kinds of noise decide whether a lead is measured: the clients within a seed (the error bar,
    the standard error of the per-client mean) and the seed itself (how far the dots lie apart), so
    every seed is drawn rather than one mean and one error bar.
    """
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(pairs) + 2), 4))
    for x, cell in enumerate(pairs.values()):
        points = 100 * np.array([pair.mean for pair in cell])
        errors = 100 * np.nan_to_num(np.array([pair.standard_error for pair in cell]))
        offsets = np.linspace(-0.12, 0.12, points.size) if points.size > 1 else np.zeros(1)
        ax.errorbar(x + offsets, points, yerr=errors, fmt="o", color="tab:blue", capsize=3, zorder=3,
                    label="one seed ± paired standard error" if x == 0 else None)
        ax.hlines(points.mean(), x - 0.25, x + 0.25, color="tab:red", label="mean over seeds" if x == 0 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    _label_columns(ax, list(pairs))
    ax.set(ylabel="difference (points)", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_head_cosines(heads: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Heat maps of the head's class-by-class cosines: the global head, and personalized heads on average.

    One row per run, so a fixed random head (near-orthogonal) and a trained one read side by side.
    """
    fig, axes = plt.subplots(len(heads), 2, figsize=(8, 3.6 * len(heads)), squeeze=False)
    for row, (label, global_cosine, personal_cosine) in enumerate(heads):
        for ax, matrix, which in ((axes[row, 0], global_cosine, "global head"),
                                  (axes[row, 1], personal_cosine, "personalized heads (mean)")):
            image = ax.imshow(np.asarray(matrix), vmin=-1, vmax=1, cmap="coolwarm")
            ax.set(title=f"{label}\n{which}", xlabel="class", ylabel="class")
        fig.colorbar(image, ax=axes[row].tolist(), shrink=0.8, label="cosine")
    _save(fig, path)


def plot_distributions(values: Sequence[tuple[str, np.ndarray]], path: Path, xlabel: str, title: str) -> None:
    """Overlaid histograms of one per-client quantity, one per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [np.asarray(v, dtype=np.float64)[np.isfinite(v)] for _, v in values]
    everything = np.concatenate(finite) if finite else np.zeros(0)
    bins = np.linspace(everything.min(), everything.max(), 30) if everything.size and np.ptp(everything) > 0 else 10
    for (label, _), data in zip(values, finite, strict=True):
        ax.hist(data, bins=bins, alpha=0.5, label=label)
    ax.set(xlabel=xlabel, ylabel="clients", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_gains(points: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Each client's personalization gain against the entropy of its labels, one colour per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, entropy, gain in points:
        ax.scatter(entropy, 100 * np.asarray(gain), s=12, alpha=0.6, label=label)
    ax.set(xlabel="label entropy of the client's training data (bits)", ylabel="gain from personalization (points)",
           title="who gains from personalization")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_spectra(spectra: Sequence[tuple[str, np.ndarray]], path: Path, floor: float = 1e-6) -> None:
    """Singular values of the global body's probe features, normalized by the largest, on a log scale.

    Values below ``floor`` of the largest are numerically zero (features that are always 0, such as
    dead ReLU channels) and are drawn at the floor, so one run's round-off cannot squash the others.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in spectra:
        values = np.asarray(values, dtype=np.float64)
        if values.size and values[0] > 0:
            ax.semilogy(np.arange(1, values.size + 1), np.maximum(values / values[0], floor), label=label)
    ax.set_ylim(floor / 2, 2)
    ax.set(xlabel="index", ylabel="singular value / largest", title="feature spectrum of the global body")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
