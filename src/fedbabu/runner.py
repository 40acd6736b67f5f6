"""From a configuration to a finished run folder: load data, partition, simulate, write results.

The CLI and the Python API both call these functions, so a run started either way leaves the
same files.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import Config, build_config, merge_dicts, parse_overrides
from fedbabu.data.datasets import Dataset, load_dataset
from fedbabu.data.partition import Partition, make_partition
from fedbabu.engine.simulation import ModelFactory, Observer, RunResult, config_model, simulate
from fedbabu.errors import UserError
from fedbabu.results.files import prepare_output_dir
from fedbabu.results.report import comparison_rows, summarize, write_comparison, write_run


def default_out_dir(kind: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def prepare_data(config: Config) -> Dataset:
    if config.dataset == "custom":
        raise UserError("dataset: 'custom' means data given in Python; pass it as fedbabu.run(config, data=...)")
    return load_dataset(config.dataset, config.data_dir, config.download)


def partition_for(config: Config, dataset: Dataset) -> Partition:
    """The seeded partition of a config: identical for every algorithm run with the same seed."""
    if config.partition == "natural":
        raise UserError("partition: 'natural' comes with the data; build it with fedbabu.from_arrays(..., "
                        "client_ids=...) and pass it as fedbabu.run(config, data=...)")
    return make_partition(
        config.partition,
        dataset.train_y.numpy(),
        dataset.test_y.numpy(),
        num_clients=config.num_clients,
        num_classes=dataset.num_classes,
        seed=config.seed,
        shards_per_client=config.shards_per_client,
        alpha=config.dirichlet_alpha,
        samples_per_client=config.samples_per_client,
    )


@dataclass
class Experiment:
    """A finished run: the in-memory result, its summary and where its files are."""

    result: RunResult
    summary: dict[str, Any]
    folder: Path | None


def run_experiment(config: Config, out: Path | None = None, observer: Observer | None = None,
                   overwrite: bool = False, dataset: Dataset | None = None,
                   partition: Partition | None = None, model_factory: ModelFactory = config_model) -> Experiment:
    """Run one experiment; with ``out`` its folder is written (and must be empty unless ``overwrite``)."""
    folder = prepare_output_dir(out, overwrite) if out is not None else None
    dataset = dataset if dataset is not None else prepare_data(config)
    partition = partition if partition is not None else partition_for(config, dataset)
    result = simulate(config, dataset, partition, observer, model_factory)
    summary = write_run(result, folder) if folder is not None else summarize(result)
    return Experiment(result, summary, folder)


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    experiments: dict[str, list[Experiment]]
    folder: Path


SHARED_BY_ALL = ("dataset", "data_dir", "num_clients", "partition", "shards_per_client", "dirichlet_alpha",
                 "samples_per_client", "seed")
"""Keys that define the dataset and partition, which every compared entry must share."""


def variant_config(config: Config, spec: str) -> Config:
    """The config of one compared entry: ``name`` or ``name:key=value:key=value`` (e.g. ablations).

    ``fedavg:update_part=head`` is FedAvg training only the head; every entry still shares the
    base config's partition, seeds and budget.
    """
    name, *pairs = spec.split(":")
    values = merge_dicts({**config.to_plain(), "algorithm": name}, parse_overrides(pairs))
    variant = build_config(values, f"--algorithms {spec}")
    for key in SHARED_BY_ALL:
        if getattr(variant, key) != getattr(config, key):
            raise UserError(f"--algorithms {spec}: {key} must be the same for every entry (they share one dataset "
                            "and partition); set it with --set instead")
    return variant


def folder_name(spec: str) -> str:
    """A portable folder name for an entry (``fedavg:update_part=head`` -> ``fedavg_update_part-head``)."""
    return re.sub(r"[^\w.-]+", "_", spec.replace("=", "-"))


def run_comparison(config: Config, algorithms: list[str], out: Path, seeds: list[int] | None = None,
                   observer_for: Any = None, overwrite: bool = False, dataset: Dataset | None = None,
                   partition: Partition | None = None, model_factory: ModelFactory = config_model) -> Comparison:
    """Run several algorithms on identical partitions and seeds; write one folder each plus a comparison.

    A given ``partition`` (a natural one, from the Python API) is used for every seed; otherwise each
    seed draws the config's partition.
    """
    seeds = seeds if seeds else [config.seed]
    names = [folder_name(a) for a in algorithms]
    if len(set(names)) != len(names):
        raise UserError(f"--algorithms: each entry must appear once, got {','.join(algorithms)}")
    configs = {a: variant_config(config, a) for a in algorithms}
    for run_config in configs.values():
        ALGORITHMS[run_config.algorithm](run_config)
    folder = prepare_output_dir(out, overwrite)
    dataset = dataset if dataset is not None else prepare_data(config)
    experiments: dict[str, list[Experiment]] = {a: [] for a in algorithms}
    for seed in seeds:
        seed_partition = partition if partition is not None else partition_for(
            config.model_copy(update={"seed": seed}), dataset)
        for algorithm in algorithms:
            run_config = configs[algorithm].model_copy(update={"seed": seed})
            sub = folder / folder_name(algorithm)
            sub = sub if len(seeds) == 1 else sub / f"seed-{seed}"
            observer = observer_for(algorithm, seed) if observer_for else None
            experiments[algorithm].append(
                run_experiment(run_config, sub, observer, overwrite, dataset=dataset, partition=seed_partition,
                               model_factory=model_factory))
    curves = {a: [e.result.accuracy_curve() for e in runs] for a, runs in experiments.items()}
    rows = comparison_rows({a: [e.summary for e in runs] for a, runs in experiments.items()}, curves)
    title = f"{config.dataset} {config.resolved_model()}, {config.num_clients} clients, {config.rounds} rounds"
    write_comparison(rows, curves, folder, title)
    return Comparison(rows, experiments, folder)
