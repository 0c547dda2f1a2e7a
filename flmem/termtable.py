"""Rich tables that fit the console's width without splitting a number or a word.

Rich fits a wide table by folding cells, so at 100 columns ``1,234.5`` becomes ``1,23`` over
``4.5`` and a path fills ten lines. :func:`fit_table` sizes every column itself instead:

* a number column is as wide as its widest cell (and its header's longest word) and never wraps;
* a text column wraps at spaces only; a word longer than the column ends in ``…``;
* a path column keeps its start and end and puts ``…`` in the middle; a key column (a path to
  copy, such as a sweep's directory) is shown whole, like a number;
* when even that does not fit, whole columns are dropped: first those whose value is the same in
  every row (the caption names them with that value, e.g. ``pair: all``), then by the ``drop`` order
  (highest first; a negative ``drop`` keeps a column longer than the unranked ones), then from the
  right, never the first; the table's caption names them.

Headers may hold ``\\n`` and wrap at spaces. Widths are terminal cells (``rich.cells.cell_len``).
Cells, headers and titles are plain text, never rich markup.

:func:`make_console` gives the console both ``flmem browse`` and ``launch.py`` print with: a
terminal's own width, or, when stdout is not a terminal, one so wide that nothing is wrapped; and
a reader that leaves early (``| head -1``) silences it instead of ending the program with status 1.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: the width of a console that is not a terminal: wide enough that nothing is ever wrapped
UNLIMITED = 100_000

#: a text word longer than this is cut with an ellipsis rather than widen its column further
MAX_WORD = 30
#: the narrowest a path column gets (its start and end around an ellipsis)
MIN_PATH = 16


@dataclass(frozen=True)
class FitColumn:
    header: str
    kind: str = "number"  # number | text | path | key (a path to copy: whole or dropped, never shortened)
    drop: int = 0  # columns with a higher ``drop`` are dropped first when the table does not fit; 0: last
    max_width: int | None = None  # text: wrap at this width in a terminal even when there is room


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells by replacing its middle with ``…`` (paths keep root and file name)."""
    if cell_len(text) <= width or width < 3:
        return text
    keep = width - 1
    head, tail = keep // 2, keep - keep // 2
    return text[:head] + "…" + text[len(text) - tail:]


def _words(text: str) -> list[str]:
    return text.split() or [""]


def _bounds(col: FitColumn, cells: list[str], capped: bool = True) -> tuple[int, int]:
    """(natural, minimum) width of a column's content, without padding."""
    header_lines = col.header.split("\n")
    header_word = max(cell_len(w) for line in header_lines for w in _words(line))
    natural = max([cell_len(line) for line in header_lines] + [cell_len(c) for c in cells])
    if col.kind in ("number", "key"):
        return natural, max([header_word] + [cell_len(c) for c in cells])
    if col.kind == "path":
        return natural, min(natural, max(header_word, MIN_PATH))
    if col.max_width and capped:
        natural = min(natural, max(col.max_width, header_word))
    word = max([cell_len(w) for c in cells for w in _words(c)] + [0])
    return natural, min(natural, max(header_word, min(word, MAX_WORD)))


def table_width(widths: list[int]) -> int:
    """The width of a rich table with default box, edges and padding (1 cell each side) around ``widths``."""
    return sum(widths) + 3 * len(widths) + 1


def plan(columns: list[FitColumn], rows: list[list[str]], width: int) -> tuple[list[int], dict[int, int]]:
    """Which columns to keep and how wide: ``(dropped indices, {kept index: width})``."""
    # Not a terminal (UNLIMITED): one line per row, whatever the length of its text, for grep and scripts
    bounds = [_bounds(col, [r[i] for r in rows], width < UNLIMITED) for i, col in enumerate(columns)]
    kept = list(range(len(columns)))
    dropped: list[int] = []
    constant = constant_columns(rows, len(columns))
    while True:
        natural = [bounds[i][0] for i in kept]
        if table_width(natural) <= width:
            return dropped, dict(zip(kept, natural))
        minimum = [bounds[i][1] for i in kept]
        if table_width(minimum) <= width or len(kept) == 1:
            widths = dict(zip(kept, minimum))
            spare = width - table_width(minimum)
            while spare > 0:  # give the room back to the column that lacks the most of its natural width
                short = max(kept, key=lambda i: (bounds[i][0] - widths[i]) / max(bounds[i][0], 1))
                if widths[short] >= bounds[short][0]:
                    break
                widths[short] += 1
                spare -= 1
            return dropped, widths
        # a column that says the same in every row first (the caption keeps its value), then the
        # column with the highest ``drop``; among equals the rightmost; never the first
        same = [i for i in kept if i in constant]
        victim = same[-1] if same else max(kept[1:], key=lambda i: (columns[i].drop, i))
        kept.remove(victim)
        dropped.append(victim)


def constant_columns(rows: list[list[str]], n: int) -> set[int]:
    """The indices of the columns whose cell is the same in every row (two rows or more)."""
    return {i for i in range(n) if len(rows) > 1 and len({r[i] for r in rows}) == 1} if rows else set()


def fit_table(columns: list[FitColumn], rows: list[list[str]], width: int, *, title: str | None = None,
              styles: list[str | None] | None = None, below: set[int] = frozenset()) -> tuple[Table, list[int]]:
    """A rich Table of ``rows`` (cells as strings, one per column) at most ``width`` cells wide, and the
    indices of the columns left out to fit, which the caption names. ``below``: columns whose values the
    caller prints under the table when they are left out (the caption says so)."""
    dropped, widths = plan(columns, rows, width)
    table = Table(title=Text(title) if title else None, title_justify="left", caption_justify="left")
    for i, col in enumerate(columns):
        if i in widths:
            number = col.kind == "number"
            table.add_column(Text(col.header, no_wrap=False), justify="right" if number else "left", width=widths[i],
                             no_wrap=col.kind != "text", overflow="ellipsis")
    for r, row in enumerate(rows):
        cells = [Text(middle_ellipsis(c, widths[i]) if columns[i].kind == "path" else c)
                 for i, c in enumerate(row) if i in widths]
        table.add_row(*cells, style=styles[r] if styles else None)
    if dropped:
        name = (lambda i: " ".join(columns[i].header.split()))
        constant = constant_columns(rows, len(columns))
        same = [f"{name(i)}: {rows[0][i]}" for i in sorted(dropped) if i in constant]
        dropped_other = [i for i in dropped if i not in constant]
        hidden = [name(i) for i in sorted(dropped_other) if i not in below]
        moved = [name(i) for i in sorted(dropped_other) if i in below]
        text = f"not shown, to fit {width} columns: {', '.join(hidden)} (a wider terminal shows them)" if hidden \
            else ""
        if same:
            text += ("; " if text else "") + f"the same in every row: {', '.join(same)}"
        if moved:
            text += ("; " if text else f"to fit {width} columns, ") + f"{', '.join(moved)}: below the table"
        table.caption = Text(text, style="table.caption")
    return table, sorted(dropped)


def quiet_broken_pipe() -> None:
    """Point stdout at devnull after a BrokenPipeError on it, so that Python's own flush at exit does not
    raise again (the recipe in Python's docs, signal module, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no real file: nothing will flush at exit
        pass


class PipeSafeConsole(Console):
    """A rich Console that goes quiet when its reader leaves (rich's default exits with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if self.file is sys.stdout or self.file is sys.__stdout__:
            quiet_broken_pipe()


def make_console(**kwargs) -> Console:
    """A :class:`PipeSafeConsole`: a terminal's own width (or ``$COLUMNS``); when stdout is not a
    terminal (a pipe, a file), :data:`UNLIMITED` wide, so no table, path or note is wrapped."""
    console = PipeSafeConsole(**kwargs)
    if not console.is_terminal and "width" not in kwargs:
        console = PipeSafeConsole(width=UNLIMITED, **kwargs)
    return console
