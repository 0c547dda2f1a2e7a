"""Turn a role's memray capture into numbers (``summary.json``) and a flamegraph (aggregate, then render).

Definitions used throughout flmem:

* peak heap: memray's high-water mark of live heap allocations (bytes), ``metadata.peak_memory``.
* baseline heap: the heap when the role had finished its imports, before any model or data
  existed (bytes). With ``profiling.track_imports=true`` it is read from memray's periodic
  memory snapshots at the worker's baseline mark; by default the Tracker starts right after the
  imports and the baseline is the allocator's own count of bytes in use at that moment (glibc
  ``mallinfo2``: ``uordblks + hblkhd``), so peak heap = baseline + memray's tracked peak.
* working memory: peak heap minus baseline heap (bytes; also in units of M, the model bytes).
* peak RSS: the largest of the resident set sizes in the snapshots, the worker's own ``ru_maxrss``
  (recorded even when profiling is off) and ``final_max_rss_bytes``, the ``ru_maxrss`` the launcher
  got when it reaped the process (the very end included: interpreter teardown, gRPC threads ending).
* working RSS: the peak RSS of the role's run (``run_peak_rss_bytes``: peak RSS less
  ``exit_rss_growth_bytes``, what the process's exit added) minus the RSS at the baseline mark.
* per-phase numbers (``phases``, ``fl_*``): see :mod:`flmem.phase_summary`.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from flmem import phase_summary
from flmem.flamegraph_offline import localize_flamegraph
from flmem.phases import mallinfo2
from flmem.status import read_json, write_json


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not yet freed (glibc ``mallinfo2``), or None elsewhere."""
    info = mallinfo2()
    return None if info is None else int(info["uordblks"] + info["hblkhd"])


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


def _final_rss(markers: dict) -> tuple[int | None, str | None]:
    """The role's peak RSS at the very end (``ru_maxrss`` from the launcher's ``wait4``), or None and why.

    Linux keeps ``ru_maxrss`` across exec, so it starts at the launcher's peak RSS
    (``inherited_max_rss_bytes``): a value not above that one says nothing about the role.
    """
    final, inherited = markers.get("final_max_rss_bytes"), markers.get("inherited_max_rss_bytes")
    if not isinstance(final, int):
        return None, "not recorded (the launcher did not reap the process with wait4)"
    if isinstance(inherited, int) and final <= inherited:
        return None, (f"masked: ru_maxrss at exit ({final} bytes) does not exceed the launcher's peak RSS "
                      f"the process inherited through exec ({inherited} bytes)")
    return final, None


def summarize_role(role_dir: Path, role: str, *, model_bytes: int | None = None, top: int = 10) -> dict:
    """Read ``role_dir``'s capture and markers and write ``summary.json``; never raises on a bad capture.

    Returns the summary: bytes for memory, seconds for time; ``capture_error`` says why numbers
    from the capture are missing (profiling off, process killed, truncated file).
    """
    role_dir = Path(role_dir)
    markers = read_json(role_dir / "markers.json", {})
    if not isinstance(markers, dict):
        markers = {}
    capture = role_dir / "capture.bin"
    final_rss, final_note = _final_rss(markers)
    rss_marks = [v for v in (markers.get("max_rss_bytes"), final_rss) if isinstance(v, int)]
    summary = {
        "role": role, "exit_code": markers.get("exit_code"), "error": markers.get("error"),
        "capture": str(capture) if capture.exists() else None, "flamegraph": None,
        "peak_heap_bytes": None, "tracked_peak_bytes": None, "baseline_heap_bytes": None, "working_heap_bytes": None,
        "peak_rss_bytes": max(rss_marks) if rss_marks else None, "total_allocations": None,
        "duration_s": (markers["end_ms"] - markers["start_ms"]) / 1000 if "end_ms" in markers else None,
        "model_bytes": model_bytes, "working_heap_in_M": None, "top_sites": [], "capture_error": None,
        **phase_summary.empty(),
        "final_max_rss_bytes": final_rss, "final_max_rss_note": final_note, "exit_rss_growth_bytes": None,
        "baseline_rss_bytes": markers.get("baseline_rss_bytes"), "working_rss_bytes": None, "run_peak_rss_bytes": None,
        "rss_breakdown": None,
    }
    stopped = memray_stopped(role_dir / "stderr.log")
    if not capture.exists():
        summary["capture_error"] = "no capture file (profiling.enabled=false, or the role never started)"
    elif stopped:  # the file reads as a whole capture, of the time before the write failed
        summary["capture_error"] = f"memray stopped recording before the role ended: {stopped}"
    else:
        try:
            _read_capture(capture, markers, summary, top)
        except Exception as exc:  # a killed process leaves an unreadable capture: say so, keep the rest
            summary["capture_error"] = f"unreadable capture ({type(exc).__name__}: {exc})"
    if not summary["phases"]:  # no capture to read peaks from: still the phases' counts and seconds
        with contextlib.suppress(Exception):
            phases = phase_summary.valid_phases(markers.get("phases"))
            if phases:
                summary.update(phase_summary.summarize_phases(phases, [], model_bytes=model_bytes),
                               phase_peaks=None, memory_interval_ms=None)
    if summary["working_heap_bytes"] is not None and model_bytes:
        summary["working_heap_in_M"] = summary["working_heap_bytes"] / model_bytes
    if final_rss is not None and isinstance(markers.get("memory_at_end"), dict) \
            and isinstance(markers["memory_at_end"].get("hwm_bytes"), int):
        # RSS the process gained after its last own reading: interpreter teardown (torch's libraries
        # fault in file-backed pages as they unload), gRPC threads ending.
        summary["exit_rss_growth_bytes"] = max(0, final_rss - markers["memory_at_end"]["hwm_bytes"])
    if summary["peak_rss_bytes"] is not None:
        # Working RSS counts the role's run, not its exit: torch's libraries fault in ~100 MiB of
        # file-backed pages while they unload, which says nothing about the FL code paths.
        # VmHWM read at the end can lag the RSS memray sampled (the kernel folds per-thread RSS counts
        # in lazily), so the run's peak is at least the largest sample.
        summary["run_peak_rss_bytes"] = max(summary["peak_rss_bytes"] - (summary["exit_rss_growth_bytes"] or 0),
                                            summary.get("sampled_peak_rss_bytes") or 0)
    if isinstance(summary["baseline_rss_bytes"], int) and summary["run_peak_rss_bytes"] is not None:
        summary["working_rss_bytes"] = summary["run_peak_rss_bytes"] - summary["baseline_rss_bytes"]
    try:
        summary["rss_breakdown"] = phase_summary.rss_breakdown(markers)
    except Exception as exc:  # noqa: BLE001 - a hand-edited markers.json must not lose the rest
        summary["rss_breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
    write_json(role_dir / "summary.json", summary)
    return summary


def memray_stopped(stderr_log: Path, tail: int = 256 * 1024) -> str | None:
    """memray's own line when it stopped recording because a write failed (a full disk: it prints
    ``Failed to write output, deactivating tracking``), from the end of the role's ``stderr.log``."""
    from flmem.diskfull import MEMRAY_STOPPED

    try:
        if not stderr_log.is_file():  # a FIFO would block the reader
            return None
        with open(stderr_log, "rb") as fh:
            fh.seek(max(0, stderr_log.stat().st_size - tail))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    said = [ln.strip() for ln in lines if any(m in ln for m in MEMRAY_STOPPED)]
    return "; ".join(dict.fromkeys(said))[:500] if said else None


def _read_capture(capture: Path, markers: dict, summary: dict, top: int) -> None:
    import memray

    # Every snapshot (memray thins them to 10,000 by default), so that they pair with the exact
    # per-interval high-water marks and short phases keep their samples.
    reader = memray.FileReader(str(capture), max_memory_records=2**31 - 1)
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
            summary["sampled_peak_rss_bytes"] = int(max(s.rss for s in snapshots))
            summary["peak_rss_bytes"] = max(summary["sampled_peak_rss_bytes"], summary["peak_rss_bytes"] or 0)
        if summary["duration_s"] is None:
            summary["duration_s"] = (meta.end_time - meta.start_time).total_seconds()
        summary["top_sites"] = top_sites(reader, top)
        _phase_peaks(reader, snapshots, markers, summary)
    finally:
        reader.close()


def _phase_peaks(reader, snapshots, markers: dict, summary: dict) -> None:
    """Fill the per-phase fields from the snapshots (sampled) or memray's per-interval high-water marks (exact)."""
    import memray

    phases = phase_summary.valid_phases(markers.get("phases"))
    if not phases:
        return
    hwm = None
    if reader.metadata.file_format == memray.FileFormat.ALL_ALLOCATIONS:
        _, hwm = reader.get_temporal_high_water_mark_allocation_records(merge_threads=True)
        hwm = list(hwm)
    offset = markers.get("untracked_baseline_heap_bytes") or 0
    interval = markers.get("memory_interval_ms")
    summary.update(phase_summary.summarize_phases(
        phases, [(s.time, s.rss, s.heap) for s in snapshots], hwm=hwm, offset=int(offset),
        model_bytes=summary.get("model_bytes"), interval_ms=interval))


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
