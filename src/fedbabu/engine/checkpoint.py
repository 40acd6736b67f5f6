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

Per-round timings are kept out of ``metrics.jsonl`` (they go to ``timing.jsonl``): wall-clock
seconds can never be reproduced, and keeping them apart lets a resumed run's ``metrics.jsonl``
be byte-for-byte the one of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedbabu.config import Config, build_config, dump_config
from fedbabu.errors import UserError
from fedbabu.files import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
TIMING = "timing.jsonl"
CONFIG = "config.yaml"
TIMING_KEYS = ("seconds",)
FORMAT = "fedbabu-checkpoint"
VERSION = 1

Personal = dict[str, np.ndarray]


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
    personal: dict[int, Personal]
    metrics: list[dict[str, Any]]
    rng: dict[str, Any]


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


def encode(checkpoint: Checkpoint) -> bytes:
    """Serialize a checkpoint: an inner ``torch.save`` payload wrapped with its SHA-256."""
    payload = {
        "config": dump_config(checkpoint.config),
        "rounds_done": checkpoint.rounds_done,
        "sampler": {"seed": checkpoint.config.seed, "next_round": checkpoint.rounds_done},
        "lr_next_round": checkpoint.config.lr_at(checkpoint.rounds_done),
        "global_vector": checkpoint.global_vector.detach().cpu().clone(),
        "personal": {int(c): {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
                     for c, state in checkpoint.personal.items()},
        "metrics": "".join(json.dumps(m) + "\n" for m in checkpoint.metrics),
        "rng": checkpoint.rng,
    }
    inner = io.BytesIO()
    torch.save(payload, inner)
    data = inner.getvalue()
    outer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest(),
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
    if outer.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {outer.get('version')!r}, expected {VERSION}")
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
        personal = {int(c): {k: v.numpy() for k, v in state.items()} for c, state in payload["personal"].items()}
        metrics = [json.loads(line) for line in payload["metrics"].splitlines()]
        checkpoint = Checkpoint(config, int(payload["rounds_done"]), payload["global_vector"], personal, metrics,
                                payload["rng"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not 0 <= checkpoint.rounds_done <= config.rounds or len(metrics) != checkpoint.rounds_done:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({checkpoint.rounds_done} rounds done, "
                              f"{len(metrics)} metric records, {config.rounds} rounds configured)")
    return checkpoint


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it must not resurrect the old file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Keeps a run folder resumable while :func:`~fedbabu.engine.simulation.simulate` runs.

    It appends each round's record to ``metrics.jsonl``/``timing.jsonl`` as soon as the round ends,
    and writes ``checkpoint.pt`` before the first round, every ``checkpoint_every`` rounds and after
    the last one. With ``resume``, the loop continues from that checkpoint instead of round 0.
    """

    def __init__(self, folder: Path, config: Config, resume: Checkpoint | None = None) -> None:
        self.folder = Path(folder)
        self.config = config
        self.resume = resume
        self.path = self.folder / CHECKPOINT
        self.saved_round: int | None = resume.rounds_done if resume is not None else None

    def restore_into(self, global_vector: torch.Tensor, personal: dict[int, Personal],
                     metrics: list[dict[str, Any]]) -> int:
        """Fill the loop's state from the checkpoint (or save the initial one); return the rounds done."""
        if self.resume is None:
            atomic_write_text(self.folder / CONFIG, dump_config(self.config))
            self._rewrite_logs([])
            self.save(0, global_vector, personal, metrics)
            return 0
        saved = self.resume
        if saved.global_vector.shape != global_vector.shape or saved.global_vector.dtype != global_vector.dtype:
            raise CheckpointError(f"{self.path}: holds {tuple(saved.global_vector.shape)} parameters, the model of "
                                  f"this config has {tuple(global_vector.shape)}")
        global_vector.copy_(saved.global_vector)
        personal.clear()
        personal.update(saved.personal)
        metrics[:] = saved.metrics
        restore_rng(saved.rng)
        self._rewrite_logs(saved.metrics)
        return saved.rounds_done

    def after_round(self, rounds_done: int, global_vector: torch.Tensor, personal: dict[int, Personal],
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

    def save(self, rounds_done: int, global_vector: torch.Tensor, personal: dict[int, Personal],
             metrics: list[dict[str, Any]]) -> None:
        data = encode(Checkpoint(self.config, rounds_done, global_vector, personal, metrics, capture_rng()))
        atomic_write_bytes(self.path, data)
        _fsync_dir(self.folder)
        self.saved_round = rounds_done

    def _rewrite_logs(self, metrics: list[dict[str, Any]]) -> None:
        """Drop records of rounds after the checkpoint: they are recomputed, identically, on resume."""
        atomic_write_text(self.folder / METRICS, "".join(metrics_line(m) for m in metrics))
        atomic_write_text(self.folder / TIMING, "".join(timing_line(m) for m in metrics))
