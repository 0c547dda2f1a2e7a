"""Phase marks: when a role did what (setup, federated learning, teardown), and cheap process-memory readings.

A role's life is a sequence of *phases*, each with a *stage*:

* setup: ``model`` (instantiating the model), ``data`` (client training data, server test data),
  ``connect`` (client: waiting for the server; server: starting gRPC);
* fl: client ``fetch``, ``train`` (``perturb`` with ``client.mode=comm_only``), ``push`` per round and
  a final ``fetch``; server ``receive``, ``aggregate``, ``evaluate`` per round and ``serve final``;
* teardown: ``save`` (the server writes ``global_model.pt``), ``shutdown`` (gRPC stops).

Each phase instance is ``{"phase", "stage", "round", "start_ms", "end_ms"}`` with wall-clock times in
epoch milliseconds (``time.time() * 1000``, the clock of memray's memory snapshots). The worker stores
the list as ``markers.json["phases"]``, also when the role fails (a phase cut short ends at the failure).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import time

STAGES = ("setup", "fl", "teardown")


class PhaseLog:
    """Appends one record per phase instance to ``records`` (a list the worker writes to ``markers.json``).

    Costs two ``time.time()`` calls and one dict per phase, so it can stay on in every run.
    """

    def __init__(self, records: list | None = None):
        self.records = [] if records is None else records

    @contextlib.contextmanager
    def phase(self, name: str, stage: str, round_idx: int | None = None):
        """Time the ``with`` block as phase ``name`` of ``stage`` (setup | fl | teardown), round ``round_idx``."""
        if stage not in STAGES:
            raise ValueError(f"phase stage {stage!r} is not one of {', '.join(STAGES)}")
        start = time.time() * 1000
        try:
            yield
        finally:
            self.records.append({"phase": name, "stage": stage, "round": round_idx, "start_ms": start,
                                 "end_ms": time.time() * 1000})

    def setup(self, name: str):
        return self.phase(name, "setup")

    def fl(self, name: str, round_idx: int | None):
        return self.phase(name, "fl", round_idx)

    def teardown(self, name: str):
        return self.phase(name, "teardown")


NO_PHASES = PhaseLog()  # the default of code run outside a worker (tests, notebooks): records go nowhere useful


# ---------------------------------------------------------------------------- process memory readings
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    # Looked up once: under memray, every dlopen (ctypes.CDLL) re-patches the symbols of every loaded
    # library, about 0.1 s with torch loaded. The worker calls this before its Tracker starts.
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


def _mallinfo2_fn():
    libc = _libc()
    return None if libc is None else libc.mallinfo2


def malloc_arenas() -> list[dict] | None:
    """Per glibc arena (the main one, then one per thread that got its own): bytes obtained from the kernel
    (``system``) and bytes free inside it (``free``), from ``malloc_info``; None where there is no glibc."""
    import os
    import tempfile
    import xml.etree.ElementTree as ET

    libc = _libc()
    if libc is None:
        return None
    fd, path = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    try:
        fp = libc.fopen(path.encode(), b"w")
        if not fp:
            return None
        try:
            libc.malloc_info(0, fp)
        finally:
            libc.fclose(fp)
        root = ET.fromstring(open(path).read())  # written by this process's own C library just now
    except (OSError, ET.ParseError):
        return None
    finally:
        os.unlink(path)
    arenas = []
    for heap in root.findall("heap"):
        system = heap.find("system[@type='current']")
        free = sum(int(t.get("size", 0)) for t in heap.findall("total") if t.get("type") in ("fast", "rest"))
        arenas.append({"system": int(system.get("size", 0)) if system is not None else None, "free": free})
    return arenas


def mallinfo2() -> dict | None:
    """glibc's ``mallinfo2`` counters in bytes (summed over all arenas), or None where there is no glibc.

    ``arena``: bytes the allocator got from the kernel for its arenas (sbrk and per-thread arena heaps);
    ``hblkhd``: bytes in mmapped blocks (large allocations); ``uordblks``: arena bytes in use;
    ``fordblks``: arena bytes free but held by the allocator; ``keepcost``: releasable top of the main arena.
    """
    fn = _mallinfo2_fn()
    if fn is None:
        return None
    info = fn()
    return {name: int(getattr(info, name)) for name in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost")}


def proc_status(path: str = "/proc/self/status") -> dict:
    """Resident memory (bytes) and thread count from ``/proc/self/status``; ``{}`` where it does not exist.

    Keys: ``rss_bytes`` (VmRSS), ``rss_anon_bytes`` (RssAnon: heap, arenas, stacks), ``rss_file_bytes``
    (RssFile: mapped libraries and files), ``rss_shmem_bytes``, ``hwm_bytes`` (VmHWM: the peak RSS so far),
    ``threads``.
    """
    fields = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes",
              "RssShmem": "rss_shmem_bytes", "VmHWM": "hwm_bytes", "Threads": "threads"}
    out = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in fields:
                    parts = value.split()
                    out[fields[key]] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        return {}
    return out


def memory_reading(arenas: bool = False) -> dict:
    """One cheap reading of the process's memory: :func:`proc_status` plus ``malloc`` (:func:`mallinfo2`) and,
    with ``arenas``, ``malloc_arenas`` (:func:`malloc_arenas`, a few milliseconds: it writes a small file)."""
    reading = {**proc_status(), "malloc": mallinfo2()}
    if arenas:
        reading["malloc_arenas"] = malloc_arenas()
    return {**reading, "time_ms": time.time() * 1000}
