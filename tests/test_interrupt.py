"""Ctrl-C whenever it comes: every job whose folder exists keeps a result.json that says so, launch.log holds
the result, a sweep keeps its summary, no role outlives the launcher, and the message says what was recorded."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flmem import interrupt
from tests.conftest import REPO, TINY, job_dirs, result


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return not interrupt._is_role(pid)  # a zombie of a reaped role counts as gone


def test_a_job_folder_without_result_gets_one_and_its_live_roles_are_stopped(tmp_path):
    job = tmp_path / "3"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- optimize=true\n- rounds=3\n")
    (job / "launch.log").write_text("")
    status = job / "roles" / "server" / "status.json"
    status.parent.mkdir(parents=True)
    # a process that looks like a role: its argv names flmem.worker, and it writes its pid as a role does
    code = "import json, os, sys, time; open(sys.argv[1], 'w').write(json.dumps({'pid': os.getpid()})); time.sleep(120)"
    role = subprocess.Popen([sys.executable, "-c", code, str(status), "flmem.worker"], start_new_session=True)
    try:
        while role.poll() is None and not (status.exists() and status.read_text()):
            time.sleep(0.05)
        reason = interrupt.settle_job(job, "SIGINT")
        assert role.wait(timeout=30) == -signal.SIGTERM
    finally:
        if role.poll() is None:
            role.kill()
    res = result(job)
    assert res["status"] == "failed" and res["failure"] == {"role": "launcher", "reason": reason}
    assert reason == (f"interrupted (SIGINT); the job's process ended before it could record it; its roles still "
                      f"alive were stopped (pids {role.pid})")
    assert res["overrides"] == ["optimize=true", "rounds=3"]
    log = (job / "launch.log").read_text()
    assert f"job failed: failed in launcher: {reason}" in log and f"result: {job / 'result.json'}" in log
    assert interrupt.settle_job(job, "SIGINT") is None  # a result is never replaced
    assert (job / "launch.log").read_text() == log  # nor logged twice


def test_a_job_interrupted_before_its_roles_says_so(tmp_path):
    (tmp_path / "launch.log").write_text("")
    assert interrupt.settle_job(tmp_path, "SIGTERM") == "interrupted (SIGTERM) before any role started"
    assert result(tmp_path)["exit_codes"] == {} and result(tmp_path)["overrides"] == []


def test_the_message_says_nothing_was_recorded_when_no_folder_exists(tmp_path):
    saved = dict(interrupt.WATCHED)
    try:
        interrupt.WATCHED.update(run=None, sweep=None, summary=None)
        assert interrupt.record("SIGINT") == "interrupted (SIGINT) before the job's folder was created: nothing " \
                                             "was recorded"
        interrupt.WATCHED.update(run=tmp_path / "not-yet")
        assert "nothing was recorded" in interrupt.record("SIGINT") and not (tmp_path / "not-yet").exists()
        interrupt.WATCHED.update(run=None, sweep=tmp_path / "sweep-not-yet")
        assert interrupt.record("SIGINT") == "interrupted (SIGINT) before the sweep started: nothing was recorded"
    finally:
        interrupt.WATCHED.update(saved)


def _interrupt_when(proc, ready, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    assert proc.poll() is None, "the launch ended before the moment to interrupt it"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    return out


def _role_pids(root):
    return [json.loads(p.read_text())["pid"] for p in root.rglob("roles/*/status.json")]


def _check_interrupted_job(job):
    res = result(job)
    assert res["status"] == "failed" and res["failure"]["role"] == "launcher"
    assert res["failure"]["reason"].startswith("interrupted (SIGINT)")
    for name, summary in res["roles"].items():  # one exit code convention in every file
        assert summary["exit_code"] == res["exit_codes"][name]
        assert res["exit_codes"][name] in (0, -signal.SIGTERM, -signal.SIGKILL)
    assert f"result: {job / 'result.json'}" in (job / "launch.log").read_text()
    return res


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_ctrl_c_on_a_sweep_leaves_a_result_per_job_and_a_summary(tmp_path, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    args = [sys.executable, str(REPO / "launch.py"), "-m", *extra, "optimize=true,false", "rounds=200",
            "local_steps=1", *TINY[2:]]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _interrupt_when(proc, lambda: len(_role_pids(tmp_path)) >= 3)  # the first job's roles run
    assert proc.returncode == 130, out
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = job_dirs(tmp_path)
    assert jobs and all(j.parent == sweep for j in jobs)
    for job in jobs:
        _check_interrupted_job(job)
    for pid in _role_pids(tmp_path):
        assert _gone(pid)
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["jobs_total"] == len(jobs) and summary["jobs_failed"] == len(jobs)
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"interrupted (SIGINT): {len(jobs)} job(s) under {sweep} each have a result.json")
    assert last.endswith(f"summary: {sweep / 'summary.md'} and summary.json")


@pytest.mark.slow
def test_ctrl_c_as_soon_as_the_run_folder_exists_leaves_a_result_and_says_what_it_holds(tmp_path):
    args = [sys.executable, str(REPO / "launch.py"), *TINY]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _interrupt_when(proc, lambda: any(tmp_path.glob("outputs/runs/*/launch.log")))
    assert proc.returncode == 130, out
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    res = _check_interrupted_job(run)
    last = out.strip().splitlines()[-1]
    assert last == f"interrupted (SIGINT): {run / 'result.json'} records it: {res['failure']['reason']}"
