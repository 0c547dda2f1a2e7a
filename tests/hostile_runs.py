"""Runs on disk written by the test, no job started: a real memray capture (made once, in a subprocess)
and the files a job leaves (result.json, roles/<role>/summary.json, status.json, markers.json,
metrics.jsonl, flamegraph.html, .hydra/overrides.yaml), so hostile names and damaged files can be
planted anywhere in a few milliseconds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

MiB = 2**20
ROLES = ("server", "client_0", "client_1")
#: markup and HTML that must come out as text: a rich closing tag with no opening one, and an opening one
MARKUP = "[/x][bold]"

CAPTURE_SCRIPT = """
import sys, time, memray
with memray.Tracker(sys.argv[1], memory_interval_ms=5, native_traces=False):
    held = [bytearray(2**20) for _ in range(3)]
    time.sleep(0.15)
    del held
"""


@pytest.fixture(scope="session")
def capture(tmp_path_factory) -> tuple[Path, int]:
    """A real memray capture of a process that held 3 MiB, and its high-water mark in bytes."""
    import memray

    path = tmp_path_factory.mktemp("capture") / "capture.bin"
    subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(path)], check=True, timeout=120)
    reader = memray.FileReader(str(path))
    try:
        peak = int(reader.metadata.peak_memory)
    finally:
        reader.close()
    return path, peak


def summary(role: str, peak: int, **extra) -> dict:
    """A role's summary.json as a finished role writes it (bytes, seconds), ``peak`` its tracked peak heap."""
    base = 40 * MiB
    return {"role": role, "exit_code": 0, "error": None, "peak_heap_bytes": base + peak, "tracked_peak_bytes": peak,
            "baseline_heap_bytes": base, "working_heap_bytes": peak, "peak_rss_bytes": 300 * MiB,
            "working_rss_bytes": 20 * MiB, "total_allocations": 10, "duration_s": 1.5, "model_bytes": MiB,
            "working_heap_in_M": peak / MiB, "capture_error": None, "flamegraph_error": None,
            "phase_peaks": "sampled", "memory_interval_ms": 5,
            "top_sites": [{"function": "train", "file": "flmem/trainer.py", "line": 10, "bytes": peak,
                           "allocations": 3, "flmem_caller": "trainer.py:10 train"}], **extra}


def write_job(job: Path, overrides: list[str], capture: tuple[Path, int], *, status: str = "completed",
              failure: dict | None = None, summaries: dict[str, dict] | None = None,
              phase: str = "train") -> Path:
    """A finished job at ``job``: ``overrides`` in result.json and .hydra/overrides.yaml, one role per
    ROLES with the capture, a summary (``summaries`` replaces a role's), status.json, a phase mark
    named ``phase`` spanning the capture, metrics.jsonl and a one-line flamegraph.html."""
    path, peak = capture
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    import memray

    reader = memray.FileReader(str(path))
    try:
        snaps = list(reader.get_memory_snapshots())
    finally:
        reader.close()
    roles = {}
    for name in ROLES:
        role = job / "roles" / name
        role.mkdir(parents=True)
        shutil.copyfile(path, role / "capture.bin")
        roles[name] = (summaries or {}).get(name) or summary(name, peak, phases=[
            {"phase": phase, "stage": "fl", "count": 1, "seconds": 0.15, "peak_heap_bytes": 40 * MiB + peak,
             "peak_rss_bytes": 300 * MiB, "samples": len(snaps), "exact": False}])
        (role / "summary.json").write_text(json.dumps(roles[name]))
        (role / "status.json").write_text(json.dumps({"role": name, "pid": None, "phase": "done", "rounds_done": 1,
                                                      "rounds": 1, "updated": time.time() - 3600}))
        (role / "markers.json").write_text(json.dumps({"phases": [
            {"phase": phase, "stage": "fl", "round": 0, "start_ms": snaps[0].time, "end_ms": snaps[-1].time}]}))
        (role / "metrics.jsonl").write_text(json.dumps({"round": 0, "test_accuracy": 0.5}) + "\n")
        (role / "flamegraph.html").write_text(f"<!DOCTYPE html><title>flamegraph {name}</title><p>{name}</p>")
    result = {"status": status, "failure": failure, "overrides": overrides, "job_dir": str(job), "started": 1.9e9,
              "duration_s": 3.0, "model_bytes": MiB, "roles": roles,
              "rounds": [{"round": 0, "test_loss": 2.0, "test_accuracy": 0.5, "round_s": 1.0}],
              "client_rounds": {"client_0": [{"round": 0, "loss": 2.1, "train_s": 0.4}]}}
    (job / "result.json").write_text(json.dumps(result))
    return job


def write_sweep(root: Path, jobs: list[list[str]], capture: tuple[Path, int], names: list[str] | None = None,
                task: list[str] = ("optimize=false,true",), **kwargs) -> Path:
    """A sweep at ``root``: job ``i`` (directory ``names[i]``, default ``i``) with overrides ``jobs[i]``."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n"
                                        + "".join(f"    - {json.dumps(t)}\n" for t in task))
    for i, overrides in enumerate(jobs):
        write_job(root / (names[i] if names else str(i)), overrides, capture, **kwargs)
    return root
