"""Watching a run while it trains: several observers at once, and TensorBoard scalars."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedbabu.algorithms import Algorithm
from fedbabu.config import Config
from fedbabu.data.partition import Partition
from fedbabu.engine.simulation import Observer
from fedbabu.errors import UserError
from fedbabu.results import holdout

SCALARS = {"train_loss": "train/loss", "lr": "train/lr", "test_accuracy": "global/test_accuracy",
           "rejected": "faults/rejected_updates", "dropped": "faults/dropped_clients", "seconds": "time/round_seconds",
           "utilization": "time/worker_utilization", "epsilon": "privacy/epsilon"}
"""Round-record keys logged to TensorBoard, and their tags."""


class ObserverGroup(Observer):
    """Forwards every event to each observer in turn (progress bar, TensorBoard, ...)."""

    def __init__(self, *observers: Observer | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def on_start(self, config: Config, partition: Partition, algorithm: Algorithm) -> None:
        for o in self.observers:
            o.on_start(config, partition, algorithm)

    def on_round(self, record: dict[str, Any]) -> None:
        for o in self.observers:
            o.on_round(record)

    def on_personalize_start(self, total: int) -> None:
        for o in self.observers:
            o.on_personalize_start(total)

    def on_personalized(self, done: int, total: int) -> None:
        for o in self.observers:
            o.on_personalized(done, total)

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        for o in self.observers:
            o.on_finish(summary)


class TensorBoardObserver(Observer):
    """Per-round scalars in ``<run>/tensorboard``; the final accuracies when personalization ends.

    On resume, events of rounds after the checkpoint (written before the interruption) are purged,
    so the curves show every round once.
    """

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard: the tensorboard package is not installed; "
                            "pip install 'fedbabu[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.folder = Path(folder)
        self.writer: Any = None

    def on_round(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            # created at the first round, once the run folder exists; the purge drops stale later events
            self.writer = self._writer_class(log_dir=str(self.folder / "tensorboard"), purge_step=record["round"])
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(tag, value, record["round"])
        self.writer.flush()

    def on_personalized(self, done: int, total: int) -> None:
        if done == total:
            self.close()

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        """A run with held-out clients: the seen and unseen clients' final accuracies and the participation gap,
        at the last round (their own event file: the rounds' writer is closed when personalization ends)."""
        values = holdout.scalars(summary)
        if not values:
            return
        writer = self._writer_class(log_dir=str(self.folder / "tensorboard"))
        for tag, value in values.items():
            if not math.isnan(value):
                writer.add_scalar(tag, value, summary["rounds"])
        writer.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
