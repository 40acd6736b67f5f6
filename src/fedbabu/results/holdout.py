"""Seen and unseen clients: what a run with held-out clients (``holdout_clients``) reports about them.

A held-out client never trains, yet is personalized and tested like every other, so the difference
between the two groups' personalized accuracies is the *participation gap* of Yuan et al. (ICLR 2022,
"What do we mean by generalization in federated learning?"): how much better the federation serves
the clients it trained on than clients of the same population it never saw. The two groups are
different clients, so the gap's standard error is the unpaired one, ``sqrt(s1²/n1 + s2²/n2)``.

Everything here is written only when the run held clients out, so a run without them writes exactly
the files it wrote before the option existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from fedbabu.config import Config
from fedbabu.engine.round import held_out_of
from fedbabu.results.paired import PairedDifference, paired_difference

SEEN, UNSEEN = "seen", "unseen"
GROUP_COLUMN = "group"
"""The ``clients.csv`` column naming each client's group, present only with held-out clients."""


class GroupMeanStd(TypedDict):
    """A mean over a group's clients and their spread around it (population std, as ``summary.json``'s
    overall accuracies); NaN for a group without clients."""

    mean: float
    std: float


class GroupAccuracy(TypedDict):
    """``summary.json``'s ``seen`` or ``unseen``: one group's accuracies before and after personalization."""

    clients: int
    """The group's clients with a measured accuracy (a Flower node that never answered has none)."""
    initial_accuracy: GroupMeanStd
    personalized_accuracy: GroupMeanStd


class ParticipationGap(TypedDict):
    """``summary.json``'s ``participation_gap``: seen minus unseen personalized accuracy."""

    mean: float
    standard_error: float
    """Unpaired: ``sqrt(s1²/n1 + s2²/n2)`` with each group's sample variance; NaN with fewer than two clients
    in a group."""


def holds_out(config: Config) -> bool:
    """Whether the run held clients out, and so reports on its groups."""
    return config.resolved_holdout() > 0


def unseen_clients(config: Config, num_clients: int) -> set[int]:
    """The run's held-out clients."""
    return set(held_out_of(config, num_clients))


def group_column(config: Config, num_clients: int, clients: Sequence[int]) -> list[str]:
    """Each listed client's group, in their order: the values of ``clients.csv``'s :data:`GROUP_COLUMN`."""
    unseen = unseen_clients(config, num_clients)
    return [UNSEEN if c in unseen else SEEN for c in clients]


def _stats(values: np.ndarray) -> GroupMeanStd:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(finite.mean()), "std": float(finite.std())}


def group_accuracy(curves: Sequence[Sequence[float]]) -> GroupAccuracy:
    """One group's accuracies from its clients' curves (each before personalization, then after each step)."""
    initial = np.array([curve[0] for curve in curves], dtype=np.float64)
    last = np.array([curve[-1] for curve in curves], dtype=np.float64)
    return {"clients": int(np.isfinite(last).sum()), "initial_accuracy": _stats(initial),
            "personalized_accuracy": _stats(last)}


def _pooled(groups: Sequence[GroupAccuracy], key: str) -> tuple[int, float, float]:
    """(clients, mean, sample variance) of the groups' clients taken together, from each group's count, mean
    and population std: several seeds' groups pool into one, as a comparison pools clients over seeds."""
    counts = np.array([g["clients"] for g in groups], dtype=np.float64)
    total = int(counts.sum())
    if total == 0:
        return 0, math.nan, math.nan
    means = np.array([g[key]["mean"] if g["clients"] else 0.0 for g in groups])
    stds = np.array([g[key]["std"] if g["clients"] else 0.0 for g in groups])
    mean = float((counts * means).sum() / total)
    second_moment = float((counts * (stds**2 + means**2)).sum() / total)
    variance = max(second_moment - mean**2, 0.0) * total / (total - 1) if total > 1 else math.nan
    return total, mean, variance


def participation_gap(seen: Sequence[GroupAccuracy], unseen: Sequence[GroupAccuracy]) -> ParticipationGap:
    """Seen minus unseen personalized accuracy over the given groups (one per seed), with its unpaired
    standard error ``sqrt(s1²/n1 + s2²/n2)``."""
    n1, mean1, var1 = _pooled(seen, "personalized_accuracy")
    n2, mean2, var2 = _pooled(unseen, "personalized_accuracy")
    error = math.sqrt(var1 / n1 + var2 / n2) if n1 > 1 and n2 > 1 else math.nan
    return {"mean": mean1 - mean2, "standard_error": error}


def holdout_summary(config: Config, num_clients: int, clients: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s keys about the groups (empty without held-out clients): ``holdout_clients`` (how
    many), ``seen`` and ``unseen`` (:class:`GroupAccuracy`) and ``participation_gap``.

    ``clients`` are the run's client records (``client`` and ``accuracies``), all or the personalized sample.
    """
    if not holds_out(config):
        return {}
    unseen = unseen_clients(config, num_clients)
    groups = {}
    for name, wanted in ((SEEN, False), (UNSEEN, True)):
        groups[name] = group_accuracy([c["accuracies"] for c in clients if (c["client"] in unseen) == wanted])
    return {"holdout_clients": len(unseen), **groups,
            "participation_gap": participation_gap([groups[SEEN]], [groups[UNSEEN]])}


COMPARISON_KEYS = ("seen_initial_mean", "seen_personalized_mean", "unseen_initial_mean", "unseen_personalized_mean",
                   "participation_gap", "participation_gap_standard_error")
"""A comparison row's group columns (``comparison.csv``), present when its runs held clients out."""


def comparison_fields(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One comparison row's group columns, its runs' (seeds') clients pooled; empty without held-out clients."""
    if not runs or "participation_gap" not in runs[0]:
        return {}
    seen, unseen = [r[SEEN] for r in runs], [r[UNSEEN] for r in runs]
    gap = participation_gap(seen, unseen)
    fields = {f"{name}_{stage}_mean": _pooled(groups, f"{stage}_accuracy")[1]
              for name, groups in ((SEEN, seen), (UNSEEN, unseen)) for stage in ("initial", "personalized")}
    return {**fields, "participation_gap": gap["mean"], "participation_gap_standard_error": gap["standard_error"]}


def has_groups(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the entries of a comparison held clients out: then its tables get the group columns."""
    return any("participation_gap" in r for r in rows)


def paired_by_group(reference: Sequence[np.ndarray], other: Sequence[np.ndarray],
                    groups: Sequence[np.ndarray]) -> dict[str, PairedDifference | None]:
    """``other − reference`` client by client within each group, the seeds' clients pooled.

    The arrays are per seed, in client order, as :func:`~fedbabu.results.paired.paired_difference` takes
    them; ``groups`` are the seeds' group columns (the same for both runs: one partition, one held-out draw).
    """
    return {name: paired_difference([r[g == name] for r, g in zip(reference, groups, strict=True)],
                                    [o[g == name] for o, g in zip(other, groups, strict=True)])
            for name in (SEEN, UNSEEN)}


def gap_difference_cell(pairs: Mapping[str, PairedDifference | None]) -> str:
    """``other``'s participation gap minus ``reference``'s, in points, from :func:`paired_by_group`.

    It is the seen clients' paired difference minus the unseen clients': each group's difference is
    paired, and the two groups are different clients, so their standard errors add in quadrature.
    Positive where ``other`` serves the clients it never saw worse, against those it trained, than
    ``reference`` does.
    """
    seen, unseen = pairs[SEEN], pairs[UNSEEN]
    if seen is None or unseen is None:
        return "—"
    return gap_cell(seen.mean - unseen.mean, math.hypot(seen.standard_error, unseen.standard_error))


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.2f}"


def initial_to_personalized(initial: float, personalized: float) -> str:
    """A group's two accuracies in one table cell, in %: ``90.12 → 97.30``."""
    return f"{_pct(initial)} → {_pct(personalized)}"


def gap_cell(gap: float, error: float) -> str:
    """The participation gap in points, ± its standard error where there is one."""
    if math.isnan(gap):
        return "—"
    return f"{100 * gap:+.2f}" + ("" if math.isnan(error) else f" ± {100 * error:.2f}")


def group_cells(row: Mapping[str, Any]) -> list[str]:
    """A comparison row's seen, unseen and gap cells for a table; dashes for an entry without groups."""
    if "participation_gap" not in row:
        return ["—"] * 3
    return [initial_to_personalized(row["seen_initial_mean"], row["seen_personalized_mean"]),
            initial_to_personalized(row["unseen_initial_mean"], row["unseen_personalized_mean"]),
            gap_cell(row["participation_gap"], row["participation_gap_standard_error"])]


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    """``report.md``'s table of the two groups and the gap; nothing without held-out clients."""
    if "participation_gap" not in summary:
        return []
    gap = summary["participation_gap"]
    lines = [f"{summary['holdout_clients']} of {summary['num_clients']} clients were held out: never sampled for "
             "training, personalized and tested like the others (docs/new-clients.md).", "",
             "| clients | listed | initial (%) | personalized (%) |", "|---|---|---|---|"]
    for name in (SEEN, UNSEEN):
        group = summary[name]
        lines.append(f"| {name} | {group['clients']} | {_mean_std(group['initial_accuracy'])} | "
                     f"{_mean_std(group['personalized_accuracy'])} |")
    lines += ["", "Participation gap (seen − unseen personalized accuracy): "
              f"{gap_cell(gap['mean'], gap['standard_error'])} points (± the unpaired standard error).", ""]
    return lines


def _mean_std(stats: Mapping[str, float]) -> str:
    return "—" if math.isnan(stats["mean"]) else f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


SCALARS = {"holdout/seen_initial_accuracy": (SEEN, "initial_accuracy"),
           "holdout/seen_personalized_accuracy": (SEEN, "personalized_accuracy"),
           "holdout/unseen_initial_accuracy": (UNSEEN, "initial_accuracy"),
           "holdout/unseen_personalized_accuracy": (UNSEEN, "personalized_accuracy")}
"""TensorBoard tags of the groups' mean accuracies (``participation_gap`` beside them)."""


def scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The groups' final numbers as TensorBoard scalars; nothing without held-out clients."""
    if "participation_gap" not in summary:
        return {}
    values = {tag: summary[group][key]["mean"] for tag, (group, key) in SCALARS.items()}
    return {**values, "holdout/participation_gap": summary["participation_gap"]["mean"]}
