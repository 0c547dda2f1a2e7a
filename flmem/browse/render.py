"""Print views as a rich table (terminal), csv, json or markdown (scripts and papers).

A view is a list of Sections (title, columns, raw rows) plus notes. ``table`` and ``markdown``
format values for people (MiB, seconds, ratios); ``csv`` and ``json`` keep them raw (bytes,
seconds, fractions) so scripts get exact numbers. ``csv`` holds the view's first section, followed
by the rows of any later section with the same columns (a comparison's per-phase rows).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from flmem.browse.tables import Column

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
    if row.get("status") == "failed":
        return "red"
    if row.get("status") in ("running", "incomplete"):
        return "yellow"
    return None


def people(section: Section) -> list[Column]:
    """The columns shown to people (table, markdown, HTML); csv and json get all of them."""
    return [c for c in section.columns if c.people]


def print_table(view: View, console: Console) -> None:
    console.print(f"[bold]{view.title}[/bold]", soft_wrap=True)
    for section in view.sections:
        table = Table(title=section.title, title_justify="left", show_lines=False)
        for col in people(section):
            numeric = col.kind not in ("text",)
            table.add_column(col.header, justify="right" if numeric else "left",
                             overflow="fold", max_width=60 if col.key in ("notes", "note", "reason") else None)
        for row in section.rows:
            table.add_row(*[cell(row, c) for c in people(section)], style=_style(row))
        console.print(table)
    for note in view.notes:
        console.print(f"  {note}", soft_wrap=True, highlight=False)


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
    out += [f"- {n}" for n in view.notes]
    return "\n".join(out).rstrip() + "\n"


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


def make_console(**kwargs) -> Console:
    """A rich Console; when stdout is not a terminal, tables get ``$COLUMNS`` or 200 columns, not 80."""
    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs:
        console = Console(width=int(os.environ.get("COLUMNS", 0)) or 200, **kwargs)
    return console


def emit(view: View, fmt_name: str, console: Console | None = None) -> None:
    """Print ``view`` in ``fmt_name`` (one of FORMATS) to ``console`` (stdout by default)."""
    console = console or make_console()
    if fmt_name == "table":
        print_table(view, console)
        return
    text = {"csv": to_csv, "json": to_json, "markdown": to_markdown}[fmt_name](view)
    console.file.write(text)
    console.file.flush()
