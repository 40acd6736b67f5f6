"""Personalize a finished run again without training it again (``fedbabu personalize RUN``).

Fine-tuning is the cheap end of an experiment: the paper's studies of which part to fine-tune and
how fast personalization is all vary it on one trained federation. This module loads what a
run's folder keeps of its end state (the final global model, every client's personal state and the
partition), changes only the fine-tuning settings, and personalizes every client again on the
worker pool. Only settings that cannot change what was trained may differ from the run; the run's
own files are never written.

``--model initial`` personalizes the same clients from the run's initial model instead, the seed's
draw before any round, with no personal state: what fine-tuning alone reaches without the federation,
the reference against which a study (a private federation, say) shows what training added.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedbabu.algorithms import ALGORITHMS
from fedbabu.algorithms.base import recorded_versions
from fedbabu.config import Config, build_config, merge_dicts, read_yaml
from fedbabu.data.datasets import Dataset
from fedbabu.data.partition import Partition
from fedbabu.engine import hardware
from fedbabu.engine.checkpoint import CHECKPOINT, CONFIG, METRICS, load_checkpoint
from fedbabu.engine.contract import keeps_client_state
from fedbabu.engine.params import Layout, flatten, flatten_tensors
from fedbabu.engine.privacy import rounds_to_run
from fedbabu.engine.simulation import (
    CLIENT_GROUPS,
    Observer,
    Personal,
    RunResult,
    client_records,
    network,
    personalize_federation,
    personalized_clients,
    preflight,
)
from fedbabu.errors import UserError
from fedbabu.files import check_output_dir, load_tensors, prepare_output_dir
from fedbabu.results.rebuild import read_metrics
from fedbabu.results.report import write_personalization
from fedbabu.runner import Experiment, partition_for, prepare_data

log = logging.getLogger("fedbabu")

FREE_KEYS = Config.keys_with_role("runtime")
"""Where the data are and what computes (the ``runtime`` role): what ``fedbabu analyze`` may change."""

MODELS = ("final", "initial")
"""Which global model ``fedbabu personalize`` starts the clients from (``--model``): the trained one, or the run's
initial one, before any round."""

PERSONALIZE_KEYS = Config.keys_with_role("evaluation", "runtime")
"""What ``fedbabu personalize`` may change: how the final model is personalized and tested (``finetune.*``,
``eval_batch_size``) and where it runs; none can change what was trained."""

PERSONALIZE_FOLDER = "personalize"


@dataclass
class TrainedRun:
    """The end state of a finished run, as its folder keeps it."""

    folder: Path
    config: Config
    model_state: dict[str, torch.Tensor]
    personal: Mapping[int, Personal]
    """The final checkpoint's states: read from ``personal/`` when asked for, or embedded (earlier builds)."""
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def load_trained_run(folder: Path) -> TrainedRun:
    """Read a finished run folder, or say in one line why it cannot be personalized again.

    The final global model comes from ``model.pt`` and the clients' personal state from the final
    checkpoint: the files of ``personal/`` it references (verified, then read one client at a time),
    or, in a folder of an earlier build, the checkpoint itself (format version 1, which embeds the
    states). A run whose algorithm keeps no personal state needs no checkpoint, and the partition
    (``partition.json``) can be drawn again from the config. So a folder reduced to config, summary
    and model (as the repository keeps the results page's runs) is enough.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder")
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder}: not a run folder (no {CONFIG}); expected a folder written by fedbabu run")
    config = build_config(read_yaml(folder / CONFIG), str(folder / CONFIG))
    for name in ("summary.json", "model.pt"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: the run has not finished (no {name}); finish it with fedbabu resume "
                            f"{folder} first")
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"{folder / 'summary.json'}: not valid JSON") from None
    personal: Mapping[int, Personal] = {}
    if keeps_client_state(ALGORITHMS[config.algorithm](config)):
        if "flower" in summary:
            raise UserError(f"{folder}: a Flower run of {config.algorithm}, whose per-client parts stay on the "
                            "nodes; only Flower runs of algorithms without them can be personalized again here")
        if not (folder / CHECKPOINT).is_file():
            raise UserError(f"{folder}: no {CHECKPOINT}; {config.algorithm} keeps per-client parts that only the "
                            "final checkpoint holds")
        checkpoint = load_checkpoint(folder / CHECKPOINT)
        last = rounds_to_run(config)
        if checkpoint.rounds_done != last:
            raise UserError(f"{folder / CHECKPOINT}: holds round {checkpoint.rounds_done} of {last}, not the end of "
                            "the run")
        personal = checkpoint.personal
    return TrainedRun(folder, config, load_tensors(folder / "model.pt"), personal, read_metrics(folder / METRICS),
                      summary)


def personalization_config(run: Config, overrides: dict[str, Any], source: str = "--set") -> Config:
    """The run's config with new fine-tuning settings; any key that shaped the training is refused.

    Besides :data:`PERSONALIZE_KEYS` (``finetune.*``, ``eval_batch_size`` and where things run), the run's
    algorithm's evaluation settings (``evaluation_keys``, e.g. which of its protocols evaluates it) may differ.
    """
    evaluation = ALGORITHMS[run.algorithm].Settings.evaluation_keys
    for key, value in overrides.items():
        if key in PERSONALIZE_KEYS and (key != "finetune" or isinstance(value, dict)):
            continue
        if key == run.algorithm and isinstance(value, dict) and set(value) <= set(evaluation):
            continue
        shown = key if not isinstance(value, dict) else f"{key}.{next(iter(value), '')}"
        allowed = ["finetune.*", *(f"{run.algorithm}.{k}" for k in evaluation),
                   *(k for k in Config.keys_with_role("evaluation") if k != "finetune")]
        raise UserError(f"{source} {shown}: only {', '.join(allowed)}, workers and device may differ from the "
                        "trained run (this key changes what was trained); start a new run for it")
    return build_config(merge_dicts(run.to_plain(), overrides), f"{source} (personalize)")


def settings_name(config: Config) -> str:
    """A folder name that says which fine-tuning produced the results in it.

    An algorithm's evaluation settings appear only where they differ from its defaults
    (``...-evaluation-common``), so the usual name stays short and unchanged.
    """
    ft = config.finetune
    own = config.settings_for(config.algorithm)
    defaults = type(own)()
    evaluation = "".join(f"-{key}-{getattr(own, key)}" for key in own.evaluation_keys
                         if getattr(own, key) != getattr(defaults, key))
    return (f"{ft.part}-{ft.epochs}ep-lr{ft.lr:g}-mom{ft.momentum:g}-wd{ft.weight_decay:g}-bs{ft.batch_size}"
            + evaluation)


def default_out(run_folder: Path, config: Config, group: str = "all", model: str = "final") -> Path:
    """``<run>/personalize/<settings>``, ``-seen`` or ``-unseen`` added for one group of clients and
    ``-initial-model`` for the untrained model, so that neither ever takes the place of the whole trained
    federation's results."""
    suffix = ("" if group == "all" else f"-{group}") + ("" if model == "final" else f"-{model}-model")
    return Path(run_folder) / PERSONALIZE_FOLDER / (settings_name(config) + suffix)


def initial_global_vector(config: Config, dataset: Dataset) -> torch.Tensor:
    """The run's global parameters before its first round, drawn again from its seed (or its warm start's
    model, for an algorithm that starts from one), exactly as the run itself began."""
    return flatten(preflight(config, dataset)[2])


def group_clients(config: Config, num_clients: int, group: str) -> list[int]:
    """The run's personalized clients in ``group`` (``--clients``), or a one-line error where there are none."""
    if group not in CLIENT_GROUPS:
        raise UserError(f"--clients {group}: expected one of {', '.join(CLIENT_GROUPS)}")
    if group == "unseen" and config.resolved_holdout() == 0:
        raise UserError("--clients unseen: the run held out no clients (holdout_clients=0); train one with "
                        "--set holdout_clients=N to have unseen clients")
    clients = personalized_clients(config, num_clients, group)
    if not clients:
        raise UserError(f"--clients {group}: none of the run's {config.personalize_clients} personalized clients "
                        f"(personalize_clients) is {group}")
    return clients


def _partition(run: TrainedRun, config: Config, dataset: Dataset) -> Partition:
    """The run's own partition, checked against the data: a changed dataset must not pass silently.

    Without ``partition.json`` the seeded partition is drawn again and must give the run's own
    one-line partition summary.
    """
    path = run.folder / "partition.json"
    if not path.is_file():
        partition = partition_for(config, dataset)
        if partition.summary() != run.summary.get("partition"):
            raise UserError(f"{run.folder}: no partition.json, and the partition drawn again from the config differs "
                            "from the run's (summary.json); point --data-dir at the data the run was trained on")
        return partition
    try:
        partition = Partition.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable partition ({exc.__class__.__name__})") from None
    labels = dataset.train_y.numpy()
    for client, indices in enumerate(partition.train):
        if indices.size and (indices.max() >= len(labels) or not np.array_equal(
                np.bincount(labels[indices], minlength=dataset.num_classes), partition.train_counts[client])):
            raise UserError(f"{path}: client {client}'s samples do not match the {dataset.name} data found now; "
                            "point --data-dir at the data the run was trained on")
    return partition


def restore_federation(run: TrainedRun, config: Config) -> tuple[Dataset, Partition, torch.Tensor, Layout]:
    """The data, partition and final global parameters of a trained run, each checked against the run.

    Shared by everything that works on a finished federation (personalizing it again, analyzing
    it): a run trained on data or a network given in Python is refused, since its folder holds neither.
    """
    if config.dataset == "custom" or config.model == "custom":
        raise UserError(f"{run.folder}: the run trained on data or a network given in Python, which its folder "
                        "does not hold; work from the Results object of fedbabu.run instead")
    hardware.warn_if_kernels_differ(run.summary.get("environment", {}).get("cpu_kernels"), config.resolved_device())
    dataset = prepare_data(config)
    partition = _partition(run, config, dataset)
    layout = Layout(network(config, dataset))
    missing = [name for name in layout.names if name not in run.model_state]
    if missing:
        raise UserError(f"{run.folder / 'model.pt'}: lacks {missing[0]}; it does not belong to this run's network")
    return dataset, partition, flatten_tensors(run.model_state[name] for name in layout.names), layout


def personalize_run(folder: Path, overrides: dict[str, Any] | None = None, out: Path | None = None,
                    overwrite: bool = False, observer: Observer | None = None,
                    source: str = "--set", group: str = "all", model: str = "final") -> tuple[Experiment, Dataset]:
    """Personalize the clients of a finished run again; write the results to their own folder.

    They are the run's own: every client, or the run's seeded sample (``personalize_clients``); with
    ``group`` ``seen`` or ``unseen`` only those of them the federation could train, or only its held-out ones.
    ``model`` ``initial`` starts them from the run's initial model with no personal state (:data:`MODELS`).

    ``overrides`` is a nested dict of ``finetune`` settings (plus workers, device, data folder).
    ``out`` defaults to ``<run>/personalize/<settings>``. With the run's own settings the clients'
    accuracies are bit-identical to the run's ``clients.csv``. Returns the experiment (its result
    and summary) and the dataset, which the Python API needs to rebuild the model.
    """
    run = load_trained_run(folder)
    trained_by = recorded_versions(run.summary)["training"]
    if trained_by != ALGORITHMS[run.config.algorithm].training_version:
        log.warning("%s: trained by %s training version %d, and this build trains version %d; its clients are "
                    "personalized as this build does, on the model the older version trained", run.folder,
                    run.config.algorithm, trained_by, ALGORITHMS[run.config.algorithm].training_version)
    if model not in MODELS:
        raise UserError(f"--model {model}: expected one of {', '.join(MODELS)}")
    config = personalization_config(run.config, overrides or {}, source)
    clients = group_clients(config, config.num_clients, group)
    out = Path(out) if out is not None else default_out(run.folder, config, group, model)
    if out.resolve() == run.folder.resolve():
        raise UserError(f"--out {out}: is the run folder itself; its files are never overwritten, choose another")
    check_output_dir(out, overwrite)
    dataset, partition, global_vector, layout = restore_federation(run, config)
    personal = run.personal
    if model == "initial":
        global_vector, personal = initial_global_vector(config, dataset), {}
    started = time.perf_counter()
    curves = personalize_federation(config, dataset, partition, global_vector, personal, observer, group=group)
    result = RunResult(config=config, partition=partition, metrics=run.metrics if model == "final" else [],
                       clients=client_records(partition, curves, clients),
                       final_state=layout.to_state(global_vector),
                       personal=personal, wall_time_s=float(run.summary.get("wall_time_s", 0.0)),
                       bytes_per_round_per_client=int(run.summary.get("bytes_per_round_per_client", 0)))
    seconds = time.perf_counter() - started
    target = prepare_output_dir(out, overwrite)
    summary = write_personalization(result, target, run.folder, seconds, group, model)
    return Experiment(result, summary, target), dataset


def saved_config(folder: Path) -> Config | None:
    """The config a personalization folder was made with, or None where there is none to read."""
    path = Path(folder) / CONFIG
    if not path.is_file() or not (Path(folder) / "summary.json").is_file():
        return None
    try:
        return build_config(yaml.safe_load(path.read_text()), str(path))
    except (UserError, yaml.YAMLError):
        return None
