"""From a configuration to a finished run folder: load data, partition, simulate, write results.

The CLI and the Python API both call these functions, so a run started either way leaves the
same files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import Config, build_config, merge_dicts, parse_overrides
from fedbabu.data.datasets import Dataset, load_dataset
from fedbabu.data.hf import load_hf, natural_partition
from fedbabu.data.partition import Partition, make_partition
from fedbabu.engine.checkpoint import CHECKPOINT, METRICS, TIMING, Checkpoint, Checkpointer, load_checkpoint
from fedbabu.engine.faults import TrainingDiverged
from fedbabu.engine.privacy import rounds_to_run
from fedbabu.engine.simulation import ModelFactory, Observer, RunResult, config_model, preflight, simulate
from fedbabu.errors import UserError
from fedbabu.files import check_output_dir, prepare_output_dir
from fedbabu.results.report import comparison_rows, summarize, write_comparison, write_run


def default_out_dir(kind: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def prepare_data(config: Config) -> Dataset:
    if config.dataset == "custom":
        raise UserError("dataset: 'custom' means data given in Python; pass it as fedbabu.run(config, data=...)")
    if config.dataset == "hf":
        return load_hf(config).dataset
    return load_dataset(config.dataset, config.data_dir, config.download)


def partition_for(config: Config, dataset: Dataset) -> Partition:
    """The seeded partition of a config: identical for every algorithm run with the same seed.

    A natural partition is the data's own (``hf.partition_column``), the same for every seed.
    """
    if config.partition == "natural" and config.dataset == "hf":
        return natural_partition(config)
    if config.partition == "natural":
        raise UserError("partition: 'natural' comes with the data: name its column (dataset: hf, "
                        "hf.partition_column), or build it with fedbabu.from_arrays(..., client_ids=...) and pass it "
                        "as fedbabu.run(config, data=...)")
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
    """Run one experiment; with ``out`` its folder is written (and must be empty unless ``overwrite``).

    Everything that can refuse the run (the folder, the data, the partition, the algorithm's
    settings) is checked before the folder is created or an earlier run in it is removed.
    """
    if out is not None:
        check_output_dir(out, overwrite)
    dataset = dataset if dataset is not None else prepare_data(config)
    partition = partition if partition is not None else partition_for(config, dataset)
    preflight(config, dataset, model_factory)
    folder = prepare_output_dir(out, overwrite) if out is not None else None
    with run_folder(folder):
        if folder is not None:
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        checkpoints = Checkpointer(folder, config) if folder is not None else None
        result = simulate(config, dataset, partition, observer, model_factory, checkpoints)
        summary = write_run(result, folder) if folder is not None else summarize(result)
    if observer is not None:
        observer.on_finish(summary)
    return Experiment(result, summary, folder)


_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    """Forked workers must not keep a run folder's lock alive (e.g. orphaned after the main process is killed).

    Closing a duplicate of the descriptor in the child leaves the parent's lock in place.
    """
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def run_folder(folder: Path | None) -> Iterator[None]:
    """Hold a run folder for the duration of a run: one writer at a time, and an event log.

    The lock (``flock`` on the folder itself, released by the kernel even after SIGKILL) stops a
    second ``resume`` or ``--overwrite`` from writing into a run that is still going. The run's
    warnings (rejected updates, empty rounds) and a divergence are copied to ``<run>/events.log``.
    """
    if folder is None:
        yield
        return
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"{folder}: another fedbabu process is writing this run folder; wait for it or stop it "
                        "first") from None
    _HELD_LOCKS.add(lock)
    handler = logging.FileHandler(Path(folder) / "events.log", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("fedbabu")
    logger.addHandler(handler)
    try:
        yield
    except TrainingDiverged as err:
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, str(err), None, None))
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        _HELD_LOCKS.discard(lock)
        os.close(lock)


RUN_FILES = (CHECKPOINT, METRICS, TIMING, "events.log", "summary.json", "clients.csv", "model.pt", "partition.json",
             "report.md", "rounds.png", "clients.png", "finetune.png")
"""Files a run writes: removed when a run starts over in a folder (``--overwrite``), so none outlives its run."""

RESUME_FREE_KEYS = tuple(key for key in Config.keys_with_role("runtime") if key != "device")
"""Settings that may change on resume: the ``runtime`` ones, which cannot change any result (results never
depend on workers), except ``device``: another device gives other floating-point results (and ``executor:
auto`` picks another executor on CUDA), so the resumed run would not be bit-identical to an uninterrupted one."""


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Config, given: Config) -> list[str]:
    """Keys (dotted) whose values differ between two configs, ignoring the resume-free ones."""
    a, b = _flat(saved.to_plain()), _flat(given.to_plain())
    return [k for k in a if k not in RESUME_FREE_KEYS and a[k] != b.get(k)]


def open_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint of a run folder, or a one-line error saying why there is none to resume."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder to resume")
    if not (folder / CHECKPOINT).exists():
        raise UserError(f"{folder}: no {CHECKPOINT} to resume from (expected a folder written by fedbabu run)")
    return load_checkpoint(folder / CHECKPOINT)


def resume_experiment(folder: Path, given: Config | None = None, observer: Observer | None = None,
                      overrides: dict[str, Any] | None = None) -> Experiment:
    """Continue an interrupted run from its latest checkpoint, to the files an uninterrupted run writes.

    ``given`` (the config the user passed, if any) must equal the saved one except for
    :data:`RESUME_FREE_KEYS`; ``overrides`` may set those keys.
    """
    folder = Path(folder)
    with run_folder(folder if folder.is_dir() else None):
        return _resume_locked(folder, given, observer, overrides)


def _resume_locked(folder: Path, given: Config | None, observer: Observer | None,
                   overrides: dict[str, Any] | None) -> Experiment:
    checkpoint = open_checkpoint(folder)
    config = checkpoint.config
    current = ALGORITHMS[config.algorithm].training_version
    if checkpoint.training_version != current:
        raise UserError(f"--resume {folder}: the run was trained by {config.algorithm} training version "
                        f"{checkpoint.training_version}, and this build trains version {current}; finishing it here "
                        "would mix the two: start it again (fedbabu run --overwrite), or resume it with the build "
                        "that started it")
    if given is not None:
        differences = config_differences(config, given)
        if differences:
            key = differences[0]
            saved_value, given_value = _flat(config.to_plain())[key], _flat(given.to_plain()).get(key)
            raise UserError(
                f"--resume {folder}: the run was started with a different config ({key} is {saved_value!r} there, "
                f"{given_value!r} here); resume without --config/--set, or start a new run in another folder")
    free = {k: v for k, v in (overrides or {}).items() if k in RESUME_FREE_KEYS and v is not None}
    if free:
        config = build_config({**config.to_plain(), **free}, "resume options")
        checkpoint.config = config
    if checkpoint.rounds_done == rounds_to_run(config) and (folder / "summary.json").exists():
        raise UserError(f"{folder}: this run already finished all {checkpoint.rounds_done} rounds; nothing to resume")
    prepare_output_dir(folder, overwrite=True)
    dataset = prepare_data(config)
    partition = partition_for(config, dataset)
    result = simulate(config, dataset, partition, observer, checkpoints=Checkpointer(folder, config, checkpoint))
    summary = write_run(result, folder)
    if observer is not None:
        observer.on_finish(summary)
    return Experiment(result, summary, folder)


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    experiments: dict[str, list[Experiment]]
    folder: Path


SHARED_BY_ALL = tuple(key for key, role in Config.roles().items() if role == "data" or key == "data_dir")
"""Keys that define the dataset and partition (the ``data`` role), which every compared entry must share, and
``data_dir``: the comparison loads the one dataset from the base config's folder."""


def variant_config(config: Config, spec: str) -> Config:
    """The config of one compared entry: ``name`` or ``name:key=value:key=value`` (e.g. ablations).

    ``fedavg:update_part=head`` is FedAvg training only the head: a key the algorithm's own settings
    have may be written without its ``fedavg.`` prefix. Every entry still shares the base config's
    partition, seeds and budget.
    """
    name, *pairs = spec.split(":")
    own = ALGORITHMS[name].Settings.model_fields if name in ALGORITHMS else {}
    fields = set(own) | {info.alias for info in own.values() if info.alias}
    pairs = [f"{name}.{pair}" if pair.split("=", 1)[0].strip() in fields else pair for pair in pairs]
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
    seed draws the config's partition. An entry that starts from another algorithm's run (LG-FedAvg
    from FedAvg's) and names none starts from the comparison's own entry of that algorithm with the
    base settings, run first, or else from such a run made for it in ``<out>/<algorithm>-phase``.
    """
    seeds = seeds if seeds else [config.seed]
    names = [folder_name(a) for a in algorithms]
    if len(set(names)) != len(names):
        raise UserError(f"--algorithms: each entry must appear once, got {','.join(algorithms)}")
    configs = {a: variant_config(config, a) for a in algorithms}
    warm_starts = {a: warm for a, c in configs.items() if (warm := ALGORITHMS[c.algorithm].warm_start) is not None}
    phases = {a: variant_config(config, warm.algorithm) for a, warm in warm_starts.items()
              if warm.folder(configs[a]) is None}
    starts = {a: next((e for e in algorithms if configs[e] == phase), f"{phase.algorithm}-phase")
              for a, phase in phases.items()}
    extra = {starts[a]: phases[a] for a in phases if starts[a] not in configs}
    check_output_dir(out, overwrite)
    dataset = dataset if dataset is not None else prepare_data(config)
    for run_config in [*configs.values(), *extra.values()]:
        preflight(run_config, dataset, model_factory)
    for a in warm_starts.keys() - phases.keys():  # a warm start the user named must suit every seed
        for seed in seeds:
            preflight(configs[a].model_copy(update={"seed": seed}), dataset, model_factory)
    partitions = {seed: partition if partition is not None else partition_for(
        config.model_copy(update={"seed": seed}), dataset) for seed in seeds}
    folder = prepare_output_dir(out, overwrite)
    experiments: dict[str, list[Experiment]] = {a: [] for a in algorithms}
    order = [*extra, *sorted(algorithms, key=lambda a: a not in starts.values())]  # what others start from first
    for seed, seed_partition in partitions.items():
        subs = {name: folder / folder_name(name) if len(seeds) == 1 else folder / folder_name(name) / f"seed-{seed}"
                for name in order}
        for name in order:
            run_config = {**configs, **extra}[name].model_copy(update={"seed": seed})
            if name in phases:
                run_config = warm_starts[name].with_folder(run_config, subs[starts[name]])
            observer = observer_for(name, seed) if observer_for else None
            experiment = run_experiment(run_config, subs[name], observer, overwrite, dataset=dataset,
                                        partition=seed_partition, model_factory=model_factory)
            if name in experiments:
                experiments[name].append(experiment)
    curves = {a: [e.result.accuracy_curve() for e in runs] for a, runs in experiments.items()}
    rows = comparison_rows({a: [e.summary for e in runs] for a, runs in experiments.items()}, curves)
    title = f"{config.dataset} {config.resolved_model()}, {config.num_clients} clients, {config.rounds} rounds"
    write_comparison(rows, curves, folder, title)
    return Comparison(rows, experiments, folder)
