"""Everything a finished run writes to its folder: files, summary, plots and ``report.md``."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import PERSONALIZATION_PROTOCOL
from fedbabu.config import Config, dump_config
from fedbabu.engine import hardware, privacy
from fedbabu.engine.checkpoint import METRICS, TIMING, metrics_line, timing_line
from fedbabu.engine.contract import versions
from fedbabu.engine.simulation import RunResult, seeded_clients
from fedbabu.files import atomic_write_text, save_tensors, write_csv, write_json
from fedbabu.results import holdout
from fedbabu.results.holdout import GroupAccuracy, ParticipationGap
from fedbabu.results.paired import PairedDifference, paired_cell, paired_difference, paired_reference
from fedbabu.results.plots import plot_clients, plot_comparison, plot_finetune_curves, plot_rounds


class MeanStd(TypedDict):
    """A mean over clients and the spread of the clients around it (population std)."""

    mean: float
    std: float


class Environment(TypedDict):
    """Where a run computed: what a reader needs to know before expecting its numbers bit for bit."""

    torch: str
    python: str
    machine: str
    workers: int
    threads_per_worker: int
    device: str
    precision: str
    cpu_kernels: dict[str, str] | None


class PrivacySummary(TypedDict):
    """``summary.json``'s ``privacy`` (a DP run only): what was spent, and how it was accounted (``engine.privacy``)."""

    noise_multiplier: float
    clipping_norm: float
    clients_per_round: int
    """m, the divisor of the private mean: the clients sampled per round (their expectation under Poisson
    sampling)."""
    population: int
    """N, the clients that may train (the held-out ones are not counted): the accountant's population."""
    noise_std: float
    """The standard deviation of the noise on the mean update, ``noise_multiplier * clipping_norm / m``."""
    delta: float
    epsilon: float
    """Epsilon at ``delta`` after ``rounds`` rounds, for the shared parameters of every global model."""
    target_epsilon: float | None
    rounds: int
    """The rounds trained: fewer than configured where ``stopped_early`` says why."""
    stopped_early: str | None
    accountant: str
    sampling: str
    adaptive_clipping: dict[str, float] | None
    """With ``dp.adaptive_clipping``: its settings, the updates' noise multiplier and the final clipping norm."""
    protects: str


class RunSummary(TypedDict, total=False):
    """``summary.json``: a run's headline numbers and what produced them, one key per fact.

    A plain dict at run time (it is written and read as JSON), typed so that its keys are stated
    once. Written by every engine; a Flower run adds ``flower``, a run personalized again
    ``personalized_from`` and ``personalization_wall_time_s``.
    """

    algorithm: str
    dataset: str
    model: str
    rounds: int
    num_clients: int
    personalized_clients: int
    evaluated_clients: int
    seed: int
    partition: str
    initial_accuracy: MeanStd
    """Before personalization: the global model with each client's personal parts."""
    personalized_accuracy: MeanStd
    """After the algorithm's personalization (the last point of each client's curve)."""
    finetune_curve: list[float]
    finetune: dict[str, Any]
    personalization: str
    personalization_unit: str
    personalization_protocol: int
    algorithm_version: dict[str, int]
    """The algorithm's training and evaluation versions (``Algorithm.training_version``)."""
    personal_parts: list[str]
    final_global_accuracy: float | None
    never_sampled_clients: int
    bytes_per_round_per_client: int
    wall_time_s: float
    environment: Environment
    privacy: PrivacySummary
    """A DP run only (``dp.noise_multiplier > 0``)."""
    holdout_clients: int
    """A run with held-out clients only (``holdout_clients > 0``, as are the next three): how many."""
    seen: GroupAccuracy
    """The clients the federation could train (all but the held-out ones), among those personalized."""
    unseen: GroupAccuracy
    """The held-out clients, among those personalized."""
    participation_gap: ParticipationGap
    """Seen minus unseen personalized accuracy, with its unpaired standard error (:mod:`fedbabu.results.holdout`)."""
    flower: dict[str, Any]
    personalized_from: str
    personalization_wall_time_s: float
    client_group: str
    """A run personalized again for one group only (``fedbabu personalize --clients seen|unseen``)."""
    personalized_model: str
    """``initial`` for clients personalized from the run's initial model (``fedbabu personalize --model initial``)."""


def mean_std(values: np.ndarray) -> MeanStd:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}


def summarize(result: RunResult) -> RunSummary:
    """The run's headline numbers, as saved in ``summary.json``."""
    c = result.config
    curves = result.accuracy_curve()
    evaluated = [m for m in result.metrics if "test_accuracy" in m]
    algorithm = ALGORITHMS[c.algorithm](c)
    device = c.resolved_device()
    summary: RunSummary = {
        "algorithm": c.algorithm,
        "dataset": c.dataset,
        "model": c.resolved_model(),
        "rounds": c.rounds,
        "num_clients": c.num_clients,
        "personalized_clients": len(result.clients),
        "evaluated_clients": len(seeded_clients(c.seed, result.partition.num_clients, c.eval_clients)),
        "seed": c.seed,
        "partition": result.partition.summary(),
        "initial_accuracy": mean_std(curves[:, 0]),
        "personalized_accuracy": mean_std(curves[:, -1]),
        "finetune_curve": [float(v) for v in np.nanmean(curves, axis=0)],
        "finetune": c.finetune.model_dump(),
        "personalization": algorithm.personalization_note(),
        "personalization_unit": algorithm.personalization_unit(),
        "personalization_protocol": PERSONALIZATION_PROTOCOL,
        "algorithm_version": versions(algorithm),
        "personal_parts": list(algorithm.personal_parts),
        "final_global_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
        "never_sampled_clients": never_sampled(result.metrics, c.trainable_clients()),
        "bytes_per_round_per_client": result.bytes_per_round_per_client,
        "wall_time_s": round(result.wall_time_s, 3),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "workers": c.resolved_workers(),
            "threads_per_worker": 1,
            "device": device,
            "precision": c.precision,
            "cpu_kernels": hardware.cpu_kernels() if device == "cpu" else None,
        },
    }
    spent = privacy.summary(c, result.metrics)
    if spent is not None:
        summary["privacy"] = spent
    summary.update(holdout.holdout_summary(c, result.partition.num_clients, result.clients))
    return summary


def never_sampled(metrics: list[dict[str, Any]], num_clients: int) -> int:
    """Clients that took part in no training round: with personal parts, theirs are still the initial ones.

    Sampling is random, so with f = 0.1 over 32 rounds about 3% of the clients are never drawn.
    ``num_clients`` counts the clients that could be drawn: the held-out ones are counted apart.
    """
    taking_part = {client for record in metrics for client in record.get("clients", [])}
    return num_clients - len(taking_part)


def client_rows(result: RunResult) -> tuple[list[str], list[list[Any]]]:
    c = result.config
    unit = ALGORITHMS[c.algorithm](c).personalization_unit()
    steps = len(result.clients[0]["accuracies"]) - 1 if result.clients else c.finetune.epochs
    header = ["client", "train_size", "test_size", "classes", "initial_accuracy"] + [
        f"accuracy_after_{unit}_{e}" for e in range(1, steps + 1)]
    rows = [[c["client"], c["train_size"], c["test_size"], c["classes"]] + [f"{a:.6f}" for a in c["accuracies"]]
            for c in result.clients]
    if holdout.holds_out(result.config):  # only then, so a run without held-out clients writes what it always did
        clients = [c["client"] for c in result.clients]
        groups = holdout.group_column(result.config, result.partition.num_clients, clients)
        header.insert(4, holdout.GROUP_COLUMN)
        for row, group in zip(rows, groups, strict=True):
            row.insert(4, group)
    return header, rows


def metrics_lines(metrics: list[dict[str, Any]]) -> str:
    """``metrics.jsonl``: the reproducible per-round values (wall-clock seconds go to ``timing.jsonl``)."""
    return "".join(metrics_line(m) for m in metrics)


def write_run(result: RunResult, folder: Path) -> RunSummary:
    """Write the complete run folder; returns the summary."""
    folder = Path(folder)
    summary = summarize(result)
    atomic_write_text(folder / "config.yaml", dump_config(result.config))
    write_json(folder / "partition.json", result.partition.to_json())
    atomic_write_text(folder / METRICS, metrics_lines(result.metrics))
    atomic_write_text(folder / TIMING, "".join(timing_line(m) for m in result.metrics))
    header, rows = client_rows(result)
    write_csv(folder / "clients.csv", header, rows)
    save_tensors(folder / "model.pt", result.final_state)
    write_json(folder / "summary.json", summary)
    write_plots(folder, result.config, result.metrics, result.accuracy_curve())
    atomic_write_text(folder / "report.md", run_report(summary, has_rounds=bool(result.metrics)))
    return summary


def write_personalization(result: RunResult, folder: Path, source: Path, seconds: float,
                          group: str = "all", model: str = "final") -> RunSummary:
    """The folder of a run personalized again: its fine-tuning results, never a copy of the trained model.

    ``summary.json`` keeps the training run's wall time and communication (the same federation) and
    adds where it came from and how long the new personalization took, and ``client_group`` where only
    the seen or the unseen clients were personalized (``--clients``). From the ``initial`` model it says so
    (``personalized_model``) and drops the final global accuracy, the privacy cost and the count of clients
    never sampled, which only training gives: the untrained model saw no data, so every client is new to it.
    """
    folder = Path(folder)
    summary: RunSummary = {**summarize(result), "personalized_from": str(source),
                           "personalization_wall_time_s": round(seconds, 3)}
    if group != "all":
        summary["client_group"] = group
    if model != "final":
        summary["personalized_model"] = model
        for trained in ("final_global_accuracy", "privacy", "never_sampled_clients"):
            summary.pop(trained, None)
    atomic_write_text(folder / "config.yaml", dump_config(result.config))
    header, rows = client_rows(result)
    write_csv(folder / "clients.csv", header, rows)
    write_json(folder / "summary.json", summary)
    write_plots(folder, result.config, [], result.accuracy_curve())
    start = ("its final global model and personal state" if model == "final" else
             "its initial global model, before any round, and no personal state: fine-tuning without the federation")
    note = (f"Personalized again from the trained run `{source}` ({start}; no training) in {seconds:.1f} s."
            + ("" if group == "all" else f" Only its {group} clients."))
    atomic_write_text(folder / "report.md", run_report(summary, has_rounds=False, note=note))
    return summary


def write_plots(folder: Path, config: Config, metrics: list[dict[str, Any]], curves: np.ndarray | None) -> None:
    """The run's plots; without ``curves`` (an interrupted run) only the per-round one."""
    label = f"{config.algorithm} on {config.dataset}"
    if metrics:
        plot_rounds(metrics, folder / "rounds.png", label)
    if curves is not None:
        plot_clients(curves, folder / "clients.png", f"{label}: initial vs personalized accuracy per client")
        unit = ALGORITHMS[config.algorithm](config).personalization_unit()
        plot_finetune_curves({config.algorithm: curves}, folder / "finetune.png",
                             f"{label}: accuracy vs personalization {unit}s", xlabel=f"personalization {unit}s")


def _pct(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def run_report(summary: dict[str, Any], has_rounds: bool = True, note: str = "") -> str:
    unit = summary["personalization_unit"]
    curve = " → ".join(f"{100 * v:.1f}" for v in summary["finetune_curve"])
    start = ("the initial model, before any round" if summary.get("personalized_model") == "initial" else
             "end of training: global model + personal parts")
    lines = [
        f"# {summary['algorithm']} on {summary['dataset']} ({summary['model']})",
        "",
        f"{summary['num_clients']} clients, {summary['rounds']} rounds, seed {summary['seed']}. "
        f"{summary['partition']}.",
        "",
        "| metric | accuracy (%) mean ± std over clients |",
        "|---|---|",
        f"| initial ({start}) | {_pct(summary['initial_accuracy'])} |",
        f"| personalized ({summary['personalization']}) | {_pct(summary['personalized_accuracy'])} |",
        "",
        f"Accuracy after 0..{len(summary['finetune_curve']) - 1} personalization {unit}s: {curve}.",
        "",
        f"Communication: {summary['bytes_per_round_per_client']:,} bytes per participating client per round "
        f"(down + up). Wall time: {summary['wall_time_s']:.1f} s.",
        "",
    ]
    lines += _privacy_note(summary)
    lines += holdout.report_lines(summary)
    lines += _sample_notes(summary)
    lines += _never_sampled_note(summary)
    if note:
        lines += [note, ""]
    if has_rounds:
        lines += ["![rounds](rounds.png)", ""]
    lines += ["![clients](clients.png)", "", "![fine-tuning](finetune.png)", ""]
    return "\n".join(lines)


def _privacy_note(summary: dict[str, Any]) -> list[str]:
    """A DP run's guarantee, in the words of ``docs/privacy.md``, and why it stopped early if it did."""
    spent = summary.get("privacy")
    if not spent:
        return []
    lines = [f"Differential privacy: (ε = {spent['epsilon']:.3g}, δ = {spent['delta']:.3g}) user-level, for the shared "
             f"parameters of every global model, after {spent['rounds']} rounds (noise multiplier "
             f"{spent['noise_multiplier']:g}, clipping norm {spent['clipping_norm']:g}, {spent['clients_per_round']} "
             f"clients per round; {spent['accountant']}, {spent['sampling']}). Not covered: the metrics clients "
             "report (losses, accuracies, sample counts), nor updates as the server receives them.", ""]
    adaptive = spent.get("adaptive_clipping")
    if adaptive:
        lines += [f"Adaptive clipping: the norm moved from {spent['clipping_norm']:g} to "
                  f"{adaptive['final_clipping_norm']:.4g} toward the {adaptive['target_quantile']:g} quantile of the "
                  f"update norms; the updates' noise multiplier is {adaptive['update_noise_multiplier']:.4g}, the "
                  f"count's standard deviation {adaptive['clipped_count_stddev']:g}.", ""]
    if spent.get("stopped_early"):
        lines += [f"Stopped early: {spent['stopped_early']}.", ""]
    return lines


def _sample_notes(summary: dict[str, Any]) -> list[str]:
    """Say which clients the numbers are over when a large federation was evaluated or personalized in part."""
    total = summary["num_clients"]
    lines = []
    personalized = summary.get("personalized_clients", total)
    if personalized < total:
        lines += [f"This run personalized {personalized} of {total} clients (seeded sample, `personalize_clients`): "
                  "the accuracies over clients above are theirs, and `clients.csv` lists them.", ""]
    evaluated = summary.get("evaluated_clients", total)
    if evaluated < total and summary.get("final_global_accuracy") is not None:
        lines += [f"The global model was tested during training on {evaluated} of {total} clients (seeded sample, "
                  "`eval_clients`), the same ones every evaluation round.", ""]
    return lines


def _never_sampled_note(summary: dict[str, Any]) -> list[str]:
    """Say how many clients never trained, and what that means for their personal parts."""
    count = summary.get("never_sampled_clients")
    if not count:
        return []
    parts = summary.get("personal_parts", ALGORITHMS[summary["algorithm"]].personal_parts)
    kept = (f": each keeps the {'+'.join(parts)} the run started from, and its accuracies are measured "
            "with it" if parts else "")
    held_out = summary.get("holdout_clients", 0)
    among = " participating (not held out)" if held_out else ""
    return [f"{count} of {summary['num_clients'] - held_out}{among} clients were never sampled for a training "
            f"round{kept}.", ""]


def seed_spread(means: list[float]) -> float:
    """Sample std of per-seed means; NaN for a single seed, whose spread is unknown, not zero."""
    return float(np.std(means, ddof=1)) if len(means) > 1 else math.nan


def seed_standard_error(means: list[float]) -> float:
    """Standard error of the mean of per-seed means (their sample std over the root of their number):
    the "±" of every result over seeds; NaN for a single seed."""
    return seed_spread(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan


PAIRED_KEYS = ("paired_difference", "paired_standard_error", "clients_higher", "clients_lower", "clients_tied")


def _paired_fields(pair: PairedDifference | None) -> dict[str, float | int | None]:
    if pair is None:
        return dict.fromkeys(PAIRED_KEYS)
    return {"paired_difference": pair.mean, "paired_standard_error": pair.standard_error,
            "clients_higher": pair.higher, "clients_lower": pair.lower, "clients_tied": pair.tied}


def comparison_rows(summaries: dict[str, list[dict[str, Any]]],
                    curves: dict[str, list[np.ndarray]]) -> list[dict[str, Any]]:
    """One row per algorithm: accuracies pooled over clients and seeds, plus the spread of seed means,
    and its personalized accuracy minus the reference's (:func:`paired_reference`) client by client
    (``paired_*`` and ``clients_*``; None for the reference and where the runs did not test the same
    clients)."""
    rows = []
    reference = paired_reference(list(summaries))
    for algorithm, runs in summaries.items():
        stacked = np.concatenate(curves[algorithm], axis=0)
        pair = None if algorithm == reference else paired_difference(
            [curve[:, -1] for curve in curves[reference]], [curve[:, -1] for curve in curves[algorithm]])
        rows.append({
            "algorithm": algorithm,
            "initial_mean": float(np.nanmean(stacked[:, 0])),
            "initial_std": float(np.nanstd(stacked[:, 0])),
            "personalized_mean": float(np.nanmean(stacked[:, -1])),
            "personalized_std": float(np.nanstd(stacked[:, -1])),
            "initial_seed_std": seed_spread([r["initial_accuracy"]["mean"] for r in runs]),
            "personalized_seed_std": seed_spread([r["personalized_accuracy"]["mean"] for r in runs]),
            "seeds": len(runs),
            "bytes_per_round_per_client": runs[0]["bytes_per_round_per_client"],
            "wall_time_s": float(sum(r["wall_time_s"] for r in runs)),
            "personalization": runs[0]["personalization"],
            "personalization_unit": runs[0]["personalization_unit"],
            "paired_against": reference,
            **_paired_fields(pair),
            "epsilon": largest_epsilon(runs),
            **holdout.comparison_fields(runs),
        })
    return rows


def largest_epsilon(runs: list[dict[str, Any]]) -> float | None:
    """The largest epsilon the runs' summaries spent (an entry's seeds, a cell's runs), or None when none used DP."""
    spent = [r["privacy"]["epsilon"] for r in runs if r.get("privacy")]
    return max(spent) if spent else None


def has_privacy(rows: list[dict[str, Any]]) -> bool:
    """Whether any entry of a comparison ran with DP: then its tables get an epsilon column."""
    return any(r.get("epsilon") is not None for r in rows)


COMPARISON_HEADER = ["algorithm", "initial_mean", "initial_std", "personalized_mean", "personalized_std",
                     "personalized_seed_std", "seeds", "bytes_per_round_per_client", "wall_time_s",
                     "initial_seed_std", "personalization", "paired_against", *PAIRED_KEYS]


def write_comparison(rows: list[dict[str, Any]], curves: dict[str, list[np.ndarray]], folder: Path,
                     title: str) -> None:
    header = [*COMPARISON_HEADER, "epsilon"] if has_privacy(rows) else COMPARISON_HEADER
    header = [*header, *holdout.COMPARISON_KEYS] if holdout.has_groups(rows) else header
    write_csv(folder / "comparison.csv", header, [[_csv_value(r.get(k)) for k in header] for r in rows])
    plot_comparison(rows, folder / "comparison.png", title)
    units = sorted({r["personalization_unit"] for r in rows})
    plot_finetune_curves({a: np.concatenate(c, axis=0) for a, c in curves.items()}, folder / "finetune.png",
                         f"{title}: accuracy vs personalization", xlabel=" or ".join(f"{u}s" for u in units))
    atomic_write_text(folder / "comparison.md", comparison_markdown(rows, title))


def _csv_value(value: Any) -> Any:
    """Floats with six decimals; an unknown value (a one-seed spread, the reference's own pairing) as an
    empty cell."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return value
    return "" if math.isnan(value) else f"{value:.6f}"


def _seed_bracket(spread: float) -> str:
    return "" if math.isnan(spread) else f" [{100 * spread:.2f}]"


def epsilon_cell(row: dict[str, Any]) -> str:
    """An entry's epsilon in a table: three significant digits, or "no DP"."""
    value = row.get("epsilon")
    return "no DP" if value is None else f"{value:.3g}"


def comparison_markdown(rows: list[dict[str, Any]], title: str) -> str:
    reference = rows[0].get("paired_against", "") if rows else ""
    private = has_privacy(rows)
    groups = holdout.has_groups(rows)
    lines = [
        f"# {title}",
        "",
        f"Accuracy in %: mean ± std over all clients of all {rows[0]['seeds'] if rows else 0} seed(s) pooled, "
        "then (in brackets, with two or more seeds) the sample std of the per-seed means. Every algorithm ran "
        "on the same partition and "
        "seed. Initial = what each client holds when training ends (global model plus its personal parts), "
        "before personalization. Bytes = down + up per participating client per round. Wall time summed "
        f"over seeds. Paired: personalized accuracy minus {reference}'s on the same client (same test set), "
        "mean ± the standard error of that mean over the clients of all seeds, and on how many clients "
        "the algorithm is higher, lower or tied." + (" ε: the user-level epsilon of the shared parameters (at each "
                                                       "run's delta, see summary.json's privacy), largest over "
                                                       "seeds." if private else "")
        + (" Seen / unseen: the clients the federation could train and the held-out ones (docs/new-clients.md), "
           "initial → personalized mean; gap: seen − unseen personalized, ± its unpaired standard error."
           if groups else ""),
        "",
        f"| algorithm | initial | personalized | gain | paired vs {reference} | bytes/round/client | wall time (s) "
        "| personalization |" + (" ε |" if private else "") + (" seen | unseen | gap |" if groups else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if private else "") + ("---|---|---|" if groups else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {100 * r['initial_mean']:.2f} ± {100 * r['initial_std']:.2f}"
            f"{_seed_bracket(r['initial_seed_std'])} | "
            f"{100 * r['personalized_mean']:.2f} ± {100 * r['personalized_std']:.2f}"
            f"{_seed_bracket(r['personalized_seed_std'])} | "
            f"{100 * (r['personalized_mean'] - r['initial_mean']):+.2f} | {paired_cell(r)} | "
            f"{r['bytes_per_round_per_client']:,} | "
            f"{r['wall_time_s']:.1f} | {r['personalization']} |" + (f" {epsilon_cell(r)} |" if private else "")
            + (f" {' | '.join(holdout.group_cells(r))} |" if groups else "")
        )
    lines += ["", "![comparison](comparison.png)", "", "![personalization curves](finetune.png)", ""]
    return "\n".join(lines)
