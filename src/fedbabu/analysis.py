"""Look inside finished runs (``fedbabu analyze RUN...``): their bodies and heads, not only their accuracy.

FedBABU's thesis is about representations: a head trained during federation harms the body's
universality, a fixed random head forces a better one. This module measures that on any finished
run folder. It restores the federation as :mod:`fedbabu.personalization` does, and on the worker pool
takes the features under the global body of every client the run personalized (all, or its seeded
sample), personalizes the client with the run's own fine-tuning (bit-identical to the run, which is
checked against its ``clients.csv``) and takes the features of the personalized body. Only per-client
summaries and the few feature matrices the federation-wide measures need are kept in memory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import PERSONALIZATION_PROTOCOL, recorded_versions
from fedbabu.config import Config
from fedbabu.engine.simulation import (
    ClientInspection,
    Observer,
    inspect_federation,
    network,
    stream_seed,
)
from fedbabu.errors import UserError
from fedbabu.files import check_output_dir, prepare_output_dir
from fedbabu.personalization import (
    FREE_KEYS,
    group_clients,
    load_trained_run,
    personalization_config,
    restore_federation,
)
from fedbabu.personalization import default_out as default_personalization_out
from fedbabu.results import representation as rep
from fedbabu.results.analysis_report import write_analysis, write_analysis_comparison
from fedbabu.results.report import mean_std
from fedbabu.training import load_state

ANALYSIS_FOLDER = "analysis"
DEFAULT_PROBE_SIZE = 1000
DEFAULT_PAIR_CLIENTS = 20
PROBE_STREAM, PAIR_STREAM = 0xA71, 0xA72


@dataclass
class Analysis:
    """Where an analysis was written and what it found: one ``analysis.json`` per run."""

    folder: Path
    runs: list[dict[str, Any]]


def probe_indices(test_sets: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of the federation's test images, in index order.

    Every body of a run (global, each personalized one) is read on these same images, so CKA
    compares representations of identical inputs.
    """
    pool = np.unique(np.concatenate([np.asarray(t, dtype=np.int64) for t in test_sets] or [np.zeros(0, np.int64)]))
    if pool.size == 0:
        raise UserError("the run's clients hold no test images, so there is nothing to probe the bodies on")
    rng = np.random.default_rng(stream_seed(seed, 0, 0, PROBE_STREAM))
    return np.sort(rng.choice(pool, size=min(size, pool.size), replace=False))


def pair_clients(clients: list[int], count: int, seed: int) -> list[int]:
    """The seeded sample of the analyzed clients whose personalized bodies are compared with each other."""
    rng = np.random.default_rng(stream_seed(seed, 0, 0, PAIR_STREAM))
    return sorted(int(c) for c in rng.choice(np.asarray(clients), size=min(count, len(clients)), replace=False))


def _run_curves(folder: Path) -> dict[int, list[str]]:
    """The accuracy curves of a ``clients.csv`` as written there (6 decimals)."""
    with (folder / "clients.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {int(row["client"]): [v for k, v in row.items() if k.startswith(("initial_", "accuracy_after_"))]
            for row in rows}


class _Collector:
    """Turns each client's inspection into its row of numbers, keeping only what later measures need."""

    def __init__(self, labels_train: list[np.ndarray], labels_test: list[np.ndarray], num_classes: int,
                 pairs: list[int]) -> None:
        self.labels_train, self.labels_test, self.num_classes = labels_train, labels_test, num_classes
        self.pairs = set(pairs)
        self.rows: list[dict[str, Any]] = []
        self.curves: dict[int, list[float]] = {}
        self.probe_train: list[np.ndarray] = []
        self.probe_test: list[np.ndarray] = []
        self.pair_features: dict[int, np.ndarray] = {}
        self.mean_head_cosine: np.ndarray | None = None

    def __call__(self, item: ClientInspection, global_probe: np.ndarray) -> None:
        c = item.client
        y_train, y_test = self.labels_train[c], self.labels_test[c]
        row: dict[str, Any] = {"client": c, "train_size": len(y_train), "test_size": len(y_test),
                               "classes": int(np.unique(y_train).size),
                               "label_entropy": rep.label_entropy(y_train, self.num_classes),
                               "initial_accuracy": item.curve[0], "personalized_accuracy": item.curve[-1],
                               "gain": item.curve[-1] - item.curve[0]}
        for body, train, test in (("global", item.global_train, item.global_test),
                                  ("personalized", item.personal_train, item.personal_test)):
            for metric in rep.METRICS:
                row[f"nearest_mean_{body}_{metric}"] = rep.nearest_mean_accuracy(train, y_train, test, y_test, metric)
        row["cka_global_personalized"] = rep.linear_cka(global_probe, item.personal_probe)
        row["body_change"], row["head_change"] = item.change["body"], item.change["head"]
        geometry = rep.head_geometry(item.personal_head)
        row["head_norm_cv"], row["head_mean_abs_cosine"] = geometry["norm_cv"], geometry["mean_abs_cosine"]
        cosines = geometry["cosine"]
        self.mean_head_cosine = cosines if self.mean_head_cosine is None else self.mean_head_cosine + cosines
        self.rows.append(row)
        self.curves[c] = item.curve
        self.probe_train.append(item.global_train)
        self.probe_test.append(item.global_test)
        if c in self.pairs:
            self.pair_features[c] = item.personal_probe


def _global_head_weight(config: Config, dataset: Any, state: dict[str, Any]) -> np.ndarray:
    """The class vectors the global model predicts with (classes x features): the head's shared
    pieces alone where it has per-client ones (FedRoD's personal head), whose global values are only
    their seeded start."""
    model = network(config, dataset)
    load_state(model, state)
    head = model.head
    return getattr(head, "shared_weight", head.weight).detach().float().numpy()


def _between_clients(features: dict[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
    clients = sorted(features)
    return clients, rep.cka_matrix([features[c] for c in clients])


def _reference(folder: Path, summary: dict[str, Any], config: Config) -> tuple[Path, dict[str, Any]] | None:
    """The folder whose ``clients.csv`` holds this run's personalization under the current protocol, if any.

    A run personalized under an older protocol may have been personalized again with its own
    settings (``fedbabu personalize``); that folder is the reference then.
    """
    candidates = [(folder, summary)]
    again = default_personalization_out(folder, config)
    if (again / "summary.json").is_file():
        candidates.append((again, json.loads((again / "summary.json").read_text())))
    for where, facts in candidates:
        current = (int(facts.get("personalization_protocol", 1)) == PERSONALIZATION_PROTOCOL
                   and recorded_versions(facts)["evaluation"] == ALGORITHMS[config.algorithm].evaluation_version)
        if current and (where / "clients.csv").is_file():
            return where, facts
    return None


def _reproduction(folder: Path, summary: dict[str, Any], config: Config,
                  curves: dict[int, list[float]]) -> dict[str, Any]:
    """How many clients' re-derived personalization curves equal the run's own, to its 6 decimals."""
    reference = _reference(folder, summary, config)
    if reference is None:
        return {"checked": False, "reason": f"no clients.csv of a personalization under protocol "
                                            f"{PERSONALIZATION_PROTOCOL} in the run folder"}
    saved = _run_curves(reference[0])
    same = sum(1 for c, curve in curves.items() if saved.get(c) == [f"{a:.6f}" for a in curve])
    result: dict[str, Any] = {"checked": True, "identical_clients": same, "clients": len(curves)}
    if reference[0] != folder:
        result["reference"] = str(reference[0])
    return result


def analyze_run(folder: Path, out: Path, probe_size: int = DEFAULT_PROBE_SIZE,
                pairs: int = DEFAULT_PAIR_CLIENTS, overrides: dict[str, Any] | None = None,
                observer: Observer | None = None, label: str | None = None, group: str = "all") -> dict[str, Any]:
    """Analyze one finished run into ``out`` (``analysis.json``, ``analysis.md``, ``clients.csv``, plots).

    ``group`` ``seen`` or ``unseen`` analyzes only the clients the federation could train, or only its
    held-out ones (``holdout_clients``); the probe images stay the whole federation's.
    """
    run = load_trained_run(folder)
    config = personalization_config(run.config, overrides or {}, "analyze")
    analyzed = group_clients(config, config.num_clients, group)
    dataset, partition, global_vector, layout = restore_federation(run, config)
    started = time.perf_counter()
    probe = probe_indices(partition.test, probe_size, config.seed)
    sampled = pair_clients(analyzed, pairs, config.seed)
    train_y, test_y = dataset.train_y.numpy(), dataset.test_y.numpy()
    labels_train = [train_y[idx] for idx in partition.train]
    labels_test = [test_y[idx] for idx in partition.test]
    collect = _Collector(labels_train, labels_test, dataset.num_classes, sampled)
    global_probe = inspect_federation(config, dataset, partition, global_vector, run.personal, probe, collect,
                                      observer, group=group)
    collect.rows.sort(key=lambda row: row["client"])
    global_head = rep.head_geometry(_global_head_weight(config, dataset, layout.to_state(global_vector)))
    spectrum = rep.singular_values(global_probe)
    pair_ids, pair_matrix = _between_clients(collect.pair_features)
    off_diagonal = pair_matrix[~np.eye(len(pair_ids), dtype=bool)]
    probe_result = rep.linear_probe(np.concatenate(collect.probe_train),
                                    np.concatenate([labels_train[c] for c in analyzed]),
                                    np.concatenate(collect.probe_test),
                                    np.concatenate([labels_test[c] for c in analyzed]), config.seed)
    rows = collect.rows

    def column(key: str) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=np.float64)

    analysis: dict[str, Any] = {
        "run": str(run.folder),
        "label": label or run.folder.name,
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "model": config.resolved_model(),
        "seed": config.seed,
        "clients": partition.num_clients,
        "analyzed_clients": len(analyzed),
        **({} if group == "all" else {"client_group": group}),
        "personalization": ALGORITHMS[config.algorithm](config).personalization_note(),
        "settings": {"probe_size": int(probe.size), "pair_clients": len(pair_ids), "probe_C": rep.PROBE_C,
                     "probe_max_iter": rep.PROBE_MAX_ITER, "feature_dim": int(global_probe.shape[1])},
        "reproduces_run": _reproduction(run.folder, run.summary, config, collect.curves),
        "initial_accuracy": mean_std(column("initial_accuracy")),
        "personalized_accuracy": mean_std(column("personalized_accuracy")),
        "nearest_mean": {body: {metric: mean_std(column(f"nearest_mean_{body}_{metric}")) for metric in rep.METRICS}
                         for body in ("global", "personalized")},
        "linear_probe": probe_result,
        "head": {"global": {**global_head, "cosine": global_head["cosine"].tolist()},
                 "personalized": {"norm_cv": mean_std(column("head_norm_cv")),
                                  "mean_abs_cosine": mean_std(column("head_mean_abs_cosine")),
                                  "mean_cosine": (collect.mean_head_cosine / len(rows)).tolist()}},
        "change": {"body": mean_std(column("body_change")), "head": mean_std(column("head_change"))},
        "cka": {"global_vs_personalized": mean_std(column("cka_global_personalized")),
                "between_clients": {"clients": pair_ids, "matrix": pair_matrix.tolist(),
                                    "mean": float(off_diagonal.mean()) if off_diagonal.size else math.nan}},
        "spectrum": {"singular_values": [float(v) for v in spectrum],
                     "effective_rank": rep.effective_rank(spectrum), "rank": rep.numerical_rank(spectrum)},
        "gain": {"correlation_with_classes": rep.correlation(column("classes"), column("gain")),
                 "correlation_with_label_entropy": rep.correlation(column("label_entropy"), column("gain"))},
        "per_client": rows,
    }
    analysis["wall_time_s"] = round(time.perf_counter() - started, 3)
    write_analysis(prepare_output_dir(out, overwrite=True), analysis)
    return analysis


def _common_parent(folders: list[Path]) -> Path:
    return Path(os.path.commonpath([f.resolve() for f in folders]))


def _labels(folders: list[Path]) -> list[str]:
    """Short names for several runs: each folder relative to their common parent, with '-' for '/'."""
    parent = _common_parent(folders)
    return ["-".join(f.resolve().relative_to(parent).parts) or f.resolve().name for f in folders]


def default_out(folders: list[Path], group: str = "all") -> Path:
    """One run: ``RUN/analysis``; several: ``analysis`` in the folder that holds them all; ``analysis-seen``
    or ``analysis-unseen`` for one group of clients."""
    name = ANALYSIS_FOLDER if group == "all" else f"{ANALYSIS_FOLDER}-{group}"
    if len(folders) == 1:
        return Path(folders[0]) / name
    return _common_parent(folders) / name


def analyze(folders: list[Path], out: Path | None = None, probe_size: int = DEFAULT_PROBE_SIZE,
            pairs: int = DEFAULT_PAIR_CLIENTS, overrides: dict[str, Any] | None = None, overwrite: bool = False,
            observer_for: Any = None, group: str = "all") -> Analysis:
    """Analyze one or several finished runs; with several, also write one comparison of them.

    Every run is loaded and checked before anything is computed or written, so a bad folder in
    the list costs nothing. ``observer_for(label)`` gives each run's progress display; ``group``
    (``--clients``) restricts every run to its seen or its unseen clients.
    """
    if not folders:
        raise UserError("analyze: expected at least one run folder")
    if probe_size < 10:
        raise UserError(f"--probe-size: expected at least 10 test images, got {probe_size}")
    if pairs < 2:
        raise UserError(f"--pair-clients: expected at least 2 clients to compare, got {pairs}")
    for key in overrides or {}:
        if key not in FREE_KEYS:
            raise UserError(f"analyze: {key} cannot differ from the trained run; only {', '.join(FREE_KEYS)} may")
    folders = [Path(f) for f in folders]
    if len({f.resolve() for f in folders}) != len(folders):
        raise UserError("analyze: a run folder is given twice")
    for folder in folders:
        run = load_trained_run(folder)
        group_clients(run.config, run.config.num_clients, group)
    out = Path(out) if out is not None else default_out(folders, group)
    if any(out.resolve() == f.resolve() for f in folders):
        raise UserError(f"--out {out}: is a run folder itself; its files are never overwritten, choose another")
    check_output_dir(out, overwrite)
    labels = _labels(folders) if len(folders) > 1 else [folders[0].resolve().name]
    target = prepare_output_dir(out, overwrite)
    results = []
    for folder, label in zip(folders, labels, strict=True):
        where = target if len(folders) == 1 else target / label
        observer = observer_for(label) if observer_for else None
        results.append(analyze_run(folder, where, probe_size, pairs, overrides, observer, label, group))
    if len(folders) > 1:
        write_analysis_comparison(target, results)
    return Analysis(target, results)
