"""Checkpoints that let an interrupted run continue to bit-identical results.

What a run's future depends on, once a round has finished: the global vector, every client's
personal state, the number of rounds done (which also fixes the lr schedule position) and the
metrics written so far. Every random stream of the engine (client sampling, dropouts, batch
order, augmentation, personalization) is derived from (seed, round, client), so no hidden
generator state carries over between rounds; the global torch/numpy/python generator states and
the sampler's position are saved and restored anyway, so that code which does use them (a
custom algorithm, say) also resumes exactly.

The file is a ``torch.save`` of plain containers and tensors, loaded only with
``weights_only=True`` (loading never runs code). The payload is stored with its SHA-256, so a
truncated or tampered file is refused with a one-line error naming it. It is written to a
temporary file, fsynced and renamed over the previous checkpoint, which therefore stays intact
until the new one is complete.

The clients' personal states are not inside it (format version 2): they are the files of the
run's :class:`~fedbabu.engine.personal.PersonalStore` in ``personal/``, which the checkpoint
references (client -> file name, SHA-256, size). Files are never changed once written and a changed
state gets a new one, so a checkpoint writes only the states changed since the previous one (a
round touches ten clients, not the federation), and :func:`write_checkpoint` writes in the order
that keeps a complete checkpoint on disk whatever moment a kill comes: the new state files, then
``checkpoint.pt`` (renamed over the old one), then the removal of files no checkpoint references.
Version-1 files of earlier builds, which embed the states, are still read.

Per-round timings are kept out of ``metrics.jsonl`` (they go to ``timing.jsonl``): wall-clock
seconds can never be reproduced, and keeping them apart lets a resumed run's ``metrics.jsonl``
be byte-for-byte the one of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedbabu.algorithms import ALGORITHMS
from fedbabu.config import Config, build_config, dump_config
from fedbabu.engine.personal import (
    PERSONAL_FOLDER,
    Personal,
    PersonalStateError,
    PersonalStore,
    StateFile,
    describe_state,
    encode_state,
    verify_state_file,
)
from fedbabu.errors import UserError
from fedbabu.files import atomic_write_bytes, atomic_write_text, fsync_folder

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
TIMING = "timing.jsonl"
CONFIG = "config.yaml"
TIMING_KEYS = ("seconds", "utilization")
"""Wall-clock values of a round record: ``utilization`` is the share of the workers' time spent in
client tasks (1.0: no worker waited for the round's last client or for the server)."""
FORMAT = "fedbabu-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 (earlier builds) embeds every client's personal state; version 2 references their files."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, foreign, or does not belong to the given config."""


def metrics_line(record: dict[str, Any]) -> str:
    """The reproducible part of a round record, as one strict JSON line of ``metrics.jsonl``.

    A value that is not a finite number (the loss of a round in which no update was accepted) is
    written as ``null``: ``NaN`` is not JSON, and other tools reading the file would refuse it.
    """
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items() if k not in TIMING_KEYS}, allow_nan=False) + "\n"


def timing_line(record: dict[str, Any]) -> str:
    """The wall-clock part of a round record, as one JSON line of ``timing.jsonl``."""
    return json.dumps({"round": record["round"], **{k: record[k] for k in TIMING_KEYS if k in record}}) + "\n"


@dataclass
class Checkpoint:
    """The content of a checkpoint file."""

    config: Config
    rounds_done: int
    global_vector: torch.Tensor
    personal: Mapping[int, Personal]
    """Loaded from version 2, a :class:`PersonalStore` over the referenced files; from version 1, a dict."""
    metrics: list[dict[str, Any]]
    rng: dict[str, Any]
    training_version: int = 0
    """The training version of the algorithm that wrote it (0: the current one, when it is being written;
    1 for a checkpoint of a build that recorded none)."""

    def __post_init__(self) -> None:
        if not self.training_version:
            self.training_version = ALGORITHMS[self.config.algorithm].training_version


def capture_rng() -> dict[str, Any]:
    """The global generator states of torch, numpy and python, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def encode(checkpoint: Checkpoint, personal_files: Mapping[int, StateFile] | None = None) -> bytes:
    """Serialize a checkpoint: an inner ``torch.save`` payload wrapped with its SHA-256.

    The personal states are referenced by their files (``personal_files``; by default those their
    content names), which must exist beside it for the checkpoint to load: :func:`write_checkpoint`
    writes both.
    """
    if personal_files is None:
        personal_files = {c: describe_state(c, encode_state(state)) for c, state in checkpoint.personal.items()}
    payload = {
        "config": dump_config(checkpoint.config),
        "rounds_done": checkpoint.rounds_done,
        "sampler": {"seed": checkpoint.config.seed, "next_round": checkpoint.rounds_done},
        "lr_next_round": checkpoint.config.lr_at(checkpoint.rounds_done),
        "global_vector": checkpoint.global_vector.detach().cpu().clone(),
        "personal_files": {int(c): {"name": f.name, "sha256": f.sha256, "size": f.size}
                           for c, f in sorted(personal_files.items())},
        "metrics": "".join(json.dumps(m) + "\n" for m in checkpoint.metrics),
        "rng": checkpoint.rng,
        "training_version": checkpoint.training_version,
    }
    return seal(payload, VERSION)


def seal(payload: dict[str, Any], version: int) -> bytes:
    """A payload as a checkpoint file: its ``torch.save`` bytes wrapped with their SHA-256 and the format version."""
    inner = io.BytesIO()
    torch.save(payload, inner)
    data = inner.getvalue()
    outer = io.BytesIO()
    torch.save({"format": FORMAT, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
                "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, outer)
    return outer.getvalue()


def _load_weights_only(source: Any, path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}); it is truncated, "
                              "damaged or not a fedbabu checkpoint") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint; every way it can be wrong is one :class:`CheckpointError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint file, found a folder")
    outer = _load_weights_only(path, path)
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedbabu checkpoint (expected a file written by fedbabu run)")
    version = outer.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, expected {VERSION} (or 1, from "
                              "earlier builds)")
    blob = outer.get("payload")
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise CheckpointError(f"{path}: damaged checkpoint (no payload)")
    data = blob.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch; the checkpoint was damaged or modified after it was "
                              "written")
    payload = _load_weights_only(io.BytesIO(data), path)
    try:
        config = build_config(yaml.safe_load(payload["config"]), f"{path} (saved config)")
        if version == 1:
            personal: Mapping[int, Personal] = {int(c): {k: v.numpy() for k, v in state.items()}
                                                for c, state in payload["personal"].items()}
        else:
            files = {int(c): StateFile(str(f["name"]), str(f["sha256"]), int(f["size"]))
                     for c, f in payload["personal_files"].items()}
            personal = PersonalStore.open(path.parent / PERSONAL_FOLDER, files, config.resolved_personal_memory())
        metrics = [json.loads(line) for line in payload["metrics"].splitlines()]
        checkpoint = Checkpoint(config, int(payload["rounds_done"]), payload["global_vector"], personal, metrics,
                                payload["rng"], int(payload.get("training_version", 1)))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not 0 <= checkpoint.rounds_done <= config.rounds or len(metrics) != checkpoint.rounds_done:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({checkpoint.rounds_done} rounds done, "
                              f"{len(metrics)} metric records, {config.rounds} rounds configured)")
    if version != 1:
        for client, file in files.items():
            try:
                verify_state_file(path.parent / PERSONAL_FOLDER, client, file)
            except PersonalStateError as err:
                raise CheckpointError(f"{err}; {path} references it") from None
    return checkpoint


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint into a run folder so that a kill at any moment leaves a complete one.

    First the state files the folder lacks (new names; none the current checkpoint references is
    touched), then ``checkpoint.pt``, renamed over the old one, then the removal of the files no
    checkpoint references any more. Until the rename the old checkpoint is complete; after it, the
    new one. ``checkpoint.personal`` is the run's store of this folder, or any mapping of states
    (all written, then).
    """
    folder = Path(folder)
    store = checkpoint.personal
    own = isinstance(store, PersonalStore) and store.folder is not None and \
        store.folder.resolve() == (folder / PERSONAL_FOLDER).resolve()
    if not own:
        store = PersonalStore(checkpoint.config.resolved_personal_memory(), folder / PERSONAL_FOLDER)
        store.update(checkpoint.personal)
    files = store.files_for_checkpoint()
    atomic_write_bytes(folder / CHECKPOINT, encode(checkpoint, files))
    fsync_folder(folder)
    store.checkpointed(files)


class Checkpointer:
    """Keeps a run folder resumable while :func:`~fedbabu.engine.simulation.simulate` runs.

    It appends each round's record to ``metrics.jsonl``/``timing.jsonl`` as soon as the round ends,
    and writes ``checkpoint.pt`` before the first round, every ``checkpoint_every`` rounds and after
    the last one. With ``resume``, the loop continues from that checkpoint instead of round 0. The
    loop keeps its clients' states in a :class:`PersonalStore` of :attr:`personal_folder`, whose
    files the checkpoints reference.
    """

    def __init__(self, folder: Path, config: Config, resume: Checkpoint | None = None) -> None:
        self.folder = Path(folder)
        self.config = config
        self.resume = resume
        self.path = self.folder / CHECKPOINT
        self.personal_folder = self.folder / PERSONAL_FOLDER
        self.saved_round: int | None = resume.rounds_done if resume is not None else None

    def restore_into(self, global_vector: torch.Tensor, personal: PersonalStore,
                     metrics: list[dict[str, Any]]) -> int:
        """Fill the loop's state from the checkpoint (or save the initial one); return the rounds done.

        ``personal`` is the loop's empty store of :attr:`personal_folder`. A new run first removes
        state files an earlier run in the folder left (``--overwrite``), so none can pass for its own.
        """
        if self.resume is None:
            atomic_write_text(self.folder / CONFIG, dump_config(self.config))
            self._rewrite_logs([])
            personal.remove_unreferenced()
            self.save(0, global_vector, personal, metrics)
            return 0
        saved = self.resume
        if saved.global_vector.shape != global_vector.shape or saved.global_vector.dtype != global_vector.dtype:
            raise CheckpointError(f"{self.path}: holds {tuple(saved.global_vector.shape)} parameters, the model of "
                                  f"this config has {tuple(global_vector.shape)}")
        global_vector.copy_(saved.global_vector)
        personal.restore(saved.personal)
        metrics[:] = saved.metrics
        restore_rng(saved.rng)
        self._rewrite_logs(saved.metrics)
        return saved.rounds_done

    def after_round(self, rounds_done: int, global_vector: torch.Tensor, personal: PersonalStore,
                    metrics: list[dict[str, Any]]) -> None:
        """Log the round just finished; checkpoint if one is due."""
        record = metrics[-1]
        with open(self.folder / METRICS, "a") as out:
            out.write(metrics_line(record))
        with open(self.folder / TIMING, "a") as out:
            out.write(timing_line(record))
        every = self.config.checkpoint_every
        if rounds_done == self.config.rounds or (every and rounds_done % every == 0):
            self.save(rounds_done, global_vector, personal, metrics)

    def save(self, rounds_done: int, global_vector: torch.Tensor, personal: PersonalStore,
             metrics: list[dict[str, Any]]) -> None:
        write_checkpoint(self.folder, Checkpoint(self.config, rounds_done, global_vector, personal, metrics,
                                                 capture_rng()))
        self.saved_round = rounds_done

    def _rewrite_logs(self, metrics: list[dict[str, Any]]) -> None:
        """Drop records of rounds after the checkpoint: they are recomputed, identically, on resume."""
        atomic_write_text(self.folder / METRICS, "".join(metrics_line(m) for m in metrics))
        atomic_write_text(self.folder / TIMING, "".join(timing_line(m) for m in metrics))
