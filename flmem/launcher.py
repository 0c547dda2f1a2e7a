r"""One job: start the roles as fresh interpreters, watch them, stop them, and write the job result.

Layout of a job directory (Hydra's output dir for the job)::

    config.yaml            the fully resolved config every role reads (resolved once, by the launcher; a
                           literal '${' in a value is written '\${', OmegaConf's escape: flmem.literal)
    result.json            status, failure (role, reason), summarized, exit codes, overrides, per-round metrics,
                           paths; written (provisional) before summarizing, so an interrupted job has one too
    roles/<role>/          role = server | client_<rank>
        capture.bin        memray capture (readable by `memray flamegraph` / `memray summary`)
        flamegraph.html    memray's flamegraph of the peak
        summary.json       peak heap, baseline, working memory, peak RSS, top sites, duration
        status.json, metrics.jsonl, markers.json, stdout.log, stderr.log
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from flmem import diskfull
from flmem.address import join, server_addresses
from flmem.config import ConfigError, reference_config, validate
from flmem.datasets import DATA_ERRORS
from flmem.literal import literal_config, resolve
from flmem.profiling import finish_role, memray_stopped
from flmem.security import client_env
from flmem.security import local_env as make_local_env
from flmem.status import read_json, read_metrics, write_json


def dataset_source(dataset_cfg):
    """The data source ``cfg.dataset`` names in its ``_target_`` (a flmem.datasets.base.DataSource), built
    with ``hydra.utils.instantiate`` from the yaml's other keys. Imports no torch.

    Raises ConfigError when it cannot be built: a ``_target_`` that does not exist, or a key the class
    does not take (its name in the message).
    """
    from hydra.errors import InstantiationException

    from flmem.literal import instantiate

    try:
        return instantiate(dataset_cfg)
    except InstantiationException as exc:
        raise ConfigError(f"dataset: {' '.join(str(exc).split())}") from exc


class JobError(RuntimeError):
    """A job cannot start (bad output dir, server never ready)."""


class DiskFullError(RuntimeError):
    """Not even ``result.json`` could be written (a full disk); the message says where and why."""


#: bytes the launcher holds in the job dir while the roles run, released to write ``result.json`` when
#: the disk has filled (``.result.json.reserve``; a failed job's result.json with 16 clients is ~200 KiB)
RESERVE_BYTES = 2**20
BLAME_GRACE_S = 5.0  # how long a server failure caused by departed clients waits for their exits (seconds)


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
    final_max_rss_bytes: int | None = None  # the child's ru_maxrss from wait4, once reaped
    sent_sigterm: bool = False  # the launcher stopped it (Job.stop)
    env: dict = field(default_factory=dict, repr=False)  # credentials for this process only (flmem.security)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        out, err = open(self.dir / "stdout.log", "w"), open(self.dir / "stderr.log", "w")
        self.logs = [out, err]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        # A fresh interpreter (not fork: gRPC is not fork-safe), in its own process group.
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=env, start_new_session=True)

    def reap(self, block: bool = False) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else None.

        Reaps with ``os.wait4`` rather than ``Popen.poll``/``wait``, which throw away the child's resource
        usage: its ``ru_maxrss`` (KiB) counts the very end of the process (exit handlers, gRPC threads
        ending), after the worker wrote ``markers.json``. It is added there as ``final_max_rss_bytes``
        (bytes; Linux carries ``ru_maxrss`` across exec, so it is at least the launcher's peak RSS).
        """
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: the code is known, the resource usage is lost
            return self.proc.wait() if block else self.proc.poll()
        if pid == 0:
            return None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.final_max_rss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
        markers_file = self.dir / "markers.json"
        markers = read_json(markers_file, {})
        if not isinstance(markers, dict):
            markers = {}
        markers["final_max_rss_bytes"] = self.final_max_rss_bytes
        with contextlib.suppress(OSError):
            write_json(markers_file, markers)
        return self.proc.returncode

    def wait(self, timeout_s: float) -> int | None:
        """Reap within ``timeout_s`` seconds; None if the process is still running then."""
        deadline = time.time() + timeout_s
        while (code := self.reap()) is None and time.time() < deadline:
            time.sleep(0.02)
        return code

    @property
    def returncode(self):
        return self.reap()

    def failure_reason(self) -> str:
        markers = read_json(self.dir / "markers.json", {})
        if markers.get("error"):
            return markers["error"]
        code = self.returncode
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        if code == diskfull.EXIT_CODE:  # the worker could not even write markers.json
            free = diskfull.free_bytes(self.dir)
            return (f"disk full while writing under {self.dir}" + (f": {free} bytes free" if free is not None else "")
                    + f" (the role exited with code {code} before it could record more)")
        try:
            lines = [ln for ln in (self.dir / "stderr.log").read_text().splitlines() if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else f"exited with code {code}"

    def exit_code(self) -> int | None:
        """The exit status as the launcher reports it everywhere (``result.json`` ``exit_codes`` and each
        role's ``exit_code``): 0 or the code the role exited with; ``-N`` when signal N ended it, whether
        the signal killed it or the worker exited itself on it (``128 + N``, see ``flmem.worker``)."""
        code = self.returncode
        if code == 128 + signal.SIGTERM:
            markers = read_json(self.dir / "markers.json", {})
            said = str(markers.get("error") or "") if isinstance(markers, dict) else ""
            if self.sent_sigterm or said.startswith("stopped by the launcher"):
                return -int(signal.SIGTERM)
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.reap() is None

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
        self.client_failures: list[dict] = []  # clients that failed while the job went on without them

    # ------------------------------------------------------------------ start
    def prepare(self, dir_key: str = "hydra.run.dir") -> Path:
        """Validate (unknown keys included, see :func:`flmem.config.reference_config`), check the data, and
        write ``config.yaml``. ``dir_key`` names the setting that chose the directory, for the error when it
        already holds a run. Raises ConfigError, DatasetNotFoundError, JobError."""
        values = resolve(self.cfg, self.overrides)  # a broken interpolation: ConfigError naming the override
        validate(self.cfg, reference_config(self.overrides))
        self.cfg = literal_config(values)  # resolved once: the roles read these values, '${' kept literal
        if self.cfg.role.name in ("local", "server", "client"):
            dataset_source(self.cfg.dataset).check_available()
        if (self.dir / "result.json").exists() or (self.dir / "roles").exists():
            raise JobError(f"{self.dir} already holds a run; its config.yaml, result.json and roles/ are kept "
                           f"(Hydra has rewritten its .hydra/ files). Run again without {dir_key} (a new "
                           "directory per run) or pick an empty one")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.yaml"
        config.write_text(OmegaConf.to_yaml(self.cfg))
        self._reserve(RESERVE_BYTES)
        return config

    @property
    def reserve(self) -> Path:
        return self.dir / ".result.json.reserve"

    def _reserve(self, size: int) -> None:
        """Hold ``size`` bytes of the disk for ``result.json`` (see :meth:`_release`). Raises OSError (ENOSPC)."""
        try:
            with open(self.reserve, "wb") as fh:
                fh.write(bytes(size))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            self.reserve.unlink(missing_ok=True)
            if exc.errno == errno.EFBIG:  # a file size limit (ulimit -f) fills no disk: nothing to hold
                return
            exc.filename = exc.filename or str(self.reserve)
            raise

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            self.reserve.unlink(missing_ok=True)

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
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(str(self.cfg.server.host),
                                                                        str(self.cfg.server.host))
        local_env = {}
        if kind == "server" or (kind == "local" and self.cfg.client.mode != "local_only"):
            if kind == "local":  # per-job client tokens, and a per-job certificate for TLS without files
                sec = self.cfg.get("security") or {}
                local_env = make_local_env(tls=bool(sec.get("tls")) and not sec.get("server_cert"), host=host)
            server = Role("server", _worker_argv(config, "server", roles_dir / "server"), roles_dir / "server",
                          env=local_env)
            self.roles.append(server)
            server.start()
        ranks = range(int(self.cfg.num_clients)) if kind == "local" else [self.cfg.role.rank] if kind == "client" \
            else []
        for rank in ranks:
            out = roles_dir / f"client_{rank}"
            if server:
                argv = _worker_argv(config, "client", out, rank, join(host, 0), server.dir / "ready.json")
            elif self.cfg.client.mode == "local_only":
                argv = _worker_argv(config, "client", out, rank)
            else:
                argv = _worker_argv(config, "client", out, rank, self.cfg.server.address)
            role = Role(f"client_{rank}", argv, out, env=client_env(local_env, rank) if local_env else {})
            self.roles.append(role)
            role.start()
        if server:
            port = self._wait_ready(server)
            if kind == "server":  # 127.0.0.1 reaches a wildcard-bound server from this host only: print others
                addresses, note = server_addresses(str(self.cfg.server.host), port)
                # without brackets: Hydra reads server.address=[fd00::5]:1 as a list (flmem.address.split reads it)
                addresses = [a.replace("[", "").replace("]", "") for a in addresses]
                secure = (self.cfg.get("security") or {}).get("tls")
                print(f"server listening on {join(str(self.cfg.server.host), port)}{note}\n"
                      f"start each client with: python launch.py role=client role.rank=K "
                      f"server.address={addresses[0]} (same overrides as this run"
                      + (", with security.ca_cert and the client's own security.token_file instead of the server's "
                         "files: see `flmem certs`)" if secure else ")")
                      + (f"\n  other addresses of this host: {', '.join(addresses[1:])}" if addresses[1:] else ""),
                      flush=True)

    # ------------------------------------------------------------------ watch
    def _tolerated(self, failed: list[Role]) -> bool:
        """Whether the server may still finish without the ``failed`` roles: all of them clients of a local job
        with a server, and enough clients left for the strategy's ``min_fit_clients`` (unless
        ``accept_failures`` is false). The server decides round by round; this only saves waiting for it."""
        if self.cfg.role.name != "local" or not any(r.name == "server" for r in self.roles):
            return False
        if any(r.name == "server" for r in failed):
            return False
        policy = self.cfg.get("strategy") or {}
        left = int(self.cfg.num_clients) - len(failed)
        return bool(policy.get("accept_failures", True)) and left >= int(policy.get("min_fit_clients", 1))

    def watch(self) -> None:
        """Wait for every role; at a failure the server cannot outlive (see :meth:`_tolerated`) or at
        ``timeouts.job_s``, stop the others. Tolerated client failures are kept in ``self.client_failures``."""
        deadline = time.time() + float(self.cfg.timeouts.job_s)
        blame_by: dict[str, float] = {}
        while True:
            if self.progress:
                self.progress.update(self.roles)
            codes = {r.name: r.returncode for r in self.roles}
            failed = [r for r in self.roles if r.returncode not in (None, 0)]
            self.client_failures = [{"role": r.name, "reason": r.failure_reason()} for r in failed]
            if failed and not self._tolerated(failed):
                first = next((r for r in failed if r.name == "server"), failed[0])
                clients = [r for r in failed if r.name != "server"]
                if first.name == "server" and not clients and "left the job" in first.failure_reason() \
                        and time.time() < blame_by.setdefault("until", time.time() + BLAME_GRACE_S):
                    time.sleep(0.2)  # the server saw a client leave before this loop saw its exit: name the client
                    continue
                if first.name == "server" and clients and "left the job" in first.failure_reason():
                    # the server failed because its clients had: name their cause, the ones it says left first
                    gone = _departed_ranks(first.failure_reason())
                    first = next((c for c in clients if c.name.removeprefix("client_") in gone), clients[0])
                self.failure = {"role": first.name, "reason": first.failure_reason()}
                if first.name != "server":
                    self.failure["reason"] += self._policy_note(failed)
                    if any(r.name == "server" for r in failed):
                        self.failure["reason"] += "; the server then stopped, its round short of updates"
                break
            if all(c is not None for c in codes.values()) and failed:
                break  # the server finished without the failed clients
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

    def _policy_note(self, failed: list[Role]) -> str:
        if self.cfg.role.name != "local" or len(self.roles) == len(failed):
            return ""
        policy = self.cfg.get("strategy") or {}
        return (f" ({len(failed)} of {self.cfg.num_clients} clients failed; strategy.min_fit_clients="
                f"{policy.get('min_fit_clients', 1)}, strategy.accept_failures="
                f"{str(policy.get('accept_failures', True)).lower()})")

    def stop(self) -> None:
        """SIGTERM every live role at once (the worker turns it into SystemExit, so its capture is closed),
        then SIGKILL whatever is still alive after one shared ``timeouts.stop_grace_s``. Ctrl-C and SIGTERM
        are held off meanwhile, so a second one cannot leave a role behind."""
        with _signals_deferred():
            live = [role for role in self.roles if role.alive()]
            for role in live:
                # Not Popen.send_signal: it polls first, and a poll that reaps loses the child's ru_maxrss.
                # Only Role.reap reaps, so the pid cannot have been reused.
                os.kill(role.proc.pid, signal.SIGTERM)
                role.sent_sigterm = True
            deadline = time.time() + float(self.cfg.timeouts.stop_grace_s)
            for role in live:
                if role.wait(max(0.0, deadline - time.time())) is None:
                    os.killpg(role.proc.pid, signal.SIGKILL)
                    role.reap(block=True)
            for role in self.roles:
                role.close_logs()

    # ------------------------------------------------------------------ result
    def _result(self, started: float, summaries: dict, failure: dict | None, summarized: bool) -> dict:
        exit_codes = {r.name: r.exit_code() for r in self.roles}
        for name, summary in summaries.items():
            if isinstance(summary, dict) and name in exit_codes:
                summary["exit_code"] = exit_codes[name]
        return {
            "status": "failed" if failure else "completed",
            "failure": failure,
            "client_failures": [] if failure else self.client_failures,
            "summarized": summarized,
            "role": self.cfg.role.name,
            "overrides": self.overrides,
            "job_dir": str(self.dir),
            "started": started, "duration_s": time.time() - started,
            "exit_codes": exit_codes,
            "model_bytes": next((s["model_bytes"] for s in summaries.values() if s.get("model_bytes")), None),
            "rounds": read_metrics(self.dir / "roles" / "server"),
            "client_rounds": {r.name: read_metrics(r.dir) for r in self.roles if r.name != "server"},
            "roles": summaries,
        }

    @staticmethod
    def _unsummarized(role: Role) -> dict:
        """A role's entry when summarizing was interrupted before it: no numbers, the capture kept as it is."""
        capture = role.dir / "capture.bin"
        return {"role": role.name, "capture": str(capture) if capture.exists() else None, "capture_error": None,
                "peak_heap_bytes": None, "peak_rss_bytes": None, "flamegraph": None,
                "flamegraph_error": "not summarized: the launcher was interrupted (memray flamegraph capture.bin)"}

    def finish(self, started: float) -> dict:
        """Summarize every role (``summary.json``, flamegraph) and write ``result.json``; returns the result.

        Summarizing a large capture takes a while, so a provisional ``result.json`` comes first: status
        failed, ``summarized`` false, and the roles' own failure or "the launcher stopped while summarizing"
        (what a reader should believe if the launcher dies here). Ctrl-C or SIGTERM while summarizing
        writes the final one with the summaries done so far, says ``interrupted (SIGNAL) while summarizing``,
        and raises KeyboardInterrupt. The captures are kept either way.
        """
        prof = self.cfg.profiling
        full = self._disk_full()

        def one(role: Role) -> dict:
            markers = read_json(role.dir / "markers.json", {})
            try:
                summary = finish_role(role.dir, role.name, model_bytes=markers.get("model_bytes"),
                                      top=int(prof.top_sites), flamegraph=bool(prof.flamegraph) and not full)
            except OSError as exc:  # summary.json or the flamegraph did not fit: the numbers read so far
                if not diskfull.is_disk_full(exc):
                    raise
                summary = read_json(role.dir / "summary.json") or self._unsummarized(role)
                summary["flamegraph"], summary["flamegraph_error"] = None, diskfull.describe(exc)
            changed = False
            if full and not summary.get("capture_error") and summary.get("capture"):
                summary["capture_error"] = (f"the disk filled while the job ran ({full}); memray stops recording "
                                            "when it cannot grow capture.bin, so this capture may end early: its "
                                            "numbers are not trusted")
                changed = True
            if summary.get("exit_code") != role.exit_code():  # one convention in every file (Role.exit_code)
                summary["exit_code"] = role.exit_code()
                changed = True
            if changed and (role.dir / "summary.json").exists():
                try:
                    write_json(role.dir / "summary.json", summary)
                except OSError as exc:  # result.json carries it
                    if not diskfull.is_disk_full(exc):
                        raise
            return summary

        if full:
            self._release()  # room for the summaries (no flamegraphs) and result.json
            if not self.failure:
                self.failure = {"role": "launcher", "reason": f"{full} (found when the roles had ended)"}

        stopped = self.failure or {"role": "launcher", "reason": "the launcher stopped while summarizing the roles' "
                                   "captures (the roles had completed; their captures are kept under roles/)"}
        with _signals(_interrupt):
            with _signals_deferred():
                try:
                    write_json(self.dir / "result.json", self._result(started, {}, stopped, summarized=False))
                except OSError as exc:  # the final one is what must be written (see _write_result)
                    if not diskfull.is_disk_full(exc):
                        raise
            # Rendering runs `memray flamegraph` subprocesses: overlap them across cores.
            pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
            try:
                summaries = dict(zip([r.name for r in self.roles], pool.map(one, self.roles)))
            except KeyboardInterrupt as exc:
                pool.shutdown(wait=False, cancel_futures=True)  # a summary under way finishes on its own
                reason = (f"interrupted ({_how(exc)}) while summarizing the roles' captures"
                          + ("" if self.failure else " (the roles had completed)")
                          + "; the captures are kept under roles/")
                failure = dict(self.failure, reason=f"{self.failure['reason']}; then {reason}") if self.failure \
                    else {"role": "launcher", "reason": reason}
                summaries = {r.name: read_json(r.dir / "summary.json") or self._unsummarized(r) for r in self.roles}
                with _signals_deferred():
                    self._write_result(self._result(started, summaries, failure, summarized=False))
                raise
            pool.shutdown()
            result = self._result(started, summaries, self.failure, summarized=True)
            with _signals_deferred():
                self._write_result(result)
        return result

    def _disk_full(self) -> str | None:
        """Why the disk counts as having filled during the job, else None: a role stopped on it, or less
        than ``diskfull.LOW_BYTES`` is free beside the captures (the launcher's reserve still held)."""
        for role in self.roles:
            reason = role.failure_reason() if role.returncode not in (None, 0) else ""
            if diskfull.said(reason):
                return reason
        for role in self.roles:  # memray stops recording on a failed write and the role goes on
            said = memray_stopped(role.dir / "stderr.log")
            if said and any(m in said for m in diskfull.MESSAGES):
                return (f"{diskfull.describe(RuntimeError(said), role.dir / 'capture.bin')} (memray stopped "
                        f"recording {role.name} there)")
        free = diskfull.free_bytes(self.dir / "roles")
        if free is not None and free < diskfull.LOW_BYTES and self.roles:
            return f"disk full while the roles wrote under {self.dir / 'roles'}: {free} bytes free"
        return None

    def _write_result(self, result: dict) -> None:
        """Write ``result.json``, releasing the launcher's reserve when the disk is full.

        Raises:
            DiskFullError: even then it did not fit (the message names the file and the free bytes).
        """
        try:
            write_json(self.dir / "result.json", result)
            self._release()
            return
        except OSError as exc:
            if not diskfull.is_disk_full(exc):
                raise
            first = diskfull.describe(exc)
        self._release()
        if result.get("status") == "completed":  # it could not be written: that fails the job
            result.update(status="failed", failure={"role": "launcher", "reason": first})
        try:
            write_json(self.dir / "result.json", result)
        except OSError as exc:
            if not diskfull.is_disk_full(exc):
                raise
            raise DiskFullError(f"{diskfull.describe(exc)}; the job's result ({result['status']}"
                                + (f": {result['failure']['reason']}" if result.get("failure") else "")
                                + ") is not recorded") from None


def _departed_ranks(reason: str) -> set[str]:
    """The client ranks a server failure says left the job ("client K: left the job", or a
    "{K: 'why'}" dict of departed clients)."""
    return set(re.findall(r"client (\d+): left the job", reason)) | set(re.findall(r"[{,] ?(\d+): '", reason))


def _how(exc: BaseException) -> str:
    """The signal behind a KeyboardInterrupt: SIGTERM or SIGINT."""
    return str(exc) if isinstance(exc, Interrupted) else "SIGINT"


def failed_result(job_dir: Path, overrides: list[str], role: str, reason: str, started: float) -> dict:
    """The result of a job that could not start; written only where no other run lives."""
    result = {"status": "failed", "failure": {"role": role, "reason": reason}, "overrides": list(overrides),
              "job_dir": str(job_dir), "started": started, "duration_s": time.time() - started,
              "exit_codes": {}, "rounds": [], "client_rounds": {}, "roles": {}}
    job_dir = Path(job_dir)
    if not (job_dir / "result.json").exists():
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            write_json(job_dir / "result.json", result)
        except OSError as exc:
            if not diskfull.is_disk_full(exc):
                raise
            raise DiskFullError(f"{diskfull.describe(exc)}; the job failed before any role started ({role}: "
                                f"{reason}) and its result is not recorded") from None
    return result


def run_job(cfg, job_dir: Path, overrides: list[str], progress=None, dir_key: str = "hydra.run.dir") -> dict:
    """Run one job end to end and return its result (also written to ``result.json``).

    Never raises for a role failure: the result's ``status`` is ``failed`` and ``failure`` names
    the role and the reason. Problems found before any process starts are reported the same way:
    missing or unreadable data files with ``failure.role == "data"``, config and output-dir
    problems with ``failure.role == "config"``. Ctrl-C or SIGTERM at any point stops the roles, leaves a
    ``result.json`` whose failure (role ``launcher``) says when it came, and raises KeyboardInterrupt.
    ``dir_key``: the setting that chose ``job_dir`` (``hydra.sweep.dir`` in a sweep), named in errors.
    """
    started = time.time()
    job = Job(cfg, job_dir, overrides, progress)
    interrupted = None
    with _signals(_interrupt):  # SIGTERM (kill, timeout, a scheduler) stops the job like Ctrl-C
        try:
            config = job.prepare(dir_key)
        except DATA_ERRORS as exc:
            return failed_result(job_dir, overrides, "data", str(exc), started)
        except (ConfigError, JobError, ValueError) as exc:
            return failed_result(job_dir, overrides, "config", str(exc), started)
        except OSError as exc:  # config.yaml or the launcher's reserve did not fit
            if not diskfull.is_disk_full(exc):
                raise
            held = f" (the launcher holds {RESERVE_BYTES} bytes there for result.json while the roles run)" \
                if exc.filename == str(job.reserve) else ""
            return failed_result(job_dir, overrides, "launcher", diskfull.describe(exc) + held, started)
        except KeyboardInterrupt as exc:
            job._release()
            failed_result(job_dir, overrides, "launcher", f"interrupted ({_how(exc)}) before any role started",
                          started)
            raise
        try:
            if progress:
                progress.start_job(cfg)
            job.start(config)
            job.watch()
        except JobError as exc:
            job.failure = {"role": "server", "reason": str(exc)}
            job.stop()
        except OSError as exc:  # a role's log file could not be created: the disk is full
            if not diskfull.is_disk_full(exc):
                job.stop()
                raise
            job.failure = {"role": "launcher", "reason": diskfull.describe(exc)}
            job.stop()
        except KeyboardInterrupt as exc:
            # Stop the roles (their captures close cleanly), record why, then let it end the sweep.
            interrupted = exc
            job.failure = {"role": "launcher", "reason": f"interrupted ({_how(exc)}); the roles were stopped"}
            job.stop()
        except BaseException:
            job.stop()  # a launcher bug: never leave role processes behind
            raise
        finally:
            if progress:
                progress.stop()
        result = job.finish(started)  # raises KeyboardInterrupt itself when interrupted while summarizing
    if interrupted is not None:
        raise interrupted
    return result
