"""``fedbabu report``: rebuild a run's report and plots from its files, and compare runs in one table.

It reads only what a run writes as it goes (``config.yaml``, ``metrics.jsonl``) and, for a
finished run, ``summary.json`` and ``clients.csv``; so it also works for a run that was
interrupted, a run copied from another machine, or one whose report was deleted.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedbabu.config import Config, build_config, read_yaml
from fedbabu.engine.checkpoint import CONFIG, METRICS
from fedbabu.engine.privacy import rounds_to_run
from fedbabu.errors import UserError
from fedbabu.files import atomic_write_text
from fedbabu.results.holdout import GROUP_COLUMN, gap_cell
from fedbabu.results.report import run_report, write_plots


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Round records of ``metrics.jsonl``; an incomplete last line (a run killed mid-write) is ignored.

    A ``null`` (a round without any accepted update has no loss) reads back as NaN, as in memory.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append({k: math.nan if v is None else v for k, v in json.loads(line).items()})
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}: line {number} is not a JSON record") from None
    return records


def read_curves(path: Path) -> np.ndarray:
    """clients x (personalization steps + 1) accuracies from ``clients.csv``; column 0 is the initial accuracy.

    The steps are fine-tuning epochs, or adaptation steps for Per-FedAvg (``accuracy_after_step_N``).
    """
    return read_clients(path)[0]


def read_clients(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``clients.csv`` in one read: the accuracy curves (:func:`read_curves`) and each client's group
    (``seen`` or ``unseen``), None for a run that held no client out and so has no group column."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = [c for c in (rows[0].keys() if rows else [])
                   if c == "initial_accuracy" or c.startswith("accuracy_after_")]
        curves = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: not a readable clients.csv ({exc.__class__.__name__})") from None
    groups = np.array([r[GROUP_COLUMN] for r in rows]) if rows and GROUP_COLUMN in rows[0] else None
    return curves, groups


def _interrupted_report(config: Config, metrics: list[dict[str, Any]], folder: Path) -> str:
    evaluated = [m for m in metrics if "test_accuracy" in m]
    last = f" Last global test accuracy: {100 * evaluated[-1]['test_accuracy']:.2f}% (round " \
           f"{evaluated[-1]['round']})." if evaluated else ""
    lines = [
        f"# {config.algorithm} on {config.dataset} ({config.resolved_model()}): interrupted",
        "",
        f"{config.num_clients} clients, seed {config.seed}. {len(metrics)} of {config.rounds} rounds were "
        f"recorded.{last} Continue with `fedbabu resume {folder}`.",
        "",
    ]
    if metrics:
        lines += ["![rounds](rounds.png)", ""]
    return "\n".join(lines)


def _pct(stats: dict[str, float] | None) -> str:
    return "—" if stats is None else f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def rebuild_run(folder: Path) -> dict[str, str]:
    """Rewrite ``report.md`` and the plots of one run folder; return its row of the comparison table."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder}: not a run folder (no {CONFIG}); expected a folder written by fedbabu run")
    config = build_config(read_yaml(folder / CONFIG), str(folder / CONFIG))
    metrics = read_metrics(folder / METRICS)
    summary = None
    finished = len(metrics) == rounds_to_run(config)  # all rounds, or those a dp.target_epsilon allowed
    if (folder / "summary.json").exists() and (folder / "clients.csv").exists() and finished:
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except json.JSONDecodeError:
            raise UserError(f"{folder / 'summary.json'}: not valid JSON") from None
    if summary is not None:
        write_plots(folder, config, metrics, read_curves(folder / "clients.csv"))
        atomic_write_text(folder / "report.md", run_report(summary, has_rounds=bool(metrics)))
    else:
        write_plots(folder, config, metrics, None)
        atomic_write_text(folder / "report.md", _interrupted_report(config, metrics, folder))
    evaluated = [m for m in metrics if "test_accuracy" in m]
    return {
        "run": str(folder),
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "rounds": f"{len(metrics)}/{config.rounds}",
        "global": f"{100 * evaluated[-1]['test_accuracy']:.2f}" if evaluated else "—",
        "initial": _pct(summary["initial_accuracy"] if summary else None),
        "personalized": _pct(summary["personalized_accuracy"] if summary else None),
        "gap": _gap(summary),
    }


def _gap(summary: dict[str, Any] | None) -> str:
    """A run's participation gap cell (``holdout_clients``), or a dash for a run without held-out clients."""
    if summary is None or "participation_gap" not in summary:
        return "—"
    gap = summary["participation_gap"]
    return gap_cell(gap["mean"], gap["standard_error"])


def report_runs(folders: list[Path], out: Path | None = None) -> list[dict[str, str]]:
    """Rebuild every run's report; with ``out``, also write the comparison table as Markdown."""
    rows = [rebuild_run(f) for f in folders]
    if out is not None:
        gaps = any(r["gap"] != "—" for r in rows)  # a column only where some run held clients out
        lines = ["# Runs", "", "Accuracy in %, mean ± std over clients; — where the run has not finished"
                 + (" or held no client out. Participation gap: seen − unseen personalized accuracy, in points, "
                    "± its unpaired standard error." if gaps else "."), "",
                 "| run | algorithm | dataset | rounds | global | initial | personalized |"
                 + (" gap |" if gaps else ""),
                 "|---|---|---|---|---|---|---|" + ("---|" if gaps else "")]
        lines += [f"| {r['run']} | {r['algorithm']} | {r['dataset']} | {r['rounds']} | {r['global']} | "
                  f"{r['initial']} | {r['personalized']} |" + (f" {r['gap']} |" if gaps else "") for r in rows]
        try:
            atomic_write_text(Path(out), "\n".join(lines) + "\n")
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return rows
