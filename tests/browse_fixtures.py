"""Real outputs for tests/test_browse.py: one tiny sweep (two jobs that run, two that fail), and
runs derived from it with a missing, an unreadable and a truncated capture, or no result.json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["rounds=1", "local_steps=2", "dataset.train_size=256", "dataset.test_size=128",
        "dataset.samples_per_client=64", "dataset.test_samples=64", "timeouts.job_s=600"]
#: optimize=true,false x num_clients=0,2: num_clients=0 fails config validation (a failed job that
#: costs nothing), num_clients=2 gives one original/optimized pair with a server and two clients.
SWEEP = ["optimize=true,false", "num_clients=0,2", *TINY]  # conf/config.yaml enables the sweep summary callback


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium_argv(browser: str, profile: Path) -> list[str]:
    """Headless and offline: no sandbox (root in CI), no GPU, no network services, a throwaway profile."""
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}"]


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Path:
    """``<tmp>/outputs`` after running SWEEP for real (about two minutes on two cores)."""
    cwd = tmp_path_factory.mktemp("browse")
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "-m", *SWEEP], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, COLUMNS="200"))
    (cwd / "sweep.log").write_text(proc.stdout + proc.stderr)
    sweeps = list((cwd / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, f"launch.py exits 1 when a job failed; got {proc.returncode}\n{proc.stderr[-3000:]}"
    return cwd / "outputs"


@pytest.fixture(scope="session")
def sweep(outputs) -> Path:
    return next((outputs / "multirun").iterdir())


@pytest.fixture(scope="session")
def sweep_log(outputs) -> str:
    return (outputs.parent / "sweep.log").read_text()


def completed_job(sweep_dir: Path, optimize: str) -> Path:
    for job in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        result = json.loads((job / "result.json").read_text())
        if result["status"] == "completed" and f"optimize={optimize}" in [o.lower() for o in result["overrides"]]:
            return job
    raise AssertionError(f"no completed job with optimize={optimize} in {sweep_dir}")


@pytest.fixture(scope="session")
def damaged_run(outputs, sweep) -> Path:
    """A single run copied from a completed job: server capture deleted, client_0's cut to 1000 bytes
    (unreadable), client_1's cut to half its size (truncated)."""
    run = outputs / "runs" / "2030-01-01_00-00-00-000000"
    shutil.copytree(completed_job(sweep, "true"), run, ignore=shutil.ignore_patterns(".hydra"))
    (run / "roles" / "server" / "capture.bin").unlink()
    os.truncate(run / "roles" / "client_0" / "capture.bin", 1000)
    client_1 = run / "roles" / "client_1" / "capture.bin"
    os.truncate(client_1, client_1.stat().st_size // 2)
    return run


@pytest.fixture()
def unfinished_runs(tmp_path, sweep) -> tuple[Path, Path]:
    """Two copies of a job without result.json: one whose roles wrote status.json just now
    (running), one untouched for an hour (incomplete: the launcher died)."""
    src = completed_job(sweep, "true")
    running, dead = tmp_path / "running", tmp_path / "dead"
    for dst in (running, dead):
        shutil.copytree(src, dst)
        (dst / "result.json").unlink()
        for summary in dst.glob("roles/*/summary.json"):
            summary.unlink()
    status = json.loads((running / "roles" / "server" / "status.json").read_text())
    status.update(phase="round 1", updated=time.time(), pid=os.getpid())
    (running / "roles" / "server" / "status.json").write_text(json.dumps(status))
    old = time.time() - 3600
    for path in dead.glob("roles/*/status.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "updated": old, "pid": None}))
    for path in [dead, *dead.rglob("*")]:
        os.utime(path, (old, old))
    return running, dead


# ------------------------------------------------------------------------------- phase data
MiB = 2**20
SERVER_PHASES = [("model", "setup"), ("data", "setup"), ("connect", "setup"), ("receive", "fl"),
                 ("aggregate", "fl"), ("evaluate", "fl"), ("serve final", "fl"), ("save", "teardown")]
CLIENT_PHASES = [("model", "setup"), ("data", "setup"), ("connect", "setup"), ("fetch", "fl"), ("train", "fl"),
                 ("push", "fl")]
FL_ROUNDS = 2


def phase_numbers(summary: dict, role: str, fl_extra: int = 0) -> dict:
    """The per-phase numbers ``add_phases`` writes for a role whose summary is ``summary``: setup phases
    at baseline + 1, 2, 3 MiB, FL phases at the role's peak heap (+ ``fl_extra``) minus 0..3 MiB (the
    client's ``train``, the server's ``aggregate`` reach the peak), RSS likewise below the peak RSS."""
    base, peak, rss = summary["baseline_heap_bytes"], summary["peak_heap_bytes"] + fl_extra, summary["peak_rss_bytes"]
    phases, fl_below = [], {"fetch": 2, "train": 0, "push": 1, "receive": 1, "aggregate": 0, "evaluate": 2,
                            "serve final": 3}
    for i, (name, stage) in enumerate(SERVER_PHASES if role == "server" else CLIENT_PHASES):
        heap = {"setup": base + (i + 1) * MiB, "fl": peak - fl_below.get(name, 0) * MiB,
                "teardown": base + 2 * MiB}[stage]
        phases.append({"phase": name, "stage": stage, "count": FL_ROUNDS if stage == "fl" else 1,
                       "seconds": 0.25 * (i + 1), "peak_heap_bytes": heap, "peak_rss_bytes": rss - (8 - i) * MiB,
                       "samples": 10 * (i + 1), "exact": False})
    fl_start = base + 3 * MiB
    return {"phases": phases, "setup_peak_heap_bytes": base + 3 * MiB, "fl_peak_heap_bytes": peak,
            "fl_start_heap_bytes": fl_start, "fl_working_heap_bytes": peak - fl_start,
            "fl_working_heap_in_M": (peak - fl_start) / summary["model_bytes"], "fl_peak_rss_bytes": rss - MiB,
            "phase_peaks": "sampled", "memory_interval_ms": 10, "baseline_rss_bytes": rss - 40 * MiB,
            "working_rss_bytes": 40 * MiB, "rss_breakdown": {"heap": peak}, "peak_heap_bytes": peak}


def add_phases(job_dir: Path, fl_extra: int = 0) -> dict[str, dict]:
    """Fixture helper: give a copied job the phase data the roles record (markers.json ``phases``:
    setup phases, FL_ROUNDS rounds of FL phases, teardown, spread evenly between the baseline mark and
    the role's end; summary.json: ``phase_numbers``). Returns the numbers written, per role."""
    written = {}
    for role_dir in sorted((job_dir / "roles").iterdir()):
        summary = json.loads((role_dir / "summary.json").read_text())
        markers = json.loads((role_dir / "markers.json").read_text())
        names = SERVER_PHASES if role_dir.name == "server" else CLIENT_PHASES
        setup = [(n, s, None) for n, s in names if s == "setup"]
        fl = [(n, s, r) for r in range(FL_ROUNDS) for n, s in names if s == "fl"]
        order = setup + fl + [(n, s, None) for n, s in names if s == "teardown"]
        t0, t1 = markers["baseline_ms"], markers["end_ms"]
        step = (t1 - t0) / len(order)
        markers["phases"] = [{"phase": n, "stage": s, "round": r, "start_ms": t0 + i * step,
                              "end_ms": t0 + (i + 0.9) * step} for i, (n, s, r) in enumerate(order)]
        numbers = phase_numbers(summary, role_dir.name, fl_extra)
        summary.update(numbers)
        (role_dir / "markers.json").write_text(json.dumps(markers))
        (role_dir / "summary.json").write_text(json.dumps(summary))
        written[role_dir.name] = numbers
    return written


def copy_job(src: Path, dst: Path, overrides: dict[str, str] | None = None) -> Path:
    """Copy a job directory; ``overrides`` (key -> value) are set in its result.json's overrides."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".hydra", "report*"))
    if overrides:
        result = json.loads((dst / "result.json").read_text())
        kept = [o for o in result["overrides"] if o.partition("=")[0] not in overrides]
        result["overrides"] = kept + [f"{k}={v}" for k, v in overrides.items()]
        (dst / "result.json").write_text(json.dumps(result))
    return dst


PHASE_KEYS = ("phases", "setup_peak_heap_bytes", "fl_peak_heap_bytes", "fl_start_heap_bytes", "fl_working_heap_bytes",
              "fl_working_heap_in_M", "fl_peak_rss_bytes", "phase_peaks", "baseline_rss_bytes", "working_rss_bytes",
              "rss_breakdown")


def strip_phases(job_dir: Path) -> Path:
    """Fixture helper: make a copied job look recorded before phases existed (no phase keys anywhere)."""
    for name in ("summary.json", "markers.json"):
        for path in job_dir.glob(f"roles/*/{name}"):
            data = json.loads(path.read_text())
            path.write_text(json.dumps({k: v for k, v in data.items() if k not in PHASE_KEYS}))
    result = json.loads((job_dir / "result.json").read_text())
    for summary in result.get("roles", {}).values():
        for key in PHASE_KEYS:
            summary.pop(key, None)
    (job_dir / "result.json").write_text(json.dumps(result))
    return job_dir


def make_sweep(root: Path, jobs: list[tuple[Path, dict[str, str]]], task: list[str]) -> Path:
    """Fixture helper: a sweep directory at ``root`` whose job ``i`` is a copy of ``jobs[i][0]`` with the
    overrides ``jobs[i][1]``, and a multirun.yaml listing ``task`` as the sweep's overrides."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n" + "".join(f"    - {t}\n" for t in task))
    for i, (src, overrides) in enumerate(jobs):
        copy_job(src, root / str(i), overrides)
    return root
