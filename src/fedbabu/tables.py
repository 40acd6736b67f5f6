"""The one way the CLI prints a table, so every command reads the same in any terminal and in logs.

A user types names back into the CLI (preset names, algorithm entries, run folders, config keys), so
those are never cut: a table is drawn only when every such value fits on its line, with descriptions
wrapped into the width left; otherwise each row is listed as one entry, continued between words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from fedbabu.results import holdout
from fedbabu.results.paired import paired_cell

Kind = Literal["key", "keys", "number", "text"]
Cell = str | Sequence[str]

TEXT_MIN_WIDTH = 24
"""The narrowest a wrapped description may get before a listing reads better than a table."""

LIST_SEPARATOR = ", "


@dataclass(frozen=True)
class Column:
    """A column of a CLI table; its kind decides how it may be narrowed.

    ``key``: a value a user may type back (name, key, path, comma-separated seeds), never wrapped or cut.
    ``keys``: a list of such values, wrapped between entries only. ``number``: right-aligned, never
    wrapped. ``text``: a description, wrapped between words. A ``\\n`` in the header puts it on two
    lines, so a numeric column is as wide as its numbers rather than its header.
    """

    header: str
    kind: Kind = "key"


def _text(column: Column, value: Cell) -> str:
    if (column.kind == "keys") == isinstance(value, str):
        expected = "a list of strings" if column.kind == "keys" else "a string"
        raise TypeError(f"column {column.header!r}: expected {expected}, got {type(value).__name__}")
    return LIST_SEPARATOR.join(value) if column.kind == "keys" else value


def _header_width(column: Column) -> int:
    return max((cell_len(line) for line in column.header.splitlines()), default=0)


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int) -> list[int] | None:
    """Each column's content width for a table ``width`` cells wide, or None when it does not fit.

    Keys and numbers get their full width; lists and descriptions share what is left (each at least its
    longest entry, or ``TEXT_MIN_WIDTH``), the one that would wrap into the most lines served first.
    """
    minimum, natural = [], []
    for index, column in enumerate(columns):
        values = [row[index] for row in rows]
        full = max([_header_width(column), *(cell_len(_text(column, v)) for v in values)])
        if column.kind == "keys":
            least = max([_header_width(column), *(cell_len(item) for v in values for item in v)])
        elif column.kind == "text":
            least = max(_header_width(column), min(full, TEXT_MIN_WIDTH))
        else:
            least = full
        minimum.append(least)
        natural.append(full)
    spare = width - (3 * len(columns) + 1) - sum(minimum)  # borders and one space either side of a cell
    if spare < 0:
        return None
    widths = list(minimum)
    while spare > 0:
        short = [i for i in range(len(columns)) if widths[i] < natural[i]]
        if not short:
            break
        neediest = max(short, key=lambda i: natural[i] / widths[i])
        widths[neediest] += 1
        spare -= 1
    return widths


def print_table(console: Console, title: str, columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
                caption: str | None = None) -> None:
    """Print rows as a table at the console's width, or as a listing where the table would cut a key.

    Every CLI command prints its tables through this function. A listing gives each row one entry,
    ``<first column>: <header> <value>; ...``, continued on indented lines between words, list entries
    or header-value pairs, never inside a name or between a number and its header.
    """
    rows = [list(row) for row in rows]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"{title}: a row has {len(row)} values for {len(columns)} columns")
    widths = _widths(columns, rows, console.width)
    if widths is None:
        _print_listing(console, title, columns, rows, caption)
        return
    table = Table(title=title, caption=caption)
    for column, width in zip(columns, widths, strict=True):
        wraps = column.kind in ("keys", "text")
        table.add_column(column.header, width=width, justify="right" if column.kind == "number" else "left",
                         no_wrap=not wraps, overflow="fold")
    for row in rows:
        table.add_row(*(_text(column, value) for column, value in zip(columns, row, strict=True)))
    console.print(table, highlight=False)


def _atoms(column: Column, value: Cell) -> list[str]:
    """The pieces a listing may put on different lines: a description's words, a list's entries (the
    first with the header), or a whole ``header value`` pair, so a number never leaves its header."""
    header = " ".join(column.header.split())
    if column.kind == "text":
        return value.split()
    if column.kind == "keys":
        entries = [f"{entry}," for entry in value[:-1]] + list(value[-1:])
        return [f"{header} {entries[0]}" if entries else header, *entries[1:]]
    return [f"{header} {value}"]


def _print_listing(console: Console, title: str, columns: Sequence[Column], rows: Sequence[Sequence[Cell]],
                   caption: str | None) -> None:
    def line(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    line(title)
    for row in rows:
        first, *rest = row
        atoms = [f"{_text(columns[0], first)}:" if rest else _text(columns[0], first)]
        for index, (column, value) in enumerate(zip(columns[1:], rest, strict=True)):
            pieces = _atoms(column, value)
            if index < len(rest) - 1 and pieces:
                pieces[-1] += ";"
            atoms += pieces
        current = atoms[0]
        for atom in atoms[1:]:
            if cell_len(current) + 1 + cell_len(atom) <= console.width:
                current += f" {atom}"
            else:
                line(current)
                current = f"  {atom}"
        line(current)
    if caption:
        line(caption)


RESULT_COLUMNS = (Column("algorithm"), Column("initial\nacc (%)", "number"), Column("personalized\nacc (%)", "number"),
                  Column("gain", "number"), Column("bytes/client\nper round", "number"), Column("time\n(s)", "number"))


def print_results(console: Console, title: str, rows: Sequence[dict]) -> None:
    """The results table of ``run``, ``resume``, ``personalize``, ``compare`` and ``flower sim``.

    ``rows`` are comparison rows (``algorithm``, ``initial_mean``/``_std``, ``personalized_mean``/``_std``,
    ``bytes_per_round_per_client``, ``wall_time_s``); accuracies in %, mean ± std over clients. Rows of a
    comparison (with ``paired_against``) get one more column: the paired per-client difference against
    that entry, mean ± its standard error. Rows of runs with held-out clients (with ``participation_gap``)
    get the seen and unseen clients' accuracies, initial → personalized, and the gap ± its standard error.
    """
    def pct(mean: float, std: float) -> str:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    reference = rows[0].get("paired_against") if rows else None
    private = any(r.get("epsilon") is not None for r in rows)
    columns = RESULT_COLUMNS if reference is None else (
        *RESULT_COLUMNS[:4], Column(f"vs {reference}\n(paired)", "number"), *RESULT_COLUMNS[4:])
    if private:
        columns = (*columns, Column("ε", "number"))
    groups = holdout.has_groups(rows)
    if groups:
        columns = (*columns, Column("seen (%)\ninit → pers", "number"), Column("unseen (%)\ninit → pers", "number"),
                   Column("participation\ngap", "number"))
    table = []
    for r in rows:
        cells = [r["algorithm"], pct(r["initial_mean"], r["initial_std"]),
                 pct(r["personalized_mean"], r["personalized_std"]),
                 f"{100 * (r['personalized_mean'] - r['initial_mean']):+.2f}", f"{r['bytes_per_round_per_client']:,}",
                 f"{r['wall_time_s']:.1f}"]
        cells = cells if reference is None else [*cells[:4], paired_cell(r, counts=False), *cells[4:]]
        cells = [*cells, "no DP" if r.get("epsilon") is None else f"{r['epsilon']:.3g}"] if private else cells
        table.append([*cells, *holdout.group_cells(r)] if groups else cells)
    print_table(console, title, columns, table)


def summary_row(summary: dict) -> dict:
    """A run's ``summary.json`` as a row of ``print_results``."""
    return {"algorithm": summary["algorithm"],
            "initial_mean": summary["initial_accuracy"]["mean"], "initial_std": summary["initial_accuracy"]["std"],
            "personalized_mean": summary["personalized_accuracy"]["mean"],
            "personalized_std": summary["personalized_accuracy"]["std"],
            "bytes_per_round_per_client": summary["bytes_per_round_per_client"],
            "wall_time_s": summary["wall_time_s"],
            "epsilon": summary["privacy"]["epsilon"] if summary.get("privacy") else None,
            **holdout.comparison_fields([summary])}
