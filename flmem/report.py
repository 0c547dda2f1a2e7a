"""What a job shows in the terminal: a live progress display per role, then a per-role memory table."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flmem.status import read_json

MiB = 2**20


def make_console() -> Console:
    """A rich console; when output goes to a file or pipe, wide enough that paths are never cut in two."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


class RoleProgress:
    """Rounds done per role, read from each role's ``status.json`` while the job runs."""

    def __init__(self, console: Console | None = None):
        self.console = console or make_console()
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def start_job(self, cfg) -> None:
        self.rounds = int(cfg.rounds)
        self.progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("rounds  {task.fields[phase]}"), TimeElapsedColumn(),
                                 console=self.console)
        self.progress.start()
        self.tasks = {}

    def update(self, roles) -> None:
        if self.progress is None:
            return
        for role in roles:
            status = read_json(role.dir / "status.json", {})
            phase = status.get("phase", "starting")
            if role.returncode not in (None, 0):
                phase = f"[red]failed (exit {role.returncode})"
            elif role.returncode == 0:
                phase = "[green]done"
            if role.name not in self.tasks:
                self.tasks[role.name] = self.progress.add_task(role.name, total=self.rounds, phase=phase)
            self.progress.update(self.tasks[role.name], completed=status.get("rounds_done", 0), phase=phase)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def result_table(result: dict) -> Table:
    """Per role: peak heap, baseline, working memory (MiB and in units of M), FL working heap (peak heap during
    federated learning minus the heap when it began), peak RSS and working RSS (peak RSS minus the RSS at the
    baseline)."""
    m = result.get("model_bytes")
    title = f"{result['status']}: {result['job_dir']}" + (f"  (M = {m / MiB:.2f} MiB)" if m else "")
    table = Table(title=title, title_justify="left")
    for col in ("role", "peak heap MiB", "baseline MiB", "working MiB", "working / M", "FL working MiB",
                "peak RSS MiB", "working RSS MiB"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for name, s in result.get("roles", {}).items():
        in_m = s.get("working_heap_in_M")
        table.add_row(name, _mib(s.get("peak_heap_bytes")), _mib(s.get("baseline_heap_bytes")),
                      _mib(s.get("working_heap_bytes")), "-" if in_m is None else f"{in_m:.2f}",
                      _mib(s.get("fl_working_heap_bytes")), _mib(s.get("peak_rss_bytes")),
                      _mib(s.get("working_rss_bytes")))
    return table


def print_result(result: dict, console: Console | None = None) -> None:
    console = console or make_console()
    rounds = result.get("rounds") or []
    if rounds and "test_accuracy" in rounds[-1]:
        last = rounds[-1]
        console.print(f"global model after {len(rounds)} rounds: test accuracy {last['test_accuracy']:.3f}, "
                      f"test loss {last['test_loss']:.4f}")
    if result.get("roles"):
        console.print(result_table(result))
    for name, s in result.get("roles", {}).items():
        where = s.get("flamegraph") or f"no flamegraph: {s.get('capture_error') or s.get('flamegraph_error')}"
        console.print(f"  {name}: {where}", soft_wrap=True)
    if result["status"] != "completed":
        failure = result.get("failure") or {}
        console.print(f"[bold red]job failed[/] in {failure.get('role')}: {failure.get('reason')}")
