"""What an interrupted ``launch.py`` leaves behind, whatever was running when Ctrl-C or SIGTERM came.

A job interrupted inside :func:`flmem.launcher.run_job` stops its roles and writes its own
``result.json``. Everything else is settled here, in the launcher process, on the way out:

* a job whose folder exists but holds no ``result.json`` (interrupted while Hydra set it up, or
  run by a worker process that ``hydra/launcher=joblib`` ended without flmem's handler) gets one
  (status failed, ``failure.role`` launcher, saying when), and its role processes still alive,
  found by the pids in ``roles/*/status.json``, are stopped (SIGTERM, then SIGKILL);
* a sweep gets its ``summary.json`` and ``summary.md`` for the jobs that exist;
* :func:`record` returns the line to print: what was recorded, or that nothing was.

The folders come from :class:`flmem.callbacks.SweepProgress` (:func:`expect_run`, :func:`expect_sweep`).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from flmem.status import read_json, write_json

#: the folders this process's run or sweep writes, and the summary settings of a sweep (None: no summary)
WATCHED: dict = {"run": None, "sweep": None, "summary": None}


def expect_run(run_dir: Path) -> None:
    """The run about to start writes ``run_dir`` (absolute)."""
    WATCHED["run"] = Path(run_dir)


def expect_sweep(sweep_dir: Path) -> None:
    """The sweep about to start writes its jobs under ``sweep_dir`` (absolute)."""
    WATCHED["sweep"] = Path(sweep_dir)


def _is_role(pid: int) -> bool:
    """True when ``pid`` is a live flmem role process (guards against a reused pid)."""
    try:
        return b"flmem.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_roles(job_dir: Path, grace_s: float = 5.0) -> list[int]:
    """SIGTERM the role processes of ``job_dir`` still alive (their capture closes), SIGKILL those
    still alive ``grace_s`` seconds later; returns their pids."""
    pids = []
    for status in sorted(Path(job_dir).glob("roles/*/status.json")):
        pid = (read_json(status, {}) or {}).get("pid")
        if isinstance(pid, int) and _is_role(pid):
            pids.append(pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_is_role(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _is_role(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # each role leads its own process group
            except OSError:
                pass
    return pids


def settle_job(job_dir: Path, how: str) -> str | None:
    """Give an interrupted job without ``result.json`` one, after stopping its live roles; returns
    the failure reason written, None when the job already had a result."""
    job_dir = Path(job_dir)
    if (job_dir / "result.json").exists():
        _log_once(job_dir)
        return None
    started = job_dir.stat().st_mtime
    stopped = stop_roles(job_dir)
    if (job_dir / "roles").exists():
        reason = (f"interrupted ({how}); the job's process ended before it could record it"
                  + (f"; its roles still alive were stopped (pids {', '.join(map(str, stopped))})" if stopped
                     else "; no role was still alive"))
    else:
        reason = f"interrupted ({how}) before any role started"
    overrides = read_json(job_dir / ".hydra" / "overrides.json", None)
    if overrides is None:
        try:
            import yaml

            overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        except Exception:  # a folder Hydra had not filled yet
            overrides = []
    # flmem.launcher's failed_result, without importing it: the interrupt may have cut an import short
    result = {"status": "failed", "failure": {"role": "launcher", "reason": reason},
              "overrides": [str(o) for o in overrides], "job_dir": str(job_dir), "started": started,
              "duration_s": time.time() - started, "exit_codes": {}, "rounds": [], "client_rounds": {}, "roles": {}}
    if (job_dir / "result.json").exists():  # the job recorded it meanwhile
        return None
    write_json(job_dir / "result.json", result)
    _log_line(job_dir, result)
    return reason


def _log_once(job_dir: Path) -> None:
    """Log the job's result to its ``launch.log`` when the job's process ended before it could."""
    try:
        logged = "][flmem.job][INFO] - result: " in (job_dir / "launch.log").read_text()
    except OSError:
        logged = False
    result = read_json(job_dir / "result.json")
    if not logged and isinstance(result, dict) and isinstance(result.get("failure"), dict):
        _log_line(job_dir, result)


def _log_line(job_dir: Path, result: dict) -> None:
    """Append the result to the job's ``launch.log`` (its Hydra logger may be gone by now)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"  # Hydra's format
    failure = result["failure"]
    try:
        with open(Path(job_dir) / "launch.log", "a") as fh:
            fh.write(f"[{stamp}][flmem.job][INFO] - job failed: failed in {failure['role']}: {failure['reason']}\n"
                     f"[{stamp}][flmem.job][INFO] - result: {Path(job_dir) / 'result.json'}\n")
    except OSError:
        pass


def record(how: str = "SIGINT") -> str:
    """Settle what this process was running when it was interrupted (``how``: SIGINT or SIGTERM) and
    return what to tell the user: which ``result.json`` and summary say so, or that nothing was recorded."""
    from flmem.callbacks import job_results, write_summary

    run, sweep = WATCHED["run"], WATCHED["sweep"]
    if sweep is not None:
        if not sweep.exists():
            return f"interrupted ({how}) before the sweep started: nothing was recorded"
        logged = {p.parent for p in sweep.rglob("launch.log") if "roles" not in p.relative_to(sweep).parts}
        jobs = sorted(set(job_results(sweep)) | (logged - {sweep}))  # launch.log comes before .hydra/
        written = sum(1 for j in jobs if settle_job(j, how))
        settled = (f" ({written} written now, for jobs whose process ended before it could record it; their roles "
                   "still alive were stopped)") if written else ""
        line = (f"interrupted ({how}): {len(jobs)} job(s) under {sweep} each have a result.json that says how they "
                f"ended{settled}" if jobs else f"interrupted ({how}) before any job of the sweep started under {sweep}")
        if WATCHED["summary"] is not None and jobs:
            try:
                key, noise = WATCHED["summary"]
                write_summary(sweep, key, noise)
                line += f"; summary: {sweep / 'summary.md'} and summary.json"
            except Exception as exc:  # noqa: BLE001 - a summary must never hide the interrupt
                line += f"; no summary ({type(exc).__name__}: {exc})"
        return line
    if run is None or not run.exists():
        return f"interrupted ({how}) before the job's folder was created: nothing was recorded"
    settle_job(run, how)
    res = read_json(run / "result.json", {}) or {}
    reason = (res.get("failure") or {}).get("reason") or res.get("status", "no result")
    return f"interrupted ({how}): {run / 'result.json'} records it: {reason}"
