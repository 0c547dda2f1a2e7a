"""Turn a role's memray capture into numbers (``summary.json``) and a flamegraph (aggregate, then render).

Definitions used throughout flmem:

* peak heap: memray's high-water mark of live heap allocations (bytes), ``metadata.peak_memory``.
* baseline heap: the heap when the role had finished its imports, before any model or data
  existed (bytes). With ``profiling.track_imports=true`` it is read from memray's periodic
  memory snapshots at the worker's baseline mark; by default the Tracker starts right after the
  imports and the baseline is the allocator's own count of bytes in use at that moment (glibc
  ``mallinfo2``: ``uordblks + hblkhd``), so peak heap = baseline + memray's tracked peak.
* working memory: peak heap minus baseline heap (bytes; also in units of M, the model bytes).
* peak RSS: the largest resident set size in the snapshots, and ``ru_maxrss`` of the process
  (recorded even when profiling is off).
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from flmem.flamegraph_offline import localize_flamegraph
from flmem.status import read_json, write_json


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not yet freed (glibc ``mallinfo2``), or None elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _baseline_heap(snapshots, baseline_ms: float | None) -> int | None:
    if baseline_ms is None or not snapshots:
        return None
    before = [s for s in snapshots if s.time <= baseline_ms]
    return int((before[-1] if before else snapshots[0]).heap)


def top_sites(reader, limit: int) -> list[dict]:
    """The allocation sites holding the most memory at the high-water mark.

    Each: ``{"function", "file", "line", "bytes", "allocations", "flmem_caller"}`` where
    ``flmem_caller`` is the innermost flmem frame of the stack ("which of our lines caused it").
    """
    sites: dict[tuple, dict] = defaultdict(lambda: {"bytes": 0, "allocations": 0, "flmem_caller": None})
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        stack = record.stack_trace()
        function, file, line = stack[0] if stack else ("<unknown>", "<unknown>", 0)
        site = sites[(function, file, line)]
        site["bytes"] += record.size
        site["allocations"] += record.n_allocations
        if site["flmem_caller"] is None:
            ours = next((f for f in stack if "/flmem/" in f[1]), None)
            site["flmem_caller"] = f"{Path(ours[1]).name}:{ours[2]} {ours[0]}" if ours else None
    ranked = sorted(sites.items(), key=lambda kv: -kv[1]["bytes"])[:limit]
    return [{"function": f, "file": file, "line": line, **v} for (f, file, line), v in ranked]


def summarize_role(role_dir: Path, role: str, *, model_bytes: int | None = None, top: int = 10) -> dict:
    """Read ``role_dir``'s capture and markers and write ``summary.json``; never raises on a bad capture.

    Returns the summary: bytes for memory, seconds for time; ``capture_error`` says why numbers
    from the capture are missing (profiling off, process killed, truncated file).
    """
    role_dir = Path(role_dir)
    markers = read_json(role_dir / "markers.json", {})
    capture = role_dir / "capture.bin"
    summary = {
        "role": role, "exit_code": markers.get("exit_code"), "error": markers.get("error"),
        "capture": str(capture) if capture.exists() else None, "flamegraph": None,
        "peak_heap_bytes": None, "tracked_peak_bytes": None, "baseline_heap_bytes": None, "working_heap_bytes": None,
        "peak_rss_bytes": markers.get("max_rss_bytes"), "total_allocations": None,
        "duration_s": (markers["end_ms"] - markers["start_ms"]) / 1000 if "end_ms" in markers else None,
        "model_bytes": model_bytes, "working_heap_in_M": None, "top_sites": [], "capture_error": None,
    }
    if not capture.exists():
        summary["capture_error"] = "no capture file (profiling.enabled=false, or the role never started)"
    else:
        try:
            _read_capture(capture, markers, summary, top)
        except Exception as exc:  # a killed process leaves an unreadable capture: say so, keep the rest
            summary["capture_error"] = f"unreadable capture ({type(exc).__name__}: {exc})"
    if summary["working_heap_bytes"] is not None and model_bytes:
        summary["working_heap_in_M"] = summary["working_heap_bytes"] / model_bytes
    write_json(role_dir / "summary.json", summary)
    return summary


def _read_capture(capture: Path, markers: dict, summary: dict, top: int) -> None:
    import memray

    reader = memray.FileReader(str(capture))
    try:
        meta = reader.metadata
        snapshots = list(reader.get_memory_snapshots())
        summary["tracked_peak_bytes"] = int(meta.peak_memory)
        summary["total_allocations"] = int(meta.total_allocations)
        if "untracked_baseline_heap_bytes" in markers:  # the Tracker started after the imports
            summary["baseline_heap_bytes"] = markers["untracked_baseline_heap_bytes"]
            summary["working_heap_bytes"] = summary["tracked_peak_bytes"]
            summary["peak_heap_bytes"] = summary["tracked_peak_bytes"] + (summary["baseline_heap_bytes"] or 0)
        else:
            summary["peak_heap_bytes"] = summary["tracked_peak_bytes"]
            summary["baseline_heap_bytes"] = _baseline_heap(snapshots, markers.get("baseline_ms"))
            if summary["baseline_heap_bytes"] is not None:
                summary["working_heap_bytes"] = summary["peak_heap_bytes"] - summary["baseline_heap_bytes"]
        if snapshots:
            summary["peak_rss_bytes"] = max(int(max(s.rss for s in snapshots)), summary["peak_rss_bytes"] or 0)
        if summary["duration_s"] is None:
            summary["duration_s"] = (meta.end_time - meta.start_time).total_seconds()
        summary["top_sites"] = top_sites(reader, top)
    finally:
        reader.close()


def render_flamegraph(capture: Path, html: Path, timeout_s: float = 300) -> str | None:
    """Render memray's flamegraph of the peak into ``html``, readable offline (flmem.flamegraph_offline);
    returns an error message or None."""
    if html.exists():
        return f"{html} exists; not overwritten"
    proc = subprocess.run([sys.executable, "-m", "memray", "flamegraph", "-o", str(html), str(capture)],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode == 0:
        return localize_flamegraph(html)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"memray flamegraph exited {proc.returncode}"


def finish_role(role_dir: Path, role: str, *, model_bytes: int | None, top: int, flamegraph: bool) -> dict:
    """Summarize a finished role and, when its capture is readable, render its flamegraph."""
    summary = summarize_role(role_dir, role, model_bytes=model_bytes, top=top)
    if flamegraph and summary["capture"] and not summary["capture_error"]:
        html = Path(role_dir) / "flamegraph.html"
        try:
            error = render_flamegraph(Path(summary["capture"]), html)
        except subprocess.TimeoutExpired:
            error = "memray flamegraph timed out"
        summary["flamegraph"] = str(html) if html.exists() else None
        summary["flamegraph_error"] = error
        write_json(Path(role_dir) / "summary.json", summary)
    return summary
