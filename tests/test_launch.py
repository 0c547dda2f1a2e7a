"""launch.py as a user meets it: its help, a sweep's progress and exit status whatever the launcher,
a used sweep dir, a server for other hosts, and Ctrl-C while a job is being summarized."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from flmem.address import resolves_outward, server_addresses
from flmem.browse.discover import load_job
from tests.conftest import REPO, TINY, job_dirs, launch, result

FAILING = ["-m", "num_clients=0,-1"]  # both jobs fail config validation: no role process starts


def files_of(root):
    """Every file under ``root`` with its size, mtime and content hash: what "untouched" means."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hash(p.read_bytes()))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_help_shows_groups_common_keys_and_examples(tmp_path):
    proc = launch(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("flmem measures, and cuts, the memory of federated learning over gRPC")
    for line in ("dataset: cifar, fashion_mnist, mnist, synthetic, tokens", "model: cnn, resnet18, transformer",
                 "optimizer: adam, sgd", "role: client, local, server", "experiment: bench_tiny, client_overhead"):
        assert line in out  # Hydra's $APP_CONFIG_GROUPS, read from conf/
    for key in ("optimize=true|false", "num_clients=N", "dataset.partition=iid|dirichlet", "server.host=HOST",
                "hydra/launcher=joblib", "($FLMEM_DATA, else ./data)"):
        assert key in out
    for example in ("python launch.py   ", "python launch.py -m dataset=cifar,mnist optimize=true,false",
                    "flmem browse latest"):
        assert example in out
    assert "Powered by Hydra" not in out and not (tmp_path / "outputs").exists()  # help runs nothing


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_failed_sweep_exits_1_with_a_progress_line_per_job_whatever_the_launcher(tmp_path, launcher):
    extra = ["hydra/launcher=joblib"] if launcher == "joblib" else []
    proc = launch([*FAILING, *extra], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    jobs = job_dirs(tmp_path)
    assert [result(j)["status"] for j in jobs] == ["failed", "failed"]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("job ") and " of " in ln]
    assert sorted(ln.split(",")[0] for ln in lines) == ["job 1 of 2", "job 2 of 2"]
    assert all(", elapsed " in ln for ln in lines)
    if launcher == "basic":  # jobs one after the other: the second knows how long the first took
        assert lines[0].endswith("time remaining estimated once a job has ended")
        assert "remaining (" in lines[1] and "per job so far)" in lines[1]


@pytest.mark.slow
def test_sweep_that_succeeds_under_joblib_exits_0(tmp_path):
    proc = launch(["-m", "hydra/launcher=joblib", "rounds=1", *TINY[1:], "profiling.flamegraph=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_dirs(tmp_path)
    assert result(job)["status"] == "completed"
    assert "job 1 of 1, elapsed " in proc.stdout


def test_a_used_sweep_dir_is_refused_before_anything_is_written(tmp_path):
    sweep = tmp_path / "outputs" / "sweep"
    first = launch([*FAILING, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert first.returncode == 1 and (sweep / "summary.json").exists() and (sweep / "multirun.yaml").exists()
    before = files_of(sweep)
    again = launch(["-m", "num_clients=5,6", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert again.returncode == 1
    message = " ".join(again.stderr.split())
    assert f"hydra.sweep.dir={sweep} already holds 0, 1, multirun.yaml, summary.json, summary.md" in message
    assert "nothing was run" in message and "Run again without hydra.sweep.dir" in message
    assert "job 1 of" not in again.stdout and "num_clients=5" not in again.stdout  # no job started or summarized
    assert files_of(sweep) == before


def test_without_the_guard_each_job_names_the_sweep_key_and_old_jobs_are_not_summarized(tmp_path):
    sweep = tmp_path / "outputs" / "sweep"
    assert launch([*FAILING, f"hydra.sweep.dir={sweep}"], tmp_path).returncode == 1
    summary = (sweep / "summary.json").read_bytes()
    old_results = [(j / "result.json").read_bytes() for j in job_dirs(tmp_path)]
    again = launch(["-m", "num_clients=1,2", f"hydra.sweep.dir={sweep}", "~hydra.callbacks.sweep_progress"],
                   tmp_path)  # valid jobs: each reaches the job dir check, which refuses it before any role starts
    assert again.returncode == 1
    out = " ".join(again.stdout.split())
    assert out.count("already holds a run") == 2 and "Run again without hydra.sweep.dir" in out
    assert "hydra.run.dir" not in out
    assert "no summary: hydra.sweep.dir=" in " ".join(again.stderr.split())
    assert (sweep / "summary.json").read_bytes() == summary
    assert [(j / "result.json").read_bytes() for j in job_dirs(tmp_path)] == old_results
    assert not list(sweep.rglob("roles"))


def test_unknown_key_added_with_plus_is_refused_before_any_process_starts(tmp_path):
    proc = launch(["+dataset.partiton=dirichlet"], tmp_path)
    assert proc.returncode == 1
    out = " ".join(proc.stdout.split())
    assert "dataset.partiton=dirichlet: unknown key" in out
    assert "did you mean dataset.partition? Set it without '+': dataset.partition=dirichlet" in out
    (job,) = job_dirs(tmp_path)
    assert result(job)["failure"]["role"] == "config" and not (job / "roles").exists()


def test_a_misspelled_key_without_plus_gets_a_did_you_mean_not_only_hydras_plus_hint(tmp_path):
    proc = launch(["dataset=mnist", "dataset.partiton=dirichlet", "rounds=2"], tmp_path)
    assert proc.returncode == 1
    err = " ".join(proc.stderr.split())
    assert "Could not override 'dataset.partiton'" in err  # Hydra's own error stays
    assert ("dataset.partiton is not a key of flmem's config: did you mean dataset.partition? "
            "dataset.partition=dirichlet") in err
    assert "rounds" not in err.split("Could not override")[1] and not (tmp_path / "outputs").exists()


def test_an_optimizer_argument_without_plus_is_told_to_add_it_and_a_near_miss_gets_a_did_you_mean(tmp_path):
    proc = launch(["optimizer=adam", "optimizer.amsgrad=true", "optimizer.weight_decy=0.1"], tmp_path)
    assert proc.returncode == 1
    err = " ".join(proc.stderr.split())
    assert "as an argument of torch.optim.Adam, add it with '+': +optimizer.amsgrad=true" in err
    assert "did you mean optimizer.weight_decay? optimizer.weight_decay=0.1" in err
    assert not (tmp_path / "outputs").exists()


def test_server_address_for_a_specific_bind_is_that_address():
    assert server_addresses("10.1.2.3", 50051) == (["10.1.2.3:50051"], "")
    assert server_addresses("fd00::5", 7)[0] == ["[fd00::5]:7"]
    addresses, note = server_addresses("127.0.0.1", 7)
    assert addresses == ["127.0.0.1:7"] and "this host only" in note


def test_a_name_that_resolves_to_loopback_only_is_never_suggested_first():
    assert not resolves_outward("localhost") and not resolves_outward("no-such-host.invalid")
    assert resolves_outward("192.0.2.7") and not resolves_outward("127.0.0.1")
    addresses, _ = server_addresses("0.0.0.0", 7)
    first = addresses[0].rsplit(":", 1)[0]
    others_exist = any(resolves_outward(a.rsplit(":", 1)[0]) for a in addresses)
    assert resolves_outward(first) or not others_exist
    loopback_only = [a for a in addresses if not resolves_outward(a.rsplit(":", 1)[0])]
    assert addresses[len(addresses) - len(loopback_only):] == loopback_only  # they come last


@pytest.mark.slow
def test_server_on_all_interfaces_prints_addresses_other_hosts_can_use(tmp_path, free_port):
    args = [sys.executable, str(REPO / "launch.py"), "role=server", "server.host=0.0.0.0", "security.insecure=true",
            f"server.port={free_port}", *TINY]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # the launcher prints the address once the server listens
            lines.append(line)
            if "start each client with" in line:
                break
        proc.send_signal(signal.SIGINT)  # no client will come: stop it
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert f"server listening on 0.0.0.0:{free_port} (listening on all interfaces; from this host " \
           f"127.0.0.1:{free_port} also works, but only here" in out, out + rest
    printed = out.split("server.address=")[1].split()[0]
    assert printed.endswith(f":{free_port}") and not printed.startswith("127.")
    host = printed.rsplit(":", 1)[0]
    assert host in (socket.getfqdn(), socket.gethostname()) or host[0].isdigit()
    assert resolves_outward(host.strip("[]"))  # never a name that reaches this host only
    others = out.split("other addresses of this host: ")[1].split("\n")[0].split(", ") if "other addr" in out else []
    assert all(not a.startswith("127.") and a.endswith(f":{free_port}") for a in others)
    assert proc.returncode == 130


@pytest.mark.slow
def test_ctrl_c_while_summarizing_leaves_a_result_json_that_says_so(tmp_path):
    # all_allocations captures take memray seconds to summarize and draw: the moment to interrupt
    args = [sys.executable, str(REPO / "launch.py"), "rounds=1", *TINY[1:], "profiling.capture_format=all_allocations"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, provisional = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and provisional is None:
        for path in tmp_path.glob("outputs/runs/*/result.json"):
            data = json.loads(path.read_text())
            if data.get("summarized") is False:  # written when summarizing starts, replaced when it ends
                provisional = data
        time.sleep(0.02)
    assert provisional, "summarizing never started"
    assert provisional["status"] == "failed" and "stopped while summarizing" in provisional["failure"]["reason"]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    (job,) = job_dirs(tmp_path)
    res = result(job)
    assert res["status"] == "failed" and res["summarized"] is False and res["failure"]["role"] == "launcher"
    assert res["failure"]["reason"].startswith("interrupted (SIGINT) while summarizing the roles' captures "
                                               "(the roles had completed)")
    assert res["exit_codes"] == {"server": 0, "client_0": 0, "client_1": 0} and len(res["rounds"]) == 1
    for role in ("server", "client_0", "client_1"):
        assert (job / "roles" / role / "capture.bin").stat().st_size > 0  # the captures are kept
        assert res["roles"][role]["role"] == role
    assert load_job(job).status == "failed"  # flmem browse no longer shows it as running
