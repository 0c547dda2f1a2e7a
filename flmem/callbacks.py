"""Hydra callbacks: the course of a sweep (refuse a used sweep dir, progress, exit status) and its summary.

``conf/config.yaml`` enables both under ``hydra:``::

    callbacks:
      sweep_progress:
        _target_: flmem.callbacks.SweepProgress
      sweep_summary:
        _target_: flmem.callbacks.SweepSummary

and ``python launch.py -m ... '~hydra.callbacks.sweep_summary'`` turns the summary off for one sweep.
Hydra calls ``on_multirun_*`` in the launcher process and ``on_job_*`` in the process that runs the
job (a worker process with ``hydra/launcher=joblib``), so what a job needs to know about the others
is read from the sweep directory, never from process state.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flmem.interrupt import WATCHED, expect_run, expect_sweep
from flmem.status import read_json

#: one entry per sweep this process ran: {"sweep", "jobs", "failed", "planned"}; ``launch.py`` exits 1
#: when any sweep had a failed or missing job.
SWEEPS: list[dict] = []

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def earlier_files(sweep_dir: Path) -> list[str]:
    """The names in ``sweep_dir`` (sorted), empty when it is missing or empty."""
    try:
        return sorted(p.name for p in Path(sweep_dir).iterdir())
    except OSError:
        return []


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: the product of the value counts of the sweep overrides
    (``hydra.sweeper.params`` and the command line), parsed by Hydra as the basic sweeper does.
    None for another sweeper or an override the basic sweeper expands otherwise."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else params
    # unresolved: a '${...}' in an override is the job's to resolve (and to report when it does not)
    args = [f"{k}={v}" for k, v in params.items()] + \
        [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    try:
        (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    except Exception:  # a glob over group options needs the config loader: not worth guessing
        return None
    return len(batch)


def job_results(sweep_dir: Path) -> dict[Path, dict | None]:
    """Every job directory under ``sweep_dir`` (one holding ``.hydra/`` or ``result.json``) and its
    result, None where the job has none (still running, or its launcher died)."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent for p in sweep_dir.rglob("result.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    return {d: read_json(d / "result.json") for d in sorted(found)
            if d != sweep_dir and "roles" not in d.relative_to(sweep_dir).parts}


def _secs(s: float) -> str:
    s = int(round(s))
    return f"{s}s" if s < 120 else f"{s // 60}m{s % 60:02d}s" if s < 7200 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class SweepProgress(Callback):
    """The course of a sweep, whatever launcher runs its jobs.

    * ``on_multirun_start``: refuse a ``hydra.sweep.dir`` that already holds files (an earlier sweep's
      jobs, ``multirun.yaml``, ``summary.*``), before Hydra writes anything there: exit status 1,
      naming the key and the fix; the earlier files stay untouched.
    * ``on_job_start``: print ``job k of N, elapsed Xs, about Ys remaining``; N as the basic sweeper
      counts it (:func:`planned_jobs`); Y = the jobs left times the mean time per job so far: the
      sweep's elapsed wall time over the jobs done (those with a ``result.json``), which counts
      imports and summarizing and, with a parallel launcher, the jobs run at once. An estimate: jobs
      that differ in size (``num_clients=2,16``) make it wrong by as much.
    * ``on_run_start`` / ``on_multirun_start``: tell :mod:`flmem.interrupt` which folder to settle on Ctrl-C.
    * ``on_multirun_end``: record the sweep's outcome in :data:`SWEEPS` from its jobs' ``result.json``
      (a job without one, or a planned job that never ran, counts as failed).
    """

    def __init__(self) -> None:
        self.started: float | None = None
        self.planned: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        held = earlier_files(sweep_dir)
        if held:  # SystemExit: Hydra turns an Exception from a callback into a warning and goes on
            shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
            raise SystemExit(f"flmem: hydra.sweep.dir={sweep_dir} already holds {shown}; nothing was run and its "
                             "files are left as they were. Run again without hydra.sweep.dir (a new directory per "
                             "sweep) or pick a new or empty one")
        self.started = time.time()
        self.planned = planned_jobs(config)
        expect_sweep(sweep_dir.absolute())

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        expect_run(Path(str(config.hydra.run.dir)).absolute())  # where an interrupt is recorded

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            print(self.progress_line(config), flush=True)
        except Exception:  # progress must never stop a job
            pass

    def progress_line(self, config: DictConfig) -> str:
        """``job k of N, elapsed Xs, about Ys remaining`` for the job ``config`` describes."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        k = int(config.hydra.job.num) + 1
        started = self.started
        if started is None:  # no state from on_multirun_start: Hydra wrote multirun.yaml at the start
            started = (sweep_dir / "multirun.yaml").stat().st_mtime
        elapsed = time.time() - started
        done = sum(1 for r in job_results(sweep_dir).values() if r)
        head = f"job {k} of {self.planned}" if self.planned else f"job {k} (the sweeper does not say how many)"
        line = f"{head}, elapsed {_secs(elapsed)}"
        if not done:
            return line + ", time remaining estimated once a job has ended"
        per_job = elapsed / done
        if not self.planned:
            return line + f", {_secs(per_job)} per job so far"
        remaining = per_job * max(1, self.planned - done)
        return line + f", about {_secs(remaining)} remaining ({_secs(per_job)} per job so far)"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        results = job_results(sweep_dir)
        failed = sum(1 for r in results.values() if not r or r.get("status") != "completed")
        missing = max(0, (self.planned or 0) - len(results))
        SWEEPS.append({"sweep": str(sweep_dir), "jobs": len(results), "failed": failed + missing,
                       "planned": self.planned})


class SweepSummary(Callback):
    """On ``on_multirun_end``: print the comparison table (or the jobs table when no override
    can be compared) and write ``summary.json`` and ``summary.md`` at the sweep root, failed jobs
    included. It reads the jobs from disk like ``flmem browse`` and never fails the sweep. An
interrupted sweep gets its summary too, written by :func:`flmem.interrupt.record`.

    ``compare``: the override to compare (default: ``optimize`` when it varies, else the first
    varying override). ``noise_pct``: the relative noise floor for memory, in percent.
    """

    def __init__(self, compare: str | None = None, noise_pct: float = 1.0) -> None:
        self.compare = compare
        self.noise_pct = float(noise_pct)
        self.sweep_dirs: list[Path] = []
        self.earlier: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # SweepProgress refuses a used sweep dir; without it, at least never summarize old jobs as new
        self.earlier = earlier_files(Path(str(config.hydra.sweep.dir)))
        if not self.earlier:  # an interrupted sweep is summarized too (flmem.interrupt.record)
            WATCHED["summary"] = (self.compare, self.noise_pct / 100)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            out = Path(str(job_return.hydra_cfg.hydra.runtime.output_dir)).parent
        except Exception:
            return
        if out not in self.sweep_dirs:
            self.sweep_dirs.append(out)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.earlier:
            print(f"flmem: no summary: hydra.sweep.dir={config.hydra.sweep.dir} held an earlier sweep's files "
                  f"({', '.join(self.earlier[:6])}) before this one started; they are left as they were",
                  file=sys.stderr, flush=True)
            return
        dirs = list(self.sweep_dirs)
        if not dirs:
            try:
                dirs = [Path(str(config.hydra.sweep.dir))]
            except Exception:
                return
        for sweep_dir in dirs:
            try:
                write_summary(sweep_dir, self.compare, self.noise_pct / 100, echo=True)
            except Exception as exc:  # a summary must never turn a finished sweep into a failed one
                from flmem import diskfull

                if diskfull.is_disk_full(exc):  # one line: a traceback says nothing more
                    print(f"flmem: could not summarize {sweep_dir}: {diskfull.describe(exc)}", flush=True)
                    continue
                print(f"flmem: could not summarize {sweep_dir}:\n{traceback.format_exc()}", flush=True)


def write_summary(sweep_dir: Path, key: str | None = None, rel_noise: float = 0.01, echo: bool = False) -> dict:
    """Write ``summary.json`` and ``summary.md`` at ``sweep_dir`` and return the JSON's content.

    The JSON holds the jobs (raw bytes and seconds, failed jobs with their failing role and
    reason) and, when an override can be compared, the comparison (before, after, diff, ratio,
    noise per role). Raises BrowseError when ``sweep_dir`` is not a sweep.
    """
    from flmem.browse.compare import compare, default_key
    from flmem.browse.discover import load_sweep
    from flmem.browse.model import BrowseError
    from flmem.browse.output import write_text_atomic
    from flmem.browse.render import emit, make_console, to_json, to_markdown
    from flmem.browse.views import compare_view, sweep_view

    sweep = load_sweep(Path(sweep_dir))
    jobs = sweep_view(sweep)
    key = key or default_key(sweep)
    comparison, note = None, None
    if key:
        try:
            comparison = compare(sweep, key, rel_noise=rel_noise)
        except BrowseError as exc:
            note = str(exc)
    views = [jobs] + ([compare_view(sweep, comparison)] if comparison else [])
    data = {"sweep": str(sweep.dir), "jobs_total": len(sweep.jobs), "jobs_failed": sweep.failed,
            "varying": sweep.varying,
            "jobs": json.loads(to_json(jobs))["jobs"],
            "failures": [{"job": j.name, "dir": str(j.dir), **(j.failure or {"role": None, "reason": j.status})}
                         for j in sweep.jobs if j.status != "completed"],
            "comparison": comparison.as_dict() if comparison else None, "comparison_note": note}
    write_text_atomic(sweep.dir / "summary.json", json.dumps(data, indent=2, default=str))
    write_text_atomic(sweep.dir / "summary.md", "\n".join(to_markdown(v) for v in views)
                      + (f"\n- no comparison: {note}\n" if note else ""))
    if echo:
        console = make_console()
        emit(views[-1], "table", console)
        console.print(f"summary: {sweep.dir / 'summary.md'} and summary.json", soft_wrap=True, highlight=False,
                      markup=False)  # a directory name is text, never rich markup
    return data

