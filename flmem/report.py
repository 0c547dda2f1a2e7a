"""What a job shows in the terminal: a live progress display per role, then a per-role memory table.

The same story goes to the job's ``launch.log`` through the ``flmem.job`` logger: the job's
directory and overrides, each role with its pid, the server's address, and the result (status,
failure, per-role peak heap, paths). Hydra's job logging writes that file (``conf/config.yaml``
sends ``flmem.job`` to its file handler only, so the terminal shows each line once, as printed here).
"""
from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flmem.status import read_json
from flmem.termtable import FitColumn, fit_table, make_console  # noqa: F401 (make_console: the job's console)

MiB = 2**20
log = logging.getLogger("flmem.job")


def plural(n: int, noun: str) -> str:
    """``1 round``, ``3 rounds``: a count and its noun (English plural by ``s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _job_context() -> tuple[str | None, list[str]]:
    """The job's output directory and overrides when Hydra runs it (``None, []`` otherwise)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            from omegaconf import OmegaConf

            return str(hc.runtime.output_dir), OmegaConf.to_container(hc.overrides.task, resolve=False)
    except Exception:  # not under Hydra (a test, an embedding program): nothing to add
        pass
    return None, []


class RoleProgress:
    """Rounds done per role, read from each role's ``status.json`` while the job runs."""

    def __init__(self, console: Console | None = None):
        self.console = console or make_console()
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.logged: set[str] = set()  # roles whose start is in launch.log

    def start_job(self, cfg) -> None:
        self.rounds = int(cfg.rounds)
        self.logged = set()
        job_dir, overrides = _job_context()
        log.info("job started: %s; role=%s, %s; overrides: %s", job_dir or "(no Hydra output dir)", cfg.role.name,
                 plural(int(cfg.num_clients), "client"), " ".join(overrides) or "none")
        self.progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("rounds  {task.fields[phase]}"), TimeElapsedColumn(),
                                 console=self.console)
        self.progress.start()
        self.tasks = {}

    def update(self, roles) -> None:
        if self.progress is None:
            return
        for role in roles:
            self._log_start(role)
            status = read_json(role.dir / "status.json", {})
            phase = escape(str(status.get("phase", "starting")))  # a role's file: text, never markup
            if role.returncode not in (None, 0):
                phase = f"[red]failed (exit {role.returncode})"
            elif role.returncode == 0:
                phase = "[green]done"
            if role.name not in self.tasks:
                self.tasks[role.name] = self.progress.add_task(escape(role.name), total=self.rounds, phase=phase)
            self.progress.update(self.tasks[role.name], completed=status.get("rounds_done", 0), phase=phase)

    def _log_start(self, role) -> None:
        """Log each role once, when first seen: its pid, and for the server the address it listens on."""
        if role.name in self.logged or role.proc is None:
            return
        if role.name == "server":
            ready = read_json(role.dir / "ready.json", {})
            if not ready:
                return  # not listening yet: log it once it is
            log.info("role server started: pid %s, listening on %s:%s", role.proc.pid, ready.get("host"),
                     ready.get("port"))
        else:
            log.info("role %s started: pid %s", role.name, role.proc.pid)
        self.logged.add(role.name)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def result_table(result: dict, width: int = 200) -> Table:
    """Per role: peak heap, baseline, working memory (MiB and in units of M), FL working heap (peak heap during
    federated learning minus the heap when it began), peak RSS and working RSS (the run's peak RSS minus the
    RSS at the baseline); at most ``width`` cells wide (columns that do not fit are left out and named in the caption)."""
    m = result.get("model_bytes")
    title = f"{result['status']}" + (f"  (M = {m / MiB:.2f} MiB)" if m else "")
    headers = ("role", "peak heap MiB", "baseline MiB", "working MiB", "working / M", "FL working MiB",
               "peak RSS MiB", "working RSS MiB")
    drop = {"baseline MiB": 3, "working RSS MiB": 2, "peak RSS MiB": 1}  # dropped first when the terminal is narrow
    columns = [FitColumn(h, "text" if h == "role" else "number", drop.get(h, 0)) for h in headers]
    rows = []
    for name, s in result.get("roles", {}).items():
        in_m = s.get("working_heap_in_M")
        rows.append([name, _mib(s.get("peak_heap_bytes")), _mib(s.get("baseline_heap_bytes")),
                     _mib(s.get("working_heap_bytes")), "-" if in_m is None else f"{in_m:.2f}",
                     _mib(s.get("fl_working_heap_bytes")), _mib(s.get("peak_rss_bytes")),
                     _mib(s.get("working_rss_bytes"))])
    return fit_table(columns, rows, width, title=title)[0]


def log_result(result: dict) -> None:
    """The result, for launch.log: status, failure, per-role peak heap, and where the files are."""
    failure = result.get("failure") or {}
    log.info("job %s in %.1f s: %s%s", result["status"], result.get("duration_s") or 0.0,
             " ".join(result.get("overrides") or []) or "no overrides",
             f"; failed in {failure.get('role')}: {failure.get('reason')}" if failure else "")
    for name, s in result.get("roles", {}).items():
        log.info("%s: peak heap %s MiB (%s bytes), working %s MiB, peak RSS %s MiB; flamegraph %s", name,
                 _mib(s.get("peak_heap_bytes")), s.get("peak_heap_bytes"), _mib(s.get("working_heap_bytes")),
                 _mib(s.get("peak_rss_bytes")), s.get("flamegraph") or "none")
    for dropped in result.get("client_failures") or []:
        log.info("the job went on without %s: %s", dropped.get("role"), dropped.get("reason"))
    log.info("result: %s", Path(result["job_dir"]) / "result.json")


def print_result(result: dict, console: Console | None = None) -> None:
    """Print the job's outcome (global model, per-role table, flamegraph paths, failure) and log it."""
    console = console or make_console()
    log_result(result)
    rounds = result.get("rounds") or []
    if rounds and "test_accuracy" in rounds[-1]:
        last = rounds[-1]
        console.print(f"global model after {plural(len(rounds), 'round')}: test accuracy "
                      f"{last['test_accuracy']:.3f}, test loss {last['test_loss']:.4f}")
    if result.get("roles"):
        console.print(result_table(result, console.width))
    console.print(f"  run directory: {escape(str(result['job_dir']))}", soft_wrap=True, highlight=False)
    for name, s in result.get("roles", {}).items():
        where = s.get("flamegraph") or f"no flamegraph: {s.get('capture_error') or s.get('flamegraph_error')}"
        console.print(f"  {escape(str(name))}: {escape(str(where))}", soft_wrap=True, highlight=False)
    for dropped in result.get("client_failures") or []:
        console.print(f"[yellow]the job went on without {escape(str(dropped.get('role')))}[/] (strategy policy): "
                      f"{escape(str(dropped.get('reason')))}", soft_wrap=True)
    if result["status"] != "completed":
        failure = result.get("failure") or {}
        console.print(f"[bold red]job failed[/] in {escape(str(failure.get('role')))}: "
                      f"{escape(str(failure.get('reason')))}", soft_wrap=True)
