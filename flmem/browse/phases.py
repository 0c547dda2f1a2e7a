"""A role's phases, read back: the marks in ``markers.json`` and the per-phase numbers in ``summary.json``.

Each role marks its phases in time (``markers.json``: ``phases`` = ``[{phase, stage, round,
start_ms, end_ms}]``, epoch ms on memray's snapshot clock) and its summary aggregates them per
phase name over the rounds (``summary.json``: ``phases`` = ``[{phase, stage, count, seconds,
peak_heap_bytes, peak_rss_bytes, samples, exact}]``) and per stage (setup, FL, teardown:
``setup_peak_heap_bytes``, ``fl_peak_heap_bytes``, ``fl_start_heap_bytes``, ``fl_working_heap_bytes``
...). Runs recorded before phases existed have none of these keys: every reader here returns
empty lists or None for them and never raises. Files are untrusted: malformed entries are skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from flmem.browse.model import Job, Role
from flmem.status import read_json

STAGES = ("setup", "fl", "teardown")
NOT_PROFILED = "not profiled (profiling.enabled=false)"
MAX_NAME = 80  # longer phase names are cut: they are labels, not data


@dataclass(frozen=True)
class Mark:
    """One occurrence of a phase in a role: ``start_ms``/``end_ms`` in epoch ms (memray's clock)."""

    phase: str
    stage: str
    round: int | None
    start_ms: float
    end_ms: float


def finite(value) -> int | float | None:
    """``value`` when it is an int or a finite float (not a bool), else None: numbers from disk are untrusted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _name(value) -> str | None:
    return (" ".join(value.split())[:MAX_NAME] or None) if isinstance(value, str) else None


def _stage(value) -> str:
    return value if value in STAGES else "-"


def marks(role: Role) -> tuple[list[Mark], int]:
    """The phase marks of ``role`` in time order, and how many malformed entries were skipped.

    A role without ``markers.json`` or without ``phases`` in it gives ``([], 0)``."""
    raw = (read_json(role.dir / "markers.json", {}) or {})
    entries = raw.get("phases") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        return [], 0
    out, skipped = [], 0
    for e in entries:
        if not isinstance(e, dict):
            skipped += 1
            continue
        name, start, end = _name(e.get("phase")), finite(e.get("start_ms")), finite(e.get("end_ms"))
        if name is None or start is None or end is None or end < start:
            skipped += 1
            continue
        rnd = e.get("round")
        out.append(Mark(name, _stage(e.get("stage")), rnd if isinstance(rnd, int) and not isinstance(rnd, bool)
                        else None, start, end))
    return sorted(out, key=lambda m: m.start_ms), skipped


def summary_phases(role: Role) -> list[dict]:
    """``summary.json``'s per-phase records of ``role`` (first-occurrence order), cleaned: names are
    strings, numbers finite or None; an entry without a name is skipped."""
    entries = role.get("phases")
    if not isinstance(entries, list):
        return []
    out = []
    for e in entries:
        name = _name(e.get("phase")) if isinstance(e, dict) else None
        if name is None:
            continue
        rec = {"phase": name, "stage": _stage(e.get("stage")), "exact": e.get("exact") is True,
               "upper_bound": e.get("upper_bound") is True}
        for key in ("count", "seconds", "peak_heap_bytes", "peak_rss_bytes", "samples"):
            rec[key] = finite(e.get(key))
        out.append(rec)
    return out


def phase_value(role: Role, phase: str, key: str = "peak_heap_bytes") -> float | None:
    """``key`` of ``phase`` in ``role``'s summary, or None when the role did not record that phase."""
    return next((p[key] for p in summary_phases(role) if p["phase"] == phase), None)


def profiled(summary: dict) -> bool:
    """False when the role ran without memray (``profiling.enabled=false``): no capture, so no per-phase peaks."""
    return not (summary.get("phase_peaks") is None and str(summary.get("capture_error") or "").startswith("no capture"))


UPPER_BOUND = "upper bound (shorter than one interval)"


def exactness(summary: dict, exact: bool | None = None, upper_bound: bool = False) -> str:
    """How exact a role's per-phase peaks are: ``exact``, ``upper bound (...)`` (an exact capture's phase
    with no snapshot inside: its interval's high-water mark), ``sampled every N ms``, ``not profiled`` (no
    capture: ``profiling.enabled=false``), or ``-`` (unknown).

    ``exact`` (a phase's own flag) wins over the role's ``phase_peaks``."""
    if not profiled(summary):
        return NOT_PROFILED
    if upper_bound:
        return UPPER_BOUND
    kind = ("exact" if exact else "sampled") if exact is not None else summary.get("phase_peaks")
    if kind == "exact":
        return "exact"
    if kind == "sampled":
        interval = finite(summary.get("memory_interval_ms"))
        return f"sampled every {interval:g} ms" if interval else "sampled"
    return "-"


def phase_names(jobs: list[Job]) -> list[str]:
    """Every phase name of ``jobs``' roles by stage (setup, FL, teardown), then servers' first, then
    in first-occurrence order."""
    names: dict[str, str] = {}
    for clients in (False, True):
        for job in jobs:
            for role in job.roles.values():
                if role.is_client == clients:
                    for p in summary_phases(role):
                        names.setdefault(p["phase"], p["stage"])
    order = {stage: i for i, stage in enumerate(STAGES)}
    return sorted(names, key=lambda n: order.get(names[n], len(STAGES)))


def stage_of(jobs: list[Job], phase: str) -> str:
    for job in jobs:
        for role in job.roles.values():
            for p in summary_phases(role):
                if p["phase"] == phase:
                    return p["stage"]
    return "-"


def phase_rows(job: Job) -> list[dict]:
    """The run view's per-phase rows: for each role, one row per phase, then one row per stage
    (``setup stage``: its peak heap; ``FL stage``: heap when FL began, FL peak heap and RSS, and
    FL working memory = FL peak - heap at FL start, in bytes and in units of M)."""
    rows = []
    for role in job.roles.values():
        s, phases = role.summary, summary_phases(role)
        for p in phases:
            rows.append({**p, "role": role.name, "level": "phase", "peaks": exactness(s, p["exact"], p["upper_bound"])})
        stage_rows = []
        setup = finite(s.get("setup_peak_heap_bytes"))
        if setup is not None:
            rss = [p["peak_rss_bytes"] for p in phases if p["stage"] == "setup" and p["peak_rss_bytes"] is not None]
            stage_rows.append({"phase": "setup stage", "stage": "setup", "peak_heap_bytes": setup,
                               "peak_rss_bytes": max(rss) if rss else None, **_sums(phases, "setup")})
        fl = {k: finite(s.get(k)) for k in ("fl_peak_heap_bytes", "fl_start_heap_bytes", "fl_working_heap_bytes",
                                              "fl_working_heap_in_M", "fl_peak_rss_bytes")}
        if any(v is not None for v in fl.values()):
            stage_rows.append({"phase": "FL stage", "stage": "fl", "peak_heap_bytes": fl["fl_peak_heap_bytes"],
                               "peak_rss_bytes": fl["fl_peak_rss_bytes"], "start_heap_bytes": fl["fl_start_heap_bytes"],
                               "adds_bytes": fl["fl_working_heap_bytes"], "adds_in_M": fl["fl_working_heap_in_M"],
                               **_sums(phases, "fl")})
        for r in stage_rows:
            rows.append({**r, "role": role.name, "level": "stage", "peaks": exactness(s)})
    return rows


def _sums(phases: list[dict], stage: str) -> dict:
    mine = [p for p in phases if p["stage"] == stage]
    seconds = [p["seconds"] for p in mine if p["seconds"] is not None]
    counts = [p["count"] for p in mine if p["count"] is not None]
    return {"seconds": sum(seconds) if seconds else None, "count": sum(counts) if counts else None}


def exactness_notes(job: Job) -> list[str]:
    """How exact the roles' per-phase peaks are (one note per kind, naming its roles), and which roles
    recorded no phases."""
    by_kind: dict[str, list[str]] = {}
    for role in job.roles.values():
        kind = exactness(role.summary) if summary_phases(role) else "none"
        by_kind.setdefault(kind, []).append(role.name)
    notes = []
    for kind, names in by_kind.items():
        who = ", ".join(names)
        if kind == "exact":
            notes.append(f"{who}: per-phase peak heap exact (all_allocations capture: memray's high-water mark "
                         "of each interval; a phase shorter than one interval gets its interval's mark, an upper "
                         "bound, marked as such); peak RSS per phase sampled")
        elif kind == "none":
            notes.append(f"{who}: no per-phase numbers (recorded before phases were marked, or the role did "
                         "not finish)")
        elif kind == NOT_PROFILED:
            notes.append(f"{who}: per-phase peaks {NOT_PROFILED}: no memray capture, times only")
        elif kind != "-":
            notes.append(f"{who}: per-phase peaks {kind} (memray memory snapshots: a spike shorter than the "
                         "interval can be missed)")
    missed = [f"{r.name} {p['phase']}" for r in job.roles.values() if profiled(r.summary)
              for p in summary_phases(r) if p["peak_heap_bytes"] is None]
    if missed:
        notes.append("no snapshot fell inside (shorter than the interval), so no peak: " + ", ".join(missed))
    return notes
