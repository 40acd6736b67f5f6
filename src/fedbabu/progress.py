"""Progress bars over rounds and over personalization (rich); with ``--quiet`` only the partition summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedbabu.algorithms import Algorithm
from fedbabu.config import Config
from fedbabu.data.partition import Partition
from fedbabu.engine.simulation import Observer


class PartitionSummary(Observer):
    """Prints the one-line partition summary when a run starts.

    A user sees before a long run that the federation is what they meant, so ``--quiet`` keeps this
    line and drops only the bars; the progress displays below print it through this class.
    """

    def __init__(self, label: str, print_line: Callable[[str], Any] = print) -> None:
        self.label = label
        self.print_line = print_line

    def on_start(self, config: Config, partition: Partition, algorithm: Algorithm) -> None:
        """The summary line, prefixed with the run's label (which algorithm, which seed)."""
        self.print_line(f"{self.label}: {partition.summary()}")


class RichProgress(PartitionSummary):
    """Shows the partition summary, a bar over rounds (lr, loss, accuracy), then one over clients."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        super().__init__(label, lambda line: self.console.print(line, markup=False, highlight=False, soft_wrap=True))
        self.progress: Progress | None = None
        self.task: Any = None

    def _start(self, description: str, total: int) -> None:
        self._stop()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_start(self, config: Config, partition: Partition, algorithm: Algorithm) -> None:
        """The summary line, then the bar over rounds (none for a run of 0 rounds)."""
        super().on_start(config, partition, algorithm)
        if config.rounds:
            self._start(f"{self.label} rounds", config.rounds)

    def on_round(self, record: dict[str, Any]) -> None:
        """Advances the bar and shows the round's lr and loss (no loss when no update arrived)."""
        info = f"lr {record['lr']:.4g} loss {record['train_loss']:.3f}" if not math.isnan(record["train_loss"]) \
            else f"lr {record['lr']:.4g}"
        if "test_accuracy" in record:
            info += f" acc {100 * record['test_accuracy']:.1f}%"
        self.progress.update(self.task, completed=record["round"], info=info)

    def on_personalize_start(self, total: int) -> None:
        """Replaces the finished bar over rounds with one over the clients being fine-tuned."""
        self._start(f"{self.label} personalize", total)

    def on_personalized(self, done: int, total: int) -> None:
        """Advances the clients' bar; the last client closes it, before the results table prints."""
        self.progress.update(self.task, completed=done)
        if done == total:
            self._stop()


class TextProgress(PartitionSummary):
    """Plain lines, for output that is not a live display: logs, and notebooks without ipywidgets.

    One line per evaluation round (and for the last round), then one when personalization ends, so a
    notebook cell or a log file shows the run's progress without hundreds of redraws.
    """

    def __init__(self, label: str, print_line: Callable[[str], Any] = print) -> None:
        super().__init__(label, print_line)
        self.rounds = 0

    def on_start(self, config: Config, partition: Partition, algorithm: Algorithm) -> None:
        """The summary line; the number of rounds is kept to recognise the last one."""
        self.rounds = config.rounds
        super().on_start(config, partition, algorithm)

    def on_round(self, record: dict[str, Any]) -> None:
        """A line on evaluation rounds and the last round only: a log stays readable over hundreds of rounds."""
        if "test_accuracy" not in record and record["round"] != self.rounds:
            return
        line = f"{self.label} round {record['round']}/{self.rounds}: lr {record['lr']:.4g}"
        if not math.isnan(record["train_loss"]):
            line += f", loss {record['train_loss']:.3f}"
        if "test_accuracy" in record:
            line += f", accuracy {100 * record['test_accuracy']:.1f}%"
        self.print_line(line)

    def on_personalized(self, done: int, total: int) -> None:
        """One line when every client is fine-tuned, none per client."""
        if done == total:
            self.print_line(f"{self.label}: personalized {total} clients")


def live_display_available(console: Console) -> bool:
    """Whether rich can redraw bars in place: a terminal, or Jupyter with ipywidgets installed."""
    if console.is_jupyter:
        import importlib.util

        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_terminal
