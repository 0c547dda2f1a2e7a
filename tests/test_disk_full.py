"""A disk that fills while the roles run: the job fails with "disk full while writing PATH: N bytes free", its
captures are marked failed, result.json is still written, the launcher exits 1 without a traceback, and a sweep
goes on to its next job. The disk is a small tmpfs mounted for the test (needs root and mount rights)."""
import contextlib
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flmem import diskfull
from tests.conftest import REPO, TINY, result

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs at ``tmp_path/disk``; skips where it cannot be mounted."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"no way to fill a disk here: mounting a tmpfs failed ({proc.stderr.strip() or proc.returncode}; "
                    "needs root or CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path) -> None:
    """Write zeros to ``disk`` until the filesystem refuses (ENOSPC)."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as fh:
        while True:
            fh.write(bytes(65536))
            fh.flush()
    with contextlib.suppress(OSError), open(disk / "filler-pages", "wb") as fh:
        while True:  # the last pages too
            fh.write(bytes(4096))
            fh.flush()
    assert diskfull.free_bytes(disk) < diskfull.LOW_BYTES


def run_and_fill(disk: Path, args: list[str]):
    """Launch ``args``, fill ``disk`` once a client has finished its first round, and wait for the launcher."""
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args, *TINY, "rounds=6", "local_steps=20"],
                            cwd=disk.parent, env=dict(os.environ, COLUMNS="200"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, filled = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None and not filled:
        status = next(disk.glob("**/roles/client_0/status.json"), None)
        try:
            state = json.loads(status.read_text()) if status else {}
        except ValueError:
            state = {}
        if (state.get("rounds_done") or 0) >= 1:
            fill(disk)
            filled = True
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    assert filled, f"no client finished a round:\n{out}\n{err}"
    return proc.returncode, out, err


def check_disk_full_job(job: Path) -> dict:
    res = result(job)
    assert res["status"] == "failed" and res["summarized"] is True
    assert res["failure"]["reason"].startswith(f"disk full while writing {job / 'roles'}"), res["failure"]
    assert re.search(r": \d+ bytes free", res["failure"]["reason"]), res["failure"]
    assert diskfull.EXIT_CODE in res["exit_codes"].values()  # a role stopped on it, and said so
    for name, summary in res["roles"].items():  # no capture read as if it were whole
        assert summary["capture_error"] and summary["flamegraph"] is None, name
    assert not (job / ".result.json.reserve").exists()  # released for result.json
    return res


def test_a_disk_that_fills_while_the_roles_run_fails_the_job_with_a_result(small_disk):
    code, out, err = run_and_fill(small_disk, [f"hydra.run.dir={small_disk}/run"])
    assert code == 1, out + err
    assert "Traceback" not in out + err and "Logging error" not in err
    check_disk_full_job(small_disk / "run")
    assert "job failed in " in out and "disk full while writing" in " ".join(out.split())


def test_a_sweep_goes_on_to_its_next_job_after_a_full_disk(small_disk):
    sweep = small_disk / "sweep"
    code, out, err = run_and_fill(small_disk, ["-m", f"hydra.sweep.dir={sweep}", "repeat=0,1"])
    assert code == 1, out + err
    assert "Traceback" not in out + err
    check_disk_full_job(sweep / "0")
    second = result(sweep / "1")  # the disk is still full: it fails before any role starts, and says why
    assert second["status"] == "failed" and second["failure"]["role"] == "launcher"
    reason = second["failure"]["reason"]
    assert reason.startswith(f"disk full while writing {sweep / '1' / '.result.json.reserve'}: ")
    assert f"the launcher holds {2**20} bytes there for result.json" in reason
    assert not (sweep / "1" / "roles").exists()


def _file_size_limit(limit: int):
    def apply():  # in the launcher, inherited by its roles: past it a write fails with EFBIG, not SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_capture_past_the_file_size_limit_fails_the_job_and_is_marked_failed(tmp_path):
    if resource.getrlimit(resource.RLIMIT_FSIZE)[1] not in (resource.RLIM_INFINITY,) and \
            resource.getrlimit(resource.RLIMIT_FSIZE)[1] < 200 * 1024:
        pytest.skip("the hard file size limit is already below the one this test sets")
    # all_allocations captures pass 200 KiB in a tiny job; every other file the job writes stays below
    args = [sys.executable, str(REPO / "launch.py"), *TINY, "profiling.capture_format=all_allocations",
            "save_global_model=false", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True,
                          timeout=600, preexec_fn=_file_size_limit(200 * 1024))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    res = result(tmp_path / "run")
    capture = tmp_path / "run" / "roles" / "server" / "capture.bin"
    assert res["status"] == "failed" and res["failure"]["role"] == "launcher"
    assert res["failure"]["reason"].startswith("file size limit (RLIMIT_FSIZE, ulimit -f) reached while writing ")
    assert "capture.bin (memray stopped recording" in res["failure"]["reason"]
    assert res["exit_codes"] == {"server": 0, "client_0": 0, "client_1": 0}  # the roles went on: memray did not
    for name, summary in res["roles"].items():
        assert summary["capture_error"].startswith("memray stopped recording before the role ended: "), name
        assert "File too large" in summary["capture_error"] and summary["flamegraph"] is None
    assert capture.stat().st_size <= 200 * 1024


def test_disk_full_errors_are_told_apart_and_name_the_file(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))
    assert diskfull.is_disk_full(full) and not diskfull.is_disk_full(OSError(errno.EACCES, "denied"))
    assert diskfull.describe(full) == f"disk full while writing {tmp_path / 'x.json'}: " \
                                      f"{diskfull.free_bytes(tmp_path)} bytes free"
    assert diskfull.describe(OSError(errno.EFBIG, "File too large"), "capture.bin") == \
        "file size limit (RLIMIT_FSIZE, ulimit -f) reached while writing capture.bin"
    memray = RuntimeError("Failed to write output header: No space left on device")
    assert diskfull.is_disk_full(memray) and diskfull.describe(memray, tmp_path).startswith("disk full while writing")
