"""Hydra callbacks: at the end of a sweep, print its comparison and write its summary.

``conf/config.yaml`` enables it under ``hydra:``::

    callbacks:
      sweep_summary:
        _target_: flmem.callbacks.SweepSummary

and ``python launch.py -m ... '~hydra.callbacks.sweep_summary'`` turns it off for one sweep.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from flmem.status import write_json


class SweepSummary(Callback):
    """On ``on_multirun_end``: print the comparison table (or the jobs table when no override
    can be compared) and write ``summary.json`` and ``summary.md`` at the sweep root, failed jobs
    included. It reads the jobs from disk like ``flmem browse`` and never fails the sweep.

    ``compare``: the override to compare (default: ``optimize`` when it varies, else the first
    varying override). ``noise_pct``: the relative noise floor for memory, in percent.
    """

    def __init__(self, compare: str | None = None, noise_pct: float = 1.0) -> None:
        self.compare = compare
        self.noise_pct = float(noise_pct)
        self.sweep_dirs: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            out = Path(str(job_return.hydra_cfg.hydra.runtime.output_dir)).parent
        except Exception:
            return
        if out not in self.sweep_dirs:
            self.sweep_dirs.append(out)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        dirs = list(self.sweep_dirs)
        if not dirs:
            try:
                dirs = [Path(str(config.hydra.sweep.dir))]
            except Exception:
                return
        for sweep_dir in dirs:
            try:
                write_summary(sweep_dir, self.compare, self.noise_pct / 100, echo=True)
            except Exception:  # a summary must never turn a finished sweep into a failed one
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
    write_json(sweep.dir / "summary.json", data)
    (sweep.dir / "summary.md").write_text("\n".join(to_markdown(v) for v in views)
                                          + (f"\n- no comparison: {note}\n" if note else ""))
    if echo:
        console = make_console()
        emit(views[-1], "table", console)
        console.print(f"summary: {sweep.dir / 'summary.md'} and summary.json", soft_wrap=True, highlight=False)
    return data

