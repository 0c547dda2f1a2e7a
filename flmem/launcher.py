"""One job: start the roles as fresh interpreters, watch them, stop them, and write the job result.

Layout of a job directory (Hydra's output dir for the job)::

    config.yaml            the fully resolved config every role reads
    result.json            status, failure (role, reason), exit codes, overrides, per-round metrics, paths
    roles/<role>/          role = server | client_<rank>
        capture.bin        memray capture (readable by `memray flamegraph` / `memray summary`)
        flamegraph.html    memray's flamegraph of the peak
        summary.json       peak heap, baseline, working memory, peak RSS, top sites, duration
        status.json, metrics.jsonl, markers.json, stdout.log, stderr.log
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from flmem import data
from flmem.config import validate
from flmem.profiling import finish_role
from flmem.status import read_json, read_metrics, write_json


class JobError(RuntimeError):
    """A job cannot start (bad output dir, server never ready)."""


class Interrupted(KeyboardInterrupt):
    """The launcher got SIGINT (Ctrl-C) or SIGTERM."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals(handler):
    """Install ``handler`` for SIGINT and SIGTERM (main thread only) and restore the old ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signals_deferred():
    return _signals(signal.SIG_IGN)


@dataclass
class Role:
    name: str  # server | client_<rank>
    argv: list[str]
    dir: Path
    proc: subprocess.Popen | None = None
    logs: list = field(default_factory=list)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        out, err = open(self.dir / "stdout.log", "w"), open(self.dir / "stderr.log", "w")
        self.logs = [out, err]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A fresh interpreter (not fork: gRPC is not fork-safe), in its own process group.
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=env, start_new_session=True)

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def failure_reason(self) -> str:
        markers = read_json(self.dir / "markers.json", {})
        if markers.get("error"):
            return markers["error"]
        code = self.returncode
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        try:
            lines = [ln for ln in (self.dir / "stderr.log").read_text().splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else f"exited with code {code}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close_logs(self) -> None:
        for fh in self.logs:
            fh.close()


def _worker_argv(config: Path, role: str, out: Path, rank: int = 0, address: str | None = None,
                 address_file: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "flmem.worker", "--config", str(config), "--role", role,
            "--rank", str(rank), "--out", str(out)]
    if address_file:
        return argv + ["--address", address, "--address-file", str(address_file)]
    return argv + (["--address", address] if address else [])


class Job:
    """Runs the roles that ``cfg.role.name`` asks for (``local``: server and all clients)."""

    def __init__(self, cfg, job_dir: Path, overrides: list[str], progress=None):
        self.cfg, self.dir, self.overrides = cfg, Path(job_dir), list(overrides)
        self.progress = progress  # flmem.report.RoleProgress or None
        self.roles: list[Role] = []
        self.failure: dict | None = None

    # ------------------------------------------------------------------ start
    def prepare(self) -> Path:
        """Validate, check the data, and write ``config.yaml``. Raises ConfigError, DatasetNotFoundError, JobError."""
        validate(self.cfg)
        if self.cfg.role.name in ("local", "server", "client"):
            data.check_available(self.cfg.dataset)
        if (self.dir / "result.json").exists() or (self.dir / "roles").exists():
            raise JobError(f"{self.dir} already holds a run; its config.yaml, result.json and roles/ are kept "
                           "(Hydra has rewritten its .hydra/ files). Run again without hydra.run.dir (a new "
                           "directory per run) or pick an empty one")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.yaml"
        config.write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        return config

    def _wait_ready(self, server: Role) -> int:
        deadline = time.time() + float(self.cfg.timeouts.server_ready_s)
        while time.time() < deadline:
            ready = read_json(server.dir / "ready.json")
            if ready:
                return int(ready["port"])
            if server.returncode is not None:
                raise JobError(f"server exited before listening: {server.failure_reason()}")
            time.sleep(0.1)
        raise JobError(f"server not listening after {self.cfg.timeouts.server_ready_s} s (timeouts.server_ready_s)")

    def start(self, config: Path) -> None:
        """Start the roles. With ``role=local`` the clients import while the server does, then wait for its
        ``ready.json``; the launcher itself waits (bounded) for the server to listen before returning."""
        kind = self.cfg.role.name
        roles_dir = self.dir / "roles"
        server = None
        host = "127.0.0.1" if self.cfg.server.host in ("0.0.0.0", "::", "[::]") else self.cfg.server.host
        if kind == "server" or (kind == "local" and self.cfg.client.mode != "local_only"):
            server = Role("server", _worker_argv(config, "server", roles_dir / "server"), roles_dir / "server")
            self.roles.append(server)
            server.start()
        ranks = range(int(self.cfg.num_clients)) if kind == "local" else [self.cfg.role.rank] if kind == "client" \
            else []
        for rank in ranks:
            out = roles_dir / f"client_{rank}"
            if server:
                argv = _worker_argv(config, "client", out, rank, f"{host}:0", server.dir / "ready.json")
            elif self.cfg.client.mode == "local_only":
                argv = _worker_argv(config, "client", out, rank)
            else:
                argv = _worker_argv(config, "client", out, rank, self.cfg.server.address)
            role = Role(f"client_{rank}", argv, out)
            self.roles.append(role)
            role.start()
        if server:
            port = self._wait_ready(server)
            if kind == "server":
                print(f"server listening on {host}:{port}; start each client with: python launch.py role=client "
                      f"role.rank=K server.address={host}:{port} (same overrides as this run)", flush=True)

    # ------------------------------------------------------------------ watch
    def watch(self) -> None:
        """Wait for every role; on the first failure or at ``timeouts.job_s``, stop the others."""
        deadline = time.time() + float(self.cfg.timeouts.job_s)
        while True:
            if self.progress:
                self.progress.update(self.roles)
            codes = {r.name: r.returncode for r in self.roles}
            failed = [r for r in self.roles if r.returncode not in (None, 0)]
            if failed:
                self.failure = {"role": failed[0].name, "reason": failed[0].failure_reason()}
                break
            if all(c == 0 for c in codes.values()):
                break
            if time.time() > deadline:
                running = [n for n, c in codes.items() if c is None]
                self.failure = {"role": running[0], "reason": f"still running after timeouts.job_s="
                                f"{self.cfg.timeouts.job_s} s (hung?); stopped: {', '.join(running)}"}
                break
            time.sleep(0.2)
        self.stop()
        if self.progress:
            self.progress.update(self.roles)

    def stop(self) -> None:
        """SIGTERM every live role at once (the worker turns it into SystemExit, so its capture is closed),
        then SIGKILL whatever is still alive after one shared ``timeouts.stop_grace_s``. Ctrl-C and SIGTERM
        are held off meanwhile, so a second one cannot leave a role behind."""
        with _signals_deferred():
            live = [role for role in self.roles if role.alive()]
            for role in live:
                role.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + float(self.cfg.timeouts.stop_grace_s)
            for role in live:
                try:
                    role.proc.wait(max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    os.killpg(role.proc.pid, signal.SIGKILL)
                    role.proc.wait()
            for role in self.roles:
                role.close_logs()

    # ------------------------------------------------------------------ result
    def finish(self, started: float) -> dict:
        prof = self.cfg.profiling

        def one(role: Role) -> dict:
            markers = read_json(role.dir / "markers.json", {})
            return finish_role(role.dir, role.name, model_bytes=markers.get("model_bytes"),
                               top=int(prof.top_sites), flamegraph=bool(prof.flamegraph))

        # Rendering runs `memray flamegraph` subprocesses: overlap them across cores.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            summaries = dict(zip([r.name for r in self.roles], pool.map(one, self.roles)))
        result = {
            "status": "failed" if self.failure else "completed",
            "failure": self.failure,
            "role": self.cfg.role.name,
            "overrides": self.overrides,
            "job_dir": str(self.dir),
            "started": started, "duration_s": time.time() - started,
            "exit_codes": {r.name: r.returncode for r in self.roles},
            "model_bytes": next((s["model_bytes"] for s in summaries.values() if s.get("model_bytes")), None),
            "rounds": read_metrics(self.dir / "roles" / "server"),
            "client_rounds": {r.name: read_metrics(r.dir) for r in self.roles if r.name != "server"},
            "roles": summaries,
        }
        write_json(self.dir / "result.json", result)
        return result


def failed_result(job_dir: Path, overrides: list[str], role: str, reason: str, started: float) -> dict:
    """The result of a job that could not start; written only where no other run lives."""
    result = {"status": "failed", "failure": {"role": role, "reason": reason}, "overrides": list(overrides),
              "job_dir": str(job_dir), "started": started, "duration_s": time.time() - started,
              "exit_codes": {}, "rounds": [], "client_rounds": {}, "roles": {}}
    job_dir = Path(job_dir)
    if not (job_dir / "result.json").exists():
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_dir / "result.json", result)
    return result


def run_job(cfg, job_dir: Path, overrides: list[str], progress=None) -> dict:
    """Run one job end to end and return its result (also written to ``result.json``).

    Never raises for a role failure: the result's ``status`` is ``failed`` and ``failure`` names
    the role and the reason. Problems found before any process starts are reported the same way:
    missing or unreadable data files with ``failure.role == "data"``, config and output-dir
    problems with ``failure.role == "config"``.
    """
    from flmem.config import ConfigError

    started = time.time()
    job = Job(cfg, job_dir, overrides, progress)
    try:
        config = job.prepare()
    except data.DatasetNotFoundError as exc:
        return failed_result(job_dir, overrides, "data", str(exc), started)
    except (ConfigError, JobError, ValueError) as exc:
        return failed_result(job_dir, overrides, "config", str(exc), started)
    try:
        with _signals(_interrupt):  # SIGTERM (kill, timeout, a scheduler) stops the job like Ctrl-C
            if progress:
                progress.start_job(cfg)
            job.start(config)
            job.watch()
    except JobError as exc:
        job.failure = {"role": "server", "reason": str(exc)}
        job.stop()
    except KeyboardInterrupt as exc:
        # Stop the roles (their captures close cleanly), record why, then let it end the sweep.
        how = f"{exc}" if isinstance(exc, Interrupted) else "SIGINT"
        job.failure = {"role": "launcher", "reason": f"interrupted ({how}); the roles were stopped"}
        job.stop()
        if progress:
            progress.stop()
        with _signals_deferred():
            job.finish(started)
        raise
    except BaseException:
        job.stop()  # a launcher bug: never leave role processes behind
        raise
    finally:
        if progress:
            progress.stop()
    return job.finish(started)
