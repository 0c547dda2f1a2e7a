"""Charts for the report: peak memory per job and role, and memory over time per role with its
phases shaded.

Every chart is saved as PNG and SVG (for papers) under the report directory; the PNG bytes are
also returned so the HTML can embed them and stay readable offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from matplotlib.patches import Patch  # noqa: E402

from flmem.browse.captures import Series, memory_over_time  # noqa: E402
from flmem.browse.model import Job  # noqa: E402
from flmem.browse.phases import Mark, marks  # noqa: E402

MiB = 2**20
BEFORE, AFTER = "#1f77b4", "#ff7f0e"
MAX_CLIENT_PANELS = 4
#: phase band colours: pale, so the memory lines (BEFORE, AFTER, ...) stay readable on top
PHASE_COLOURS = list(plt.get_cmap("Set2").colors) + list(plt.get_cmap("Pastel1").colors)


@dataclass
class Chart:
    """A saved chart: its title, PNG and SVG paths, and the PNG bytes."""

    name: str
    title: str
    png: Path
    svg: Path
    png_bytes: bytes
    notes: list[str]


def _save(fig, out_dir: Path, name: str, title: str, notes: list[str]) -> Chart:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, editable for papers
        fig.savefig(svg, bbox_inches="tight")
    plt.close(fig)
    return Chart(name, title, png, svg, png.read_bytes(), notes)


def job_label(job: Job, keys: list[str]) -> str:
    return f"job {job.name}\n" + "\n".join(f"{k}={job.overrides.get(k)}" for k in keys)


def peak_memory_chart(jobs: list[Job], keys: list[str], out_dir: Path) -> Chart:
    """Grouped bars per job: server, clients (max) and clients (mean), peak heap and peak RSS in MiB."""
    series = [("server", False, max), ("clients max", True, max), ("clients mean", True, lambda v: sum(v) / len(v))]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.4 * len(jobs) + 4), 4.6), squeeze=False)
    notes = []
    width = 0.8 / len(series)
    for ax, (metric, label) in zip(axes[0], (("peak_heap_bytes", "peak heap"), ("peak_rss_bytes", "peak RSS"))):
        for i, (name, clients, agg) in enumerate(series):
            heights = []
            for job in jobs:
                vals = [r.get(metric) for r in job.roles.values() if r.is_client == clients and r.get(metric)]
                heights.append(agg(vals) / MiB if vals else 0)
            xs = [x + (i - 1) * width for x in range(len(jobs))]
            bars = ax.bar(xs, heights, width, label=name)
            ax.bar_label(bars, labels=[f"{h:.0f}" if h else "" for h in heights], fontsize=7, padding=1)
        for x, job in enumerate(jobs):
            if not job.roles or job.status != "completed":
                ax.annotate(job.status, (x, 0), ha="center", va="bottom", fontsize=8, color="red", rotation=90,
                            xytext=(0, 4), textcoords="offset points")
        ax.set_xticks(range(len(jobs)), [job_label(j, keys) for j in jobs], fontsize=7)
        ax.set_ylabel(f"{label} (MiB)")
        ax.set_title(f"{label} per job and role")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=8, bbox_to_anchor=(0.5, 1.06))
    notes += [f"job {j.name}: {j.status}" + (f" ({j.failure_text})" if j.failure else "")
              for j in jobs if j.status != "completed"]
    return _save(fig, out_dir, "peak_memory", "Peak memory per job and role (MiB)", notes)


def _panel_roles(jobs: list[Job]) -> list[str]:
    names: list[str] = []
    for job in jobs:
        for name in job.roles:
            if name not in names:
                names.append(name)
    clients = [n for n in names if n.startswith("client")][:MAX_CLIENT_PANELS]
    return [n for n in names if not n.startswith("client")] + clients


def role_series(role) -> Series:
    """A role's heap (including any untracked baseline, so it meets the peak heap) and RSS over
    seconds since memray started tracking it (the jobs' curves line up where their roles' work starts)."""
    s = role.summary
    tracked, peak = s.get("tracked_peak_bytes"), s.get("peak_heap_bytes")
    offset = peak - tracked if tracked is not None and peak is not None else 0
    return memory_over_time(role.dir / "capture.bin", heap_offset=offset)


def plain(text: str) -> str:
    """``text`` as a literal matplotlib label: no mathtext (``$``), not hidden (leading ``_``)."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _draw_bands(axes, role_marks: list[Mark], t0_ms: float, colours: dict[str, str], lo: float, hi: float) -> None:
    """Shade each phase occurrence from its start to its end, on the chart's time axis (seconds since
    ``t0_ms``, the role's first memory snapshot: the marks and memray's snapshots share the epoch-ms
    clock), between ``lo`` and ``hi`` (fractions of the panel's height)."""
    for mark in role_marks:
        x0, x1 = (mark.start_ms - t0_ms) / 1000, (mark.end_ms - t0_ms) / 1000
        for ax in axes:
            ax.axvspan(x0, x1, ymin=lo, ymax=hi, color=colours.setdefault(
                mark.phase, PHASE_COLOURS[len(colours) % len(PHASE_COLOURS)]), alpha=0.45, lw=0, zorder=0)


def memory_over_time_chart(name: str, title: str, sides: list[tuple[str, Job]], out_dir: Path) -> Chart:
    """One column per role: heap (top row, high-water mark dotted) and RSS (bottom row) in MiB over
    seconds since the role's first snapshot, one colour per side (e.g. ``optimize=False`` and
    ``optimize=True`` overlaid). The role's phases (its ``markers.json``) are shaded bands, one colour
    per phase name (legend below); with several sides, each side's bands fill its own horizontal strip
    (the first side's at the bottom). Roles whose capture is missing or unreadable are drawn empty
    and listed in the chart's notes, as are malformed phase marks."""
    roles = _panel_roles([j for _, j in sides]) or ["(no role)"]
    fig, axes = plt.subplots(2, len(roles), figsize=(4.2 * len(roles), 5.6), squeeze=False, sharex="col")
    notes = []
    colours: dict[str, str] = {}
    for col, role in enumerate(roles):
        heap_ax, rss_ax = axes[0][col], axes[1][col]
        for k, ((label, job), color) in enumerate(zip(sides, (BEFORE, AFTER, "#2ca02c", "#d62728"))):
            r = job.roles.get(role)
            series = role_series(r) if r else None
            if series is None or series.error:
                notes.append(f"{role}, {label}: " + (series.error if series else "role did not run"))
                continue
            role_marks, skipped = marks(r)
            if skipped:
                notes.append(f"{role}, {label}: {skipped} malformed phase marks in markers.json not drawn")
            _draw_bands((heap_ax, rss_ax), role_marks, series.t0_ms, colours, k / len(sides), (k + 1) / len(sides))
            heap = [h / MiB for h in series.heap]
            heap_ax.plot(series.t_s, heap, color=color, lw=1.2, label=plain(label))
            peak = r.get("peak_heap_bytes")
            if peak:
                heap_ax.axhline(peak / MiB, color=color, lw=0.8, ls=":")
            rss_ax.plot(series.t_s, [v / MiB for v in series.rss], color=color, lw=1.2, label=plain(label))
        heap_ax.set_title(plain(role))
        heap_ax.set_ylabel("heap (MiB)")
        rss_ax.set_ylabel("RSS (MiB)")
        rss_ax.set_xlabel("s since tracking started")
        for ax in (heap_ax, rss_ax):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.text(0.5, 0.5, "no capture", ha="center", va="center", transform=ax.transAxes, color="red")
    subtitle = " (dotted: peak heap, the high-water mark"
    if colours:
        subtitle += "; shaded: phases" + (", " + ", ".join(
            f"{'bottom' if k == 0 else 'top' if k == len(sides) - 1 else f'strip {k + 1}'}: {label}"
            for k, (label, _) in enumerate(sides)) if len(sides) > 1 else "")
    else:
        notes.append("no phase marks in these roles' markers.json (recorded before phases were marked): no bands")
    fig.suptitle(plain(title + subtitle + ")"), fontsize=10)
    fig.tight_layout()
    if colours:
        handles = [Patch(facecolor=c, alpha=0.45, label=plain(n)) for n, c in colours.items()]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 8),
                   fontsize=8, title="phases", title_fontsize=8, frameon=False)
    return _save(fig, out_dir, name, title, notes)
