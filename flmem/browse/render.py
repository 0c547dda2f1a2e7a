"""Print views as a rich table (terminal), csv, json or markdown (scripts and papers).

A view is a list of Sections (title, columns, raw rows) plus notes. ``table`` and ``markdown``
format values for people (MiB, seconds, ratios); ``csv`` and ``json`` keep them raw (bytes,
seconds, fractions) so scripts get exact numbers. ``csv`` holds the view's first section, followed
by the rows of any later section with the same columns (a comparison's per-phase rows).

``table`` fits the terminal (:mod:`flmem.termtable`): numbers and words are never split, paths
are shortened in the middle, and columns that cannot fit are dropped and named under the table.
Output that is not a terminal (a pipe, a file) is never wrapped or cut, and neither is csv, json
or markdown. A reader that closes the pipe early (``| head -1``) ends the output quietly: exit 0.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from flmem.browse.tables import Column
from flmem.termtable import FitColumn, fit_table, make_console, quiet_broken_pipe  # noqa: F401 (make_console)

MiB = 2**20
FORMATS = ("table", "csv", "json", "markdown")


@dataclass
class Section:
    name: str
    title: str
    columns: list[Column]
    rows: list[dict]


@dataclass
class View:
    title: str
    sections: list[Section]
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def fmt(value, kind: str) -> str:
    """A cell for people: bytes as MiB, ``diff_*`` signed, ``ratio_x`` as 0.85x, missing as ``-``."""
    if value is None or value == "":
        return "-"
    if kind.startswith("diff_"):
        text = fmt(abs(value), kind[5:])
        return ("+" if value > 0 else "-" if value < 0 else "±") + text
    if kind == "bytes":
        return f"{value / MiB:,.1f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "ratio_x":
        return f"{value:.3f}x"
    if kind == "seconds":
        return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"
    if kind == "number":
        return f"{value:.4g}"
    if kind == "accuracy":
        return f"{value:.3f}"
    if kind == "int":
        return f"{int(value):,}"
    return " ".join(str(value).split())


def cell(row: dict, col: Column) -> str:
    """``row[col.key]`` for people; ``row_range`` adds the range over repeats: ``11.7 (10.9-14.9, n=3)``."""
    kind = col.kind
    if kind == "row_range":
        kind = row.get("kind", "text")
        text = fmt(row.get(col.key), kind)
        n, lo, hi = row.get(f"n_{col.key}"), row.get(f"{col.key}_min"), row.get(f"{col.key}_max")
        if isinstance(n, int) and n > 1 and lo is not None and hi is not None:
            text += f" ({fmt(lo, kind)}-{fmt(hi, kind)}, n={n})"
        elif row.get("repeats") and n is not None:  # fewer repeats with a value than the sweep ran
            text += f" (n={n})"
        return text
    if kind in ("row", "diff_row"):
        kind = row.get("kind", "text") if kind == "row" else "diff_" + row.get("kind", "text")
    return fmt(row.get(col.key), kind)


def _style(row: dict) -> str | None:
    if "within_noise" in row:
        if row["within_noise"]:
            return "dim"
        diff = row.get("diff")
        if diff:
            better = diff > 0 if row.get("kind") == "accuracy" else diff < 0
            return "green" if better else "red"
    if row.get("status") in ("failed", "damaged"):
        return "red"
    if row.get("status") in ("running", "incomplete"):
        return "yellow"
    return None


def people(section: Section) -> list[Column]:
    """The columns shown to people (table, markdown, HTML); csv and json get all of them."""
    return [c for c in section.columns if c.people]


#: columns dropped first when a table does not fit the terminal (higher first); the rest go from the right
DROP_FIRST = {
    # a sweep's jobs
    "clients_peak_rss_mean_bytes": 9, "clients_peak_heap_mean_bytes": 8, "clients_peak_rss_max_bytes": 7,
    "server_peak_rss_bytes": 6, "duration_s": 5,
    # a run's roles, allocation sites and rounds
    "total_allocations": 9, "baseline_heap_bytes": 7, "exit_code": 6, "allocations": 9, "flmem_caller": 6,
    "aggregate_s": 9, "client_train_s": 8, "round_s": 7,
    "flamegraph": 4,
    # a run's phases: the memory numbers are kept over count and stage
    "count": 5, "stage": 4,
    # a comparison: what a row is (metric, phase), before, after and the ratio are kept longest, then the difference
    "noise": 9, "note": 8, "before": -4, "after": -4, "ratio": -3, "metric": -3, "phase": -3, "diff": -2,
    # the listing
    "planned": 9, "problems": 8, "running": 7, "when": 6,
}
PATH_KEYS = {"flamegraph", "site", "flmem_caller"}  # shortened in the middle, never wrapped
KEY_KEYS = {"path"}  # the listing's sweep and run directories, to copy into `flmem browse DIR`: whole
LONG_TEXT = {"notes", "note", "reason", "capture", "varying"}  # wrapped at spaces, at most 60 wide
BELOW = {"notes", "reason"}  # when left out to fit: listed under the table, by the row's first cell (job)


def fit_column(col: Column) -> FitColumn:
    kind = "path" if col.key in PATH_KEYS else "key" if col.key in KEY_KEYS else \
        "text" if col.kind == "text" else "number"
    return FitColumn(col.header, kind, DROP_FIRST.get(col.key, 0), 60 if col.key in LONG_TEXT else None)


def print_table(view: View, console: Console) -> None:
    """Each section as a table no wider than ``console.width``; notes below, never wrapped by rich."""
    console.print(Text(view.title, style="bold"), soft_wrap=True)  # text, never markup
    for section in view.sections:
        cols = people(section)
        rows = [[cell(row, c) for c in cols] for row in section.rows]
        table, dropped = fit_table([fit_column(c) for c in cols], rows, console.width, title=section.title or None,
                                   styles=[_style(row) for row in section.rows],
                                   below={i for i, c in enumerate(cols) if c.key in BELOW})
        console.print(table)
        for i in (i for i in dropped if cols[i].key in BELOW):  # failure reasons: below the table
            for row in rows:
                if row[i] not in ("", "-"):
                    console.print(f"  {cols[0].header} {row[0]}: {row[i]}", soft_wrap=True, highlight=False,
                                  markup=False)
    for note in view.notes:
        console.print(f"  {note}", soft_wrap=True, highlight=False, markup=False)


def to_markdown(view: View) -> str:
    out = [f"## {view.title}", ""]
    for section in view.sections:
        if section.title:  # an untitled section is the view's only table: no empty heading
            out += [f"### {section.title}", ""]
        cols = people(section)
        out.append("| " + " | ".join(c.header.replace("\n", " ").replace("|", "\\|") for c in cols) + " |")
        out.append("|" + "|".join("---:" if c.kind != "text" else "---" for c in cols) + "|")
        for row in section.rows:
            out.append("| " + " | ".join(cell(row, c).replace("|", "\\|") for c in cols) + " |")
        out.append("")
    out += [f"- {_plain_legend(n)}" for n in view.notes]
    return "\n".join(out).rstrip() + "\n"


#: the terminal's colour legend, and what markdown (no colours) shows instead
COLOUR_LEGEND = "green: lower memory or time, red: higher; dim: within the measured noise"
PLAIN_LEGEND = "a negative diff (ratio below 1x) is lower memory or time; the note column says within noise (±noise)"


def _plain_legend(note: str) -> str:
    return note.replace(COLOUR_LEGEND, PLAIN_LEGEND)


def to_csv(view: View) -> str:
    buf = io.StringIO()
    if not view.sections:
        return ""
    section = view.sections[0]
    writer = csv.writer(buf, lineterminator="\n")
    keys = [c.key for c in section.columns]
    writer.writerow(keys)
    rows = [r for s in view.sections if [c.key for c in s.columns] == keys for r in s.rows]
    for row in rows:
        writer.writerow(["" if row.get(c.key) is None else row.get(c.key) for c in section.columns])
    return buf.getvalue()


def to_json(view: View) -> str:
    data = {"title": view.title, **view.meta,
            **{s.name: [{c.key: r.get(c.key) for c in s.columns} for r in s.rows] for s in view.sections},
            "notes": view.notes}
    return json.dumps(data, indent=2, default=str) + "\n"


def emit(view: View, fmt_name: str, console: Console | None = None) -> bool:
    """Print ``view`` in ``fmt_name`` (one of FORMATS) to ``console`` (stdout by default).

    Returns False when the reader closed the output early (a broken pipe), after which nothing more
    should be written; True otherwise.
    """
    console = console or make_console()
    try:
        if fmt_name == "table":
            print_table(view, console)
        else:
            text = {"csv": to_csv, "json": to_json, "markdown": to_markdown}[fmt_name](view)
            console.file.write(text)
            console.file.flush()
    except BrokenPipeError:  # the reader left (| head): say nothing more, exit 0
        console.quiet = True
        if console.file is sys.stdout or console.file is sys.__stdout__:
            quiet_broken_pipe()
        return False
    return not console.quiet
