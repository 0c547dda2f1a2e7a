"""A client stopped in the middle of a real job: the job goes on without it when the strategy's policy allows,
and ends at once with the count when it does not; every role's capture stays readable."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, job_dirs, result


def stop_client_mid_job(tmp_path, overrides):
    """Launch a 3-client job and SIGTERM client 1 once it has finished its first round."""
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *TINY, *overrides], cwd=tmp_path,
                            env=dict(os.environ, COLUMNS="200"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline, stopped = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None and not stopped:
        status = next(tmp_path.glob("outputs/runs/*/roles/client_1/status.json"), None)
        try:
            state = json.loads(status.read_text()) if status else {}
        except ValueError:
            state = {}
        if (state.get("rounds_done") or 0) >= 1:
            os.kill(state["pid"], signal.SIGTERM)
            stopped = True
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert stopped, f"client 1 never finished a round:\n{out}"
    return proc.returncode, out, result(job_dirs(tmp_path)[0])


@pytest.mark.slow
def test_a_stopped_client_is_dropped_and_the_job_completes(tmp_path):
    code, out, res = stop_client_mid_job(tmp_path, ["num_clients=3", "rounds=4", "local_steps=20",
                                                    "strategy.min_fit_clients=2"])
    assert code == 0 and res["status"] == "completed", out
    assert [f["role"] for f in res["client_failures"]] == ["client_1"]
    assert res["exit_codes"]["client_1"] == -signal.SIGTERM or res["exit_codes"]["client_1"] == 143
    rounds = res["rounds"]
    assert len(rounds) == 4 and rounds[-1]["sampled"] == [0, 2] and rounds[-1]["updates"] == 2
    assert rounds[0]["updates"] == 3
    for r in rounds:  # where it left during a round, that round records why
        for failure in r["failures"]:
            assert failure["rank"] == 1 and "left the job" in failure["reason"]
    assert "the job went on without client_1" in out
    for name, summary in res["roles"].items():  # every capture is readable, the stopped client's too
        assert summary["peak_heap_bytes"] and summary["capture_error"] is None, name


@pytest.mark.slow
def test_too_few_clients_left_end_the_job_with_the_count(tmp_path):
    code, out, res = stop_client_mid_job(tmp_path, ["num_clients=3", "rounds=4", "local_steps=20",
                                                    "strategy.min_fit_clients=3"])
    assert code != 0 and res["status"] == "failed"
    assert res["failure"]["role"] == "client_1"
    assert "1 of 3 clients failed; strategy.min_fit_clients=3" in res["failure"]["reason"]
    assert all(s["capture_error"] is None for s in res["roles"].values())


@pytest.mark.slow
def test_a_bad_optimizer_argument_names_the_clients_error_not_the_servers(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *TINY, "+optimizer.bogus=1"], cwd=tmp_path,
                          env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True, timeout=600)
    res = result(job_dirs(tmp_path)[0])
    assert proc.returncode != 0 and res["status"] == "failed"
    assert res["failure"]["role"].startswith("client_")
    assert "unexpected keyword argument 'bogus'" in res["failure"]["reason"]


def test_the_clients_a_server_failure_says_left_are_read_from_both_of_its_forms():
    from flmem.launcher import _departed_ranks

    at_sampling = ("round 2: 2 client(s) available ([0, 2]), but strategy.min_fit_clients=3; clients that left the "
                   "job: {1: 'its connection closed (the client process exited or its network failed)', 3: 'x'}")
    in_round = ("round 0: only 2 of 3 client updates arrived (arrived: [0, 2]), strategy.min_fit_clients=3; late: "
                "none. Failed: client 1: left the job: its connection closed")
    assert _departed_ranks(at_sampling) == {"1", "3"} and _departed_ranks(in_round) == {"1"}
    assert _departed_ranks("round 0: only 1 of 2 client updates arrived; late: client 0") == set()
