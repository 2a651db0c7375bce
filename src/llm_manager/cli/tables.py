"""Tables whose first column holds names that must stay whole.

Model names are often long and alike (``gemma-3-270m-it-q4`` and ``gemma-3-270m-it-q8``):
cut to ``gemma…`` they cannot be told apart. The name column is never cut. It keeps its
full width while the other columns fit beside it (wrapping ones wrap first); otherwise the
columns marked optional are left out (``llm-manager info`` shows them); only when even that
is too narrow is the name folded onto several lines, whole.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Col:
    header: str
    justify: Literal["left", "right"] = "left"
    optional: bool = False  # left out first when the names would not fit whole
    wraps: bool = False  # text that may wrap at its spaces (aliases, a failure reason)


def console() -> Console:
    """A terminal's width; no width to fit (a pipe, a file) means never cutting anything."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=200)


def _overhead(columns: int) -> int:
    return 3 * columns + 1  # rich's default box: a border and one space each side


def _need(col: Col, cells: list[str]) -> int:
    """The narrowest a column can be without cutting a word."""
    texts = [col.header, *cells]
    if col.wraps:
        return max(len(word) for text in texts for word in (text.split() or [""]))
    return max(len(text) for text in texts)


def names_table(
    title: str | None,
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    width: int,
    styles: Sequence[str | None] | None = None,
) -> Table:
    """A table whose first column (names) is never cut; see the module's docstring."""
    cells = [[row[i] for row in rows] for i in range(len(columns))]
    name_width = _need(columns[0], cells[0])
    keep = list(range(len(columns)))
    avail = 0
    for drop_optional in (False, True):
        keep = [i for i, c in enumerate(columns) if not (drop_optional and c.optional)]
        others = sum(_need(columns[i], cells[i]) for i in keep[1:])
        avail = width - _overhead(len(keep)) - others
        if avail >= name_width:
            break
    table = Table(title=title)
    first = columns[0]
    if avail >= name_width:
        table.add_column(first.header, min_width=name_width, overflow="fold")
    else:  # folded onto several lines, whole
        fold = max(avail, 8)
        table.add_column(first.header, min_width=fold, max_width=fold, overflow="fold")
    for i in keep[1:]:
        col = columns[i]
        table.add_column(
            col.header, justify=col.justify, min_width=_need(col, cells[i]), overflow="fold"
        )
    for n, row in enumerate(rows):
        style = styles[n] if styles is not None else None
        table.add_row(*(row[i] for i in keep), style=style)
    return table
