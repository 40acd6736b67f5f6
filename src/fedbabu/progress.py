"""Progress bars over rounds and over personalization (rich) in a terminal, plain lines elsewhere; with
``--quiet`` only the partition summary."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

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


BAR_WIDTH = 40
MIN_BAR_WIDTH = 10
"""Narrower than this, a bar tells less than the numbers beside it: it is left out."""
MIN_DESCRIPTION_WIDTH = 16
"""The description (which run, which phase) keeps this much before the accuracy is left out."""


class _FittedLine:
    """One task's progress line, laid out at the width rich offers it.

    Where the line is too long the bar shrinks, then goes, then the description is shortened with an
    ellipsis, then the accuracy goes: the counts (round i/N), lr, loss and the times (elapsed<remaining)
    stay whole, where rich's own columns would cut the times first.
    """

    def __init__(self, task: Task) -> None:
        self.task = task

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)

    def _stats(self, with_accuracy: bool) -> Text:
        task = self.task
        info = " ".join(filter(None, (task.fields.get("info"), with_accuracy and task.fields.get("accuracy"))))
        return Text.assemble(MofNCompleteColumn().render(task), f" {info}" if info else "", " ",
                             TimeElapsedColumn().render(task), "<", TimeRemainingColumn().render(task))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        description = Text(self.task.description, style="bold", no_wrap=True, overflow="ellipsis")
        kept = min(description.cell_len, MIN_DESCRIPTION_WIDTH)
        stats = self._stats(with_accuracy=True)
        bar_width = min(BAR_WIDTH, width - stats.cell_len - description.cell_len - 2)
        if bar_width >= MIN_BAR_WIDTH:
            line = Table.grid(padding=(0, 1))
            for column_width in (description.cell_len, bar_width, stats.cell_len):
                line.add_column(width=column_width, no_wrap=True)
            line.add_row(description, BarColumn(bar_width=bar_width).render(self.task), stats)
            yield line
            return
        if width - stats.cell_len - 1 < kept:
            stats = self._stats(with_accuracy=False)
        room = width - stats.cell_len - 1
        if room > 0:
            description.truncate(room, overflow="ellipsis")
            yield Text.assemble(description, " ", stats)
        else:
            yield stats


class _LineColumn(ProgressColumn):
    """The whole line as one column, so its parts share the width by priority rather than evenly."""

    def render(self, task: Task) -> RenderableType:
        return _FittedLine(task)


class RichProgress(PartitionSummary):
    """Shows the partition summary, a bar over rounds (lr, loss, accuracy), then one over clients."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        super().__init__(label, lambda line: self.console.print(line, markup=False, highlight=False, soft_wrap=True))
        self.progress: Progress | None = None
        self.task: Any = None

    def _start(self, description: str, total: int) -> None:
        self._stop()
        self.progress = Progress(_LineColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="", accuracy="")

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
        """Advances the bar and shows the round's lr and loss (no loss when no update arrived), and its
        accuracy on evaluation rounds."""
        info = f"lr {record['lr']:.4g} loss {record['train_loss']:.3f}" if not math.isnan(record["train_loss"]) \
            else f"lr {record['lr']:.4g}"
        accuracy = f"acc {100 * record['test_accuracy']:.1f}%" if "test_accuracy" in record else ""
        self.progress.update(self.task, completed=record["round"], info=info, accuracy=accuracy)

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


def progress_display(label: str, console: Console, print_line: Callable[[str], Any] = print) -> PartitionSummary:
    """Bars on ``console`` where they can redraw in place, else one plain line per evaluation round
    through ``print_line``: a pipe or a log file gets no control characters and no frozen bar."""
    return RichProgress(label, console) if live_display_available(console) else TextProgress(label, print_line)


def live_display_available(console: Console) -> bool:
    """Whether rich can redraw bars in place: a terminal, or Jupyter with ipywidgets installed."""
    if console.is_jupyter:
        import importlib.util

        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_terminal
