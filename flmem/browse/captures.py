"""Check a role's memray capture and read its memory over time, without ever raising on a bad file.

A capture is *missing* (no ``capture.bin``), *unreadable* (memray cannot open it), or *truncated*
(memray opens it but finds no allocation records, or its high-water mark no longer matches the
peak heap recorded in ``summary.json``: a killed process or a file cut short).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flmem.status import open_regular


@contextlib.contextmanager
def _quiet_native_stderr():
    """memray's reader logs to the C stderr on odd files; keep that out of the browser's output."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _open_capture(capture: Path) -> tuple[int, str, int]:
    """``(fd, name, size)``: ``capture`` opened and checked as a regular file on its descriptor
    (:func:`flmem.status.open_regular`: a FIFO or a device is refused at once, never waited on), and the
    name memray should open: where the system has ``/proc/self/fd``, that very descriptor's, so the file
    memray reads is the one checked even if ``capture.bin`` is swapped meanwhile. The caller closes ``fd``.
    Raises FileNotFoundError or OSError (``not a regular file``)."""
    fd = open_regular(capture)
    proc = f"/proc/self/fd/{fd}"
    return fd, (proc if os.path.exists(proc) else str(capture)), os.fstat(fd).st_size


def check_capture(capture: Path, summary: dict) -> tuple[str, str | None]:
    """The state of ``capture`` (``ok``, ``missing``, ``unreadable``, ``truncated``) and why, if not ok.

    ``summary`` is the role's ``summary.json`` (may be empty): its ``peak_heap_bytes`` is compared
    with the capture's high-water mark, and its ``capture_error`` is reported for a missing file.
    """
    capture = Path(capture)
    if not os.path.lexists(capture) or (os.path.islink(capture) and not capture.exists()):
        if summary.get("capture"):
            return "missing", "capture.bin missing (it existed when the role was summarized)"
        return "missing", summary.get("capture_error") or "no capture.bin"
    try:
        fd, name, size = _open_capture(capture)
    except OSError as exc:  # a FIFO or a device would block memray's reader forever: refused unopened
        return "unreadable", ("capture.bin is not a regular file" if "not a regular file" in str(exc)
                              else f"unreadable capture ({exc})")
    try:
        import memray

        with _quiet_native_stderr():
            reader = memray.FileReader(name)
            try:
                meta = reader.metadata
                peak, allocations = int(meta.peak_memory), int(meta.total_allocations)
            finally:
                reader.close()
    except Exception as exc:
        return "unreadable", f"unreadable capture, {size} bytes ({type(exc).__name__}: {exc})"
    finally:
        os.close(fd)
    if allocations == 0 or peak == 0:
        return "truncated", f"truncated capture: no allocation records in its {size} bytes"
    # memray's own high-water mark: ``tracked_peak_bytes`` when the Tracker started after the imports
    recorded = summary.get("tracked_peak_bytes", summary.get("peak_heap_bytes"))
    if recorded is not None and int(recorded) != peak:
        return "truncated", (f"truncated capture: its high-water mark is {peak} bytes, summary.json "
                             f"recorded {recorded} bytes")
    if summary.get("capture_error"):
        return "unreadable", summary["capture_error"]
    return "ok", None


@dataclass
class Series:
    """Memory over time of one role: seconds since ``t0_ms`` (epoch ms: its first snapshot unless
    given), heap and RSS in bytes."""

    t_s: list[float]
    heap: list[int]
    rss: list[int]
    error: str | None = None
    t0_ms: float | None = None


def memory_over_time(capture: Path, max_points: int = 2000, heap_offset: int = 0,
                     t0_ms: float | None = None) -> Series:
    """memray's periodic memory snapshots of ``capture`` (thinned to ``max_points``, keeping each
    bucket's largest heap so the peak survives), with ``heap_offset`` bytes added to the heap (the
    untracked baseline when the Tracker started after the imports) and times in seconds since
    ``t0_ms`` (epoch ms; default: the first snapshot). A missing or unreadable file gives an empty
    Series whose ``error`` says why."""
    capture = Path(capture)
    if not capture.exists():
        return Series([], [], [], "no capture.bin")
    try:
        fd, name, _ = _open_capture(capture)
    except OSError as exc:
        return Series([], [], [], "capture.bin is not a regular file" if "not a regular file" in str(exc)
                      else f"unreadable capture ({exc})")
    try:
        import memray

        with _quiet_native_stderr():
            reader = memray.FileReader(name)
            try:
                snaps = list(reader.get_memory_snapshots())
            finally:
                reader.close()
    except Exception as exc:
        return Series([], [], [], f"unreadable capture ({type(exc).__name__}: {exc})")
    finally:
        os.close(fd)
    if not snaps:
        return Series([], [], [], "no memory snapshots in the capture")
    step = max(1, -(-len(snaps) // max_points))
    picked = [max(snaps[i:i + step], key=lambda s: s.heap) for i in range(0, len(snaps), step)]
    t0 = snaps[0].time if t0_ms is None else t0_ms
    return Series([(s.time - t0) / 1000 for s in picked], [int(s.heap) + heap_offset for s in picked],
                  [int(s.rss) for s in picked], t0_ms=float(t0))
