"""Per-phase memory from a memray capture and the worker's phase marks (``markers.json["phases"]``).

Two sources, one per capture format:

* sampled (``profiling.capture_format=aggregated``, the default): memray's periodic memory snapshots
  (heap and RSS every ``profiling.memory_interval_ms``). A phase's peak is the largest snapshot inside
  it, so a spike shorter than the interval can be missed; a phase with no snapshot inside has None.
* exact (``all_allocations``): memray's high-water mark of every snapshot interval
  (``FileReader.get_temporal_high_water_mark_allocation_records``, which replays every allocation).
  A phase's peak is the largest high-water mark of the intervals that overlap it, so an interval
  straddling a phase boundary counts in both phases, and a phase shorter than one interval (no
  snapshot inside) gets its interval's high-water mark: an upper bound, flagged ``upper_bound`` with
  ``exact: false``. RSS stays sampled.

Snapshot times are whole milliseconds (memray truncates them), so a snapshot stamped ``t`` belongs to a
phase ``[start_ms, end_ms]`` when ``start_ms - 1 < t <= end_ms``. Phases that follow each other within
a millisecond (as the worker records them) therefore leave no snapshot out. Heap numbers include the
untracked baseline (peak heap = baseline + tracked), like ``summary.json``'s ``peak_heap_bytes``.
"""
from __future__ import annotations

from bisect import bisect_right

SAMPLE_KEYS = ("phases", "setup_peak_heap_bytes", "fl_peak_heap_bytes", "fl_start_heap_bytes",
               "fl_working_heap_bytes", "fl_working_heap_in_M", "fl_peak_rss_bytes", "phase_peaks",
               "memory_interval_ms")


def empty() -> dict:
    """The per-phase fields of ``summary.json`` when there is nothing to compute them from (all None)."""
    return {**{key: None for key in SAMPLE_KEYS}, "phases": []}


class _Timeline:
    """Snapshots ``(time_ms, rss, heap)`` sorted by time, and (exact) the high-water mark per interval.

    ``hwm[i]`` is the tracked heap's high-water mark between snapshot ``i - 1`` and snapshot ``i``; the
    last entry runs from its snapshot to the end of the capture (memray's layout: one more entry than
    the snapshots it paired, which stop at the last allocation record).
    """

    def __init__(self, snapshots, hwm, offset: int):
        self.times = [s[0] for s in snapshots]
        self.rss = [s[1] for s in snapshots]
        self.heap = [s[2] + offset for s in snapshots]
        self.hwm = None if hwm is None else [h + offset for h in hwm]
        self.paired = [] if hwm is None else self.times[:max(0, len(hwm) - 1)]

    def window(self, start_ms: float, end_ms: float) -> tuple[int, int | None, int | None]:
        """``(samples, peak heap, peak RSS)`` over ``[start_ms, end_ms]``; peaks are None without data."""
        lo, hi = bisect_right(self.times, start_ms - 1), bisect_right(self.times, end_ms)
        samples = hi - lo
        rss = max(self.rss[lo:hi]) if samples else None
        if self.hwm:
            first = bisect_right(self.paired, start_ms - 1)
            last = min(bisect_right(self.paired, end_ms), len(self.hwm) - 1)
            heap = max(self.hwm[first:last + 1]) if first <= last else None
        else:
            heap = max(self.heap[lo:hi]) if samples else None
        return samples, heap, rss

    def heap_before(self, when_ms: float) -> int | None:
        """The heap at the last snapshot stamped before ``when_ms`` (None if there is none)."""
        i = bisect_right(self.times, when_ms) - 1
        while i >= 0 and self.times[i] >= when_ms:
            i -= 1
        return self.heap[i] if i >= 0 else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize_phases(phases: list[dict], snapshots, *, hwm=None, offset: int = 0, model_bytes: int | None = None,
                     interval_ms: int | None = None) -> dict:
    """The per-phase fields of ``summary.json``.

    Args:
        phases: ``markers.json["phases"]``: ``{"phase", "stage", "round", "start_ms", "end_ms"}`` each.
        snapshots: ``(time_ms, rss_bytes, tracked_heap_bytes)`` per memray memory snapshot, in time order.
        hwm: exact tracked high-water mark per snapshot interval (see :class:`_Timeline`), or None (sampled).
        offset: bytes added to every heap figure (the untracked baseline).
        model_bytes: M, to express the FL working heap in units of M.
        interval_ms: the capture's snapshot interval, reported as is.
    Returns:
        ``phases`` (one entry per phase name in first-occurrence order: ``phase``, ``stage``, ``count``,
        ``seconds``, ``peak_heap_bytes``, ``peak_rss_bytes``, ``samples``, ``exact``), ``setup_peak_heap_bytes``,
        ``fl_peak_heap_bytes``, ``fl_start_heap_bytes``, ``fl_working_heap_bytes``, ``fl_working_heap_in_M``,
        ``fl_peak_rss_bytes``, ``phase_peaks`` ("exact" | "sampled") and ``memory_interval_ms``.
    """
    out = empty()
    out["memory_interval_ms"] = interval_ms
    line = _Timeline(snapshots, hwm, offset)
    exact = line.hwm is not None
    out["phase_peaks"] = "exact" if exact else "sampled"
    by_name: dict[str, dict] = {}
    for p in phases:
        samples, heap, rss = line.window(p["start_ms"], p["end_ms"])
        entry = by_name.setdefault(p["phase"], {"phase": p["phase"], "stage": p["stage"], "count": 0, "seconds": 0.0,
                                                "peak_heap_bytes": None, "peak_rss_bytes": None, "samples": 0,
                                                "exact": exact})
        entry["count"] += 1
        entry["seconds"] += (p["end_ms"] - p["start_ms"]) / 1000
        entry["peak_heap_bytes"] = _max([entry["peak_heap_bytes"], heap])
        entry["peak_rss_bytes"] = _max([entry["peak_rss_bytes"], rss])
        entry["samples"] += samples
        if exact and samples == 0:
            # No snapshot inside: the phase lies within one interval, whose high-water mark may belong to
            # its neighbours. Its peak is an upper bound, not the phase's own.
            entry["exact"] = False
            entry["upper_bound"] = True
    out["phases"] = list(by_name.values())
    for stage in ("setup", "fl"):
        mine = [p for p in phases if p["stage"] == stage]
        if not mine:
            continue
        start, end = min(p["start_ms"] for p in mine), max(p["end_ms"] for p in mine)
        _, heap, rss = line.window(start, end)
        out[f"{stage}_peak_heap_bytes"] = heap
        if stage == "fl":
            out["fl_peak_rss_bytes"] = rss
            out["fl_start_heap_bytes"] = line.heap_before(start)
    if out["fl_peak_heap_bytes"] is not None and out["fl_start_heap_bytes"] is not None:
        out["fl_working_heap_bytes"] = out["fl_peak_heap_bytes"] - out["fl_start_heap_bytes"]
        if model_bytes:
            out["fl_working_heap_in_M"] = out["fl_working_heap_bytes"] / model_bytes
    return out


def valid_phases(raw) -> list[dict]:
    """The well-formed phase records of ``markers.json`` (a hand-edited or torn file must not break a summary)."""
    good = []
    for p in raw if isinstance(raw, list) else []:
        try:
            if isinstance(p["phase"], str) and p["stage"] in ("setup", "fl", "teardown") \
                    and float(p["start_ms"]) <= float(p["end_ms"]):
                good.append({**p, "start_ms": float(p["start_ms"]), "end_ms": float(p["end_ms"])})
        except (KeyError, TypeError, ValueError):
            continue
    return good


def rss_breakdown(markers: dict) -> dict | None:
    """Where the RSS beyond the heap lives: process readings at the baseline, at the end of FL and at exit.

    Each reading (``markers.json``'s ``memory_at_baseline``, ``memory_at_fl_end``, ``memory_at_end``)
    holds ``rss_bytes``, ``rss_anon_bytes``, ``rss_file_bytes``, ``threads`` and glibc ``malloc`` counters
    (at the end of FL also ``malloc_arenas``: ``system`` and ``free`` bytes per arena, main arena first).
    ``growth`` is fl_end minus baseline: ``rss_anon_bytes`` (anonymous memory), ``malloc_in_use_bytes``
    (``uordblks + hblkhd``: the heap the allocator handed out), ``malloc_free_held_bytes`` (``fordblks``:
    freed but kept in glibc arenas), ``malloc_arena_bytes`` (arena bytes obtained from the kernel),
    ``threads``, and ``anon_outside_malloc_bytes`` (anonymous RSS growth minus the arena and mmapped
    growth: thread stacks, memray's own buffers, other non-malloc mappings). None without readings.
    """
    base, fl_end = markers.get("memory_at_baseline"), markers.get("memory_at_fl_end")
    readings = {k: markers.get(f"memory_at_{k}") for k in ("baseline", "fl_end", "end")}
    if not isinstance(base, dict) or not isinstance(fl_end, dict):
        return {"readings": readings, "growth": None} if any(readings.values()) else None

    def get(reading, key):
        value = reading.get(key)
        return value if isinstance(value, (int, float)) else None

    def malloc(reading, *keys):
        m = reading.get("malloc")
        if not isinstance(m, dict) or not all(isinstance(m.get(k), int) for k in keys):
            return None
        return sum(m[k] for k in keys)

    def diff(a, b):
        return None if a is None or b is None else a - b

    growth = {
        "rss_bytes": diff(get(fl_end, "rss_bytes"), get(base, "rss_bytes")),
        "rss_anon_bytes": diff(get(fl_end, "rss_anon_bytes"), get(base, "rss_anon_bytes")),
        "rss_file_bytes": diff(get(fl_end, "rss_file_bytes"), get(base, "rss_file_bytes")),
        "threads": diff(get(fl_end, "threads"), get(base, "threads")),
        "malloc_in_use_bytes": diff(malloc(fl_end, "uordblks", "hblkhd"), malloc(base, "uordblks", "hblkhd")),
        "malloc_free_held_bytes": diff(malloc(fl_end, "fordblks"), malloc(base, "fordblks")),
        "malloc_arena_bytes": diff(malloc(fl_end, "arena"), malloc(base, "arena")),
        "malloc_mmapped_bytes": diff(malloc(fl_end, "hblkhd"), malloc(base, "hblkhd")),
    }
    from_malloc = diff(malloc(fl_end, "arena", "hblkhd"), malloc(base, "arena", "hblkhd"))
    growth["anon_outside_malloc_bytes"] = diff(growth["rss_anon_bytes"], from_malloc)
    return {"readings": readings, "growth": growth}
