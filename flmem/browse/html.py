"""``--html``: a self-contained ``report.html`` at the sweep (or run) root, readable offline.

It holds the views' tables (each cell carries its raw value in ``data-value``: bytes, seconds),
the charts (PNG embedded as base64; PNG and SVG files under ``report/`` next to it), and
relative links to each role's memray flamegraph. No script, font or style is fetched.

Everything a run's files, overrides and directory names say is untrusted: it is escaped in text
and in attributes (:func:`esc`), links are built only by :func:`href` (relative, percent-encoded,
below the report's directory: never ``javascript:`` or another scheme), and the page carries a
Content-Security-Policy that allows its own stylesheet and embedded ``data:`` images and nothing
else (no script at all), so even a missed escape could not run code. ``report.html`` and
``report/`` are written through a temporary file or directory and a rename (:mod:`.output`).
"""
from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

from flmem.browse.charts import Chart, memory_over_time_chart, peak_memory_chart
from flmem.browse.compare import compare
from flmem.browse.model import BrowseError, Job, Sweep
from flmem.browse.output import discard_dir, new_dir, put_dir, write_text_atomic
from flmem.browse.render import Section, View, cell, people
from flmem.browse.views import compare_view, run_view, sweep_view

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1800px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f4f4f6;text-align:center;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed td,tr.damaged td{background:#fdecec} tr.running td,tr.incomplete td{background:#fff8e1}
tr.noise td{color:#888} td.better{color:#17803d;font-weight:600} td.worse{color:#c62828;font-weight:600}
.notes{color:#555;font-size:13px;margin:4px 0 10px 18px;padding:0}
figure{margin:10px 0 18px} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555} a{color:#0b57d0}
details{margin:6px 0} summary{cursor:pointer;font-weight:600}
"""


#: the page's policy: its one inline stylesheet (by hash) and data: images; no script, no fetch, no form
CSP = ("default-src 'none'; style-src 'sha256-{}'; img-src data:; base-uri 'none'; form-action 'none'"
       .format(base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()))


def esc(value) -> str:
    """``value`` as HTML text or a double-quoted attribute value: ``& < > " '`` escaped."""
    return html.escape("" if value is None else str(value), quote=True)


def href(target: Path, base: Path) -> str | None:
    """A link from a page in ``base`` to ``target``: relative, each path segment percent-encoded (so no
    scheme such as ``javascript:`` can appear), or None when ``target`` is not below ``base``."""
    try:
        rel = Path(os.path.relpath(target, base))
    except ValueError:  # another drive
        return None
    if rel.is_absolute() or not rel.parts or ".." in rel.parts or rel.parts == (".",):
        return None
    return "/".join(quote(part, safe="") for part in rel.parts)


def slug(name: str) -> str:
    """``name`` as a file name of letters, digits, ``_``, ``-`` and ``.`` (a job's directory name may hold anything)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


def _links(roles, base: Path) -> str:
    parts = []
    for r in roles:
        link = href(r.flamegraph, base) if r.flamegraph else None
        if link:
            parts.append(f'<a class="flamegraph" href="{esc(link)}">{esc(r.name)}</a>')
        else:
            why = (r.flamegraph_reason or "") if not r.flamegraph else "the flamegraph is outside the report's folder"
            parts.append(f'<span class="no-flamegraph" title="{esc(why)}">{esc(r.name)}: none</span>')
    return " · ".join(parts) or "-"


def table_html(section: Section, base: Path, job_for=None, role_for=None) -> str:
    """``section`` as an HTML table; ``job_for(row)``/``role_for(row)`` supply flamegraph links."""
    head = "".join(f"<th>{esc(c.header).replace(chr(10), '<br>')}</th>" for c in people(section))
    if job_for:
        head += "<th>flamegraphs</th>"
    body = []
    for row in section.rows:
        classes = [slug(str(row.get("status", "")))]
        if row.get("within_noise"):
            classes.append("noise")
        tds = []
        for c in people(section):
            raw = row.get(c.key)
            text = cell(row, c)
            cls = "num" if c.kind != "text" else ""
            if c.key == "diff" and row.get("diff") and not row.get("within_noise"):
                better = row["diff"] > 0 if row.get("kind") == "accuracy" else row["diff"] < 0
                cls += " better" if better else " worse"
            content = esc(text)
            if c.key == "flamegraph" and role_for and role_for(row) is not None:
                content = _links([role_for(row)], base)
            tds.append(f'<td class="{cls.strip()}" data-col="{esc(c.key)}" data-value="{esc(raw)}">{content}</td>')
        if job_for:
            tds.append(f'<td data-col="flamegraphs">{_links(job_for(row).roles.values(), base)}</td>')
        body.append(f'<tr class="{" ".join(classes).strip()}">{"".join(tds)}</tr>')
    return (f'<table data-section="{esc(section.name)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _notes(notes) -> str:
    return '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>" if notes else ""


def _figure(chart: Chart) -> str:
    """The chart embedded (PNG as base64) with links to its files under ``report/``."""
    data = base64.b64encode(chart.png_bytes).decode()
    png, svg = (f"report/{quote(p.name, safe='')}" for p in (chart.png, chart.svg))
    return (f'<figure data-chart="{esc(chart.name)}"><img alt="{esc(chart.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{esc(chart.title)} — '
            f'<a href="{esc(png)}">PNG</a> · <a href="{esc(svg)}">SVG</a></figcaption>'
            f"{_notes(chart.notes)}</figure>")


def _view_html(view: View, base: Path, job_for=None, role_for=None, level: int = 2) -> str:
    parts = []
    for s in view.sections:
        parts.append(f"<h{level + 1}>{esc(s.title)}</h{level + 1}>" if s.title else "")
        parts.append(table_html(s, base, job_for if s.name == "jobs" else None, role_for))
    return "".join(parts) + _notes(view.notes)


def _page(title: str, body: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            f'<meta name="referrer" content="no-referrer"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"
            f'<p class="notes">written by flmem browse at {stamp}; memory in MiB (2<sup>20</sup> bytes), '
            f"working memory also in units of M (the global model's size), times in seconds</p>"
            f"{body}</body></html>")


def _job_details(job: Job, base: Path, top: int) -> str:
    view = run_view(job, top)
    head = f"job {job.name} — {job.status}" + (f" ({job.failure_text})" if job.failure else "")
    return (f'<details data-job="{esc(job.name)}"><summary>{esc(head)}</summary>'
            f"{_view_html(view, base, role_for=lambda row: job.roles.get(row.get('role')), level=3)}</details>")


def _write(base: Path, title: str, body) -> Path:
    """``base/report.html`` from ``body(out)`` (the HTML of the charts it saved under ``out``), with the charts
    saved to a new directory that then replaces ``base/report``; nothing is written through a symlink."""
    out = new_dir(base / "report")
    try:
        page = _page(title, body(out))
        put_dir(out, base / "report")
    finally:
        discard_dir(out)  # still there only when something failed
    return write_text_atomic(base / "report.html", page)


def write_sweep_report(sweep: Sweep, key: str | None, baseline: str | None = None, rel_noise: float = 0.01,
                       top: int = 5) -> Path:
    """Write ``<sweep>/report.html`` and ``<sweep>/report/*.png|svg``; returns the HTML path.

    ``key`` (e.g. ``optimize``) chooses the comparison and the overlaid memory-over-time charts;
    None or a key that does not vary gives one memory chart per job instead. Raises OSError when
    the sweep directory is not writable.
    """
    base = sweep.dir
    jobs_by_name = {j.name: j for j in sweep.jobs}

    def body(out: Path) -> str:
        parts = ["<h2>Jobs</h2>", _view_html(sweep_view(sweep), base, job_for=lambda row: jobs_by_name[row["job"]])]
        comparison = None
        if key:
            try:
                comparison = compare(sweep, key, baseline, rel_noise)
            except BrowseError as exc:
                parts.append(_notes([f"no comparison: {exc}"]))
        if comparison:
            parts += [f"<h2>Comparison: {esc(key)}</h2>", _view_html(compare_view(sweep, comparison), base)]
        parts += ["<h2>Charts</h2>", _figure(peak_memory_chart(sweep.jobs, sweep.varying, out))]
        if comparison and comparison.pairs:
            for i, (group, a, b) in enumerate(p for p in comparison.pairs if p[1].roles or p[2].roles):
                sides = [(f"{key}={a.overrides.get(key)}", a), (f"{key}={b.overrides.get(key)}", b)]
                title = f"Memory over time, {group}: {sides[0][0]} vs {sides[1][0]}"
                parts.append(_figure(memory_over_time_chart(f"memory_over_time_{i}", title, sides, out)))
        else:
            for i, job in enumerate([j for j in sweep.jobs if j.roles][:12]):
                name = f"memory_over_time_job_{job.name}" if slug(job.name) == job.name else f"memory_over_time_{i}"
                parts.append(_figure(memory_over_time_chart(name, f"Memory over time, job {job.name}",
                                                            [(f"job {job.name}", job)], out)))
        parts.append("<h2>Jobs in detail</h2>")
        parts += [_job_details(j, base, top) for j in sweep.jobs]
        return "".join(parts)

    return _write(base, f"flmem sweep {sweep.dir.name}", body)


def write_run_report(job: Job, top: int = 5) -> Path:
    """Write ``<run>/report.html`` and ``<run>/report/*.png|svg`` for one job; returns the HTML path.
    Raises OSError when the run directory is not writable."""
    base = job.dir
    view = run_view(job, top)

    def body(out: Path) -> str:
        return (_view_html(view, base, role_for=lambda row: job.roles.get(row.get("role"))) + "<h2>Charts</h2>"
                + _figure(memory_over_time_chart("memory_over_time", f"Memory over time, {job.dir.name}",
                                                 [(job.dir.name, job)], out)))

    return _write(base, f"flmem run {job.dir.name}", body)
