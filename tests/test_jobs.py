"""Whole jobs as a user runs them: `python launch.py ...` with real processes, gRPC and memray captures."""
import json
import os
import signal
import subprocess
import sys
import time

import memray
import pytest
import torch

from flmem.flamegraph_offline import JOB_ASSETS, external_resources
from tests.conftest import REPO, TINY, job_dirs, launch, result

from flamegraph_browser import frames_are_painted, open_offline

pytestmark = pytest.mark.slow


def check_role_files(job_dir, roles, track_imports=False):
    res = result(job_dir)
    assert sorted(res["roles"]) == sorted(roles)
    for role in roles:
        role_dir = job_dir / "roles" / role
        summary = json.loads((role_dir / "summary.json").read_text())
        reader = memray.FileReader(str(role_dir / "capture.bin"))
        assert reader.metadata.peak_memory > 0
        assert summary["tracked_peak_bytes"] == reader.metadata.peak_memory
        assert 50 * 2**20 < summary["baseline_heap_bytes"] < summary["peak_heap_bytes"]  # torch alone is more
        assert summary["working_heap_bytes"] == summary["peak_heap_bytes"] - summary["baseline_heap_bytes"]
        if not track_imports:  # the Tracker started after the imports: it saw the working memory only
            assert summary["working_heap_bytes"] == reader.metadata.peak_memory
        assert summary["peak_rss_bytes"] >= summary["peak_heap_bytes"] - summary["baseline_heap_bytes"]
        assert summary["total_allocations"] > 0 and summary["duration_s"] > 0 and summary["top_sites"]
        assert (role_dir / "flamegraph.html").stat().st_size > 10_000
        assert summary["flamegraph_error"] is None
        assert external_resources((role_dir / "flamegraph.html").read_text()) == []  # offline: links to JOB_ASSETS
        assert (job_dir / JOB_ASSETS / "d3-flame-graph@4.1.3" / "dist" / "d3-flamegraph.min.js").is_file()
        assert res["roles"][role]["peak_heap_bytes"] == summary["peak_heap_bytes"]
    return res


def test_default_run_prints_progress_and_the_memory_table(tmp_path):
    proc = launch([], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_dirs(tmp_path)
    res = check_role_files(job, ["server", "client_0", "client_1"])
    assert res["status"] == "completed" and len(res["rounds"]) == 3
    assert 0.0 <= res["rounds"][-1]["test_accuracy"] <= 1.0
    assert res["rounds"][-1]["test_accuracy"] > 0.2  # learnable: twice chance (0.1) at least
    out = proc.stdout
    assert "3/3" in out and "peak heap MiB" in out
    for role in ("server", "client_0", "client_1"):
        assert str(job / "roles" / role / "flamegraph.html") in out
    # the server's flamegraph draws offline, down from the worker's entry point
    shot = REPO / "test-artifacts" / "flamegraph-server.png"
    shot.unlink(missing_ok=True)
    frames = open_offline(job / "roles" / "server" / "flamegraph.html", tmp_path / "profile", shot)
    assert len(frames) > 5 and any("run_role(" in name for name, _, _ in frames), [n for n, _, _ in frames]
    frames_are_painted(shot, {fill for _, _, fill in frames})


def test_exact_sweep_runs_four_profiled_jobs_and_paths_agree(tmp_path, tiny_data):
    proc = launch(["-m", "dataset=cifar,mnist", "optimize=true,false"], tmp_path, env={"FLMEM_DATA": str(tiny_data)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"] and len({j.parent for j in jobs}) == 1
    finals = {}
    for job in jobs:
        res = check_role_files(job, ["server", "client_0", "client_1"])
        assert res["status"] == "completed" and len(res["rounds"]) == 3
        overrides = dict(o.split("=") for o in res["overrides"])
        channels = 3 if overrides["dataset"] == "cifar" else 1
        state = torch.load(job / "roles" / "server" / "global_model.pt", weights_only=True)
        assert next(iter(state.values())).shape[1] == channels  # the model fits the dataset
        finals[(overrides["dataset"], overrides["optimize"].lower())] = state  # Hydra writes True/False
    for dataset in ("cifar", "mnist"):
        original, optimized = finals[(dataset, "false")], finals[(dataset, "true")]
        for name in original:  # two clients: FedAvg sums in the same order on both paths, so bit for bit
            assert torch.equal(original[name], optimized[name]), name


def test_fashion_mnist_from_debian_files(tmp_path):
    proc = launch(["dataset=fashion_mnist", f"dataset.root={tmp_path / 'nothing-here'}", "profiling.track_imports=true",
                   *TINY], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_dirs(tmp_path)
    res = check_role_files(job, ["server", "client_0", "client_1"], track_imports=True)
    assert res["rounds"][-1]["test_samples"] == 64
    assert all(r["samples"] == 48 for r in res["client_rounds"]["client_0"])


def test_crashed_client_ends_the_job_with_its_name_and_keeps_other_captures(tmp_path):
    # every client is needed (strategy.min_fit_clients=num_clients): a dead one ends the job at once
    args = [sys.executable, str(REPO / "launch.py"), "rounds=200", "local_steps=1", "timeouts.round_s=120",
            "strategy.min_fit_clients=2"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status_file = None
    deadline = time.time() + 180
    while time.time() < deadline:
        found = list(tmp_path.glob("outputs/runs/*/roles/client_1/status.json"))
        if found and json.loads(found[0].read_text()).get("rounds_done", 0) >= 1:
            status_file = found[0]
            break
        time.sleep(0.2)
    assert status_file, "client_1 never finished a round"
    os.kill(json.loads(status_file.read_text())["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "failed"
    assert res["failure"] == {"role": "client_1", "reason": "killed by signal SIGKILL (1 of 2 clients failed; "
                              "strategy.min_fit_clients=2, strategy.accept_failures=true)"}
    assert "job failed in client_1: killed by signal SIGKILL" in " ".join(out.split())
    server = json.loads((job / "roles" / "server" / "summary.json").read_text())
    assert server["capture_error"] is None and server["peak_heap_bytes"] > 0  # stopped cleanly, capture kept
    assert res["roles"]["client_1"]["capture_error"].startswith("unreadable capture")


def test_bad_input_fails_fast_with_the_key_and_the_fix(tmp_path):
    proc = launch(["num_clients=0", "transport.chunk_size=8388608"], tmp_path)
    assert proc.returncode == 1
    assert "num_clients=0: must be an integer >= 1" in proc.stdout
    assert "transport.chunk_size=8388608: must be between 1024" in proc.stdout
    proc = launch(["dataset=cifar", f"dataset.root={tmp_path / 'missing'}", "dataset.download=false"], tmp_path)
    assert proc.returncode == 1 and "cifar-10-batches-py lacks data_batch_1" in " ".join(proc.stdout.split())
    proc = launch(["dataset=imagenet"], tmp_path)
    assert proc.returncode == 1 and "Available options" in proc.stderr and "fashion_mnist" in proc.stderr
    roles = {dict(o.split("=", 1) for o in result(j)["overrides"]).get("dataset"): result(j)["failure"]["role"]
             for j in job_dirs(tmp_path)}
    assert roles == {None: "config", "cifar": "data"}  # missing data files are labelled data, not config
    assert not list(tmp_path.glob("outputs/**/capture.bin"))  # no process was started


def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path):
    args = [sys.executable, str(REPO / "launch.py"), "rounds=0"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    assert [p.wait(120) for p in procs] == [1, 1]
    assert len(job_dirs(tmp_path)) == 2


def test_multirun_goes_on_after_a_failed_job(tmp_path):
    proc = launch(["-m", "num_clients=0,2", *TINY], tmp_path)
    assert proc.returncode == 1  # a sweep with a failed job says so
    first, second = job_dirs(tmp_path)
    assert result(first)["status"] == "failed" and "num_clients=0" in result(first)["failure"]["reason"]
    assert result(second)["status"] == "completed"


def test_server_and_clients_started_as_separate_roles(tmp_path, free_port):
    common = [*TINY, f"server.port={free_port}"]
    server = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "role=server", *common],
                              cwd=tmp_path / ".", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = []
    for rank in range(2):
        cwd = tmp_path / f"client{rank}"
        cwd.mkdir()
        clients.append((cwd, subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), "role=client", f"role.rank={rank}",
             f"server.address=127.0.0.1:{free_port}", *common], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    out, _ = server.communicate(timeout=300)
    assert server.returncode == 0, out
    assert f"server listening on 127.0.0.1:{free_port}" in out
    for cwd, proc in clients:
        client_out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, client_out
        (job,) = job_dirs(cwd)
        assert len(result(job)["client_rounds"]) == 1
    (server_job,) = [j for j in job_dirs(tmp_path) if (j / "roles" / "server").exists()]
    res = check_role_files(server_job, ["server"])
    assert len(res["rounds"]) == 2


def test_sigterm_then_ctrl_c_on_the_launcher_stops_every_role(tmp_path):
    args = [sys.executable, str(REPO / "launch.py"), "rounds=200", "local_steps=1"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, statuses = time.time() + 180, []
    while time.time() < deadline and not statuses:
        found = list(tmp_path.glob("outputs/runs/*/roles/client_0/status.json"))
        if found and json.loads(found[0].read_text()).get("rounds_done", 0) >= 1:
            statuses = list(found[0].parent.parent.glob("*/status.json"))
        time.sleep(0.2)
    assert len(statuses) == 3, "the job never got going"
    pids = [json.loads(p.read_text())["pid"] for p in statuses]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # a second, impatient signal must not leave a role behind
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "failed" and res["failure"]["role"] == "launcher"
    assert res["failure"]["reason"].startswith("interrupted (SIGTERM)")
    assert all(s["capture_error"] is None for s in res["roles"].values())  # every capture closed cleanly
    # one exit code per role, the same in exit_codes and the role's summary: -15 for a role stopped by SIGTERM
    assert {n: s["exit_code"] for n, s in res["roles"].items()} == res["exit_codes"]
    assert res["exit_codes"]["server"] in (-signal.SIGTERM, -signal.SIGKILL)
    assert 128 + signal.SIGTERM not in res["exit_codes"].values()
