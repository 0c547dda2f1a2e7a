"""The body of `launch.py`: one Hydra job in, one profiled FL job out, and the exit status."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flmem import diskfull
from flmem.launcher import DiskFullError, run_job
from flmem.report import RoleProgress, log_result, print_result
from flmem.status import read_json

#: results of the failed jobs this process ran itself (every job of a single run; in a sweep, only
#: the basic launcher runs jobs here, so a sweep's status comes from flmem.callbacks.SWEEPS instead).
FAILED_JOBS: list[dict] = []


def run_from_hydra(cfg: DictConfig) -> float | None:
    """Run the job Hydra composed, print its table; returns the final test accuracy (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    dir_key = "hydra.sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir"
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # as typed: '${...}' unresolved
    if hydra_cfg.mode == RunMode.MULTIRUN:
        overrides = [_unescaped(o) for o in overrides]
    try:
        result = run_job(cfg, job_dir, overrides, RoleProgress(), dir_key=dir_key)
    except DiskFullError as exc:  # not even result.json fits: say it here, once, and go on to the next job
        logging.raiseExceptions = False  # launch.log lies on the full disk: a lost line is no traceback
        with contextlib.suppress(OSError):
            print(f"flmem: job failed in {job_dir}: {exc}", file=sys.stderr, flush=True)
        FAILED_JOBS.append({"status": "failed", "job_dir": str(job_dir), "failure": {"role": "launcher",
                                                                                    "reason": str(exc)}})
        return None
    except KeyboardInterrupt:  # run_job wrote result.json saying when: launch.log gets it too
        interrupted = read_json(job_dir / "result.json")
        if interrupted:
            log_result(interrupted)
        raise
    if diskfull.said((result.get("failure") or {}).get("reason")):
        logging.raiseExceptions = False  # launch.log lies on the full disk: a lost line is no traceback
    print_result(result)
    if result["status"] != "completed":
        FAILED_JOBS.append(result)
        return None
    rounds = result.get("rounds") or []
    return rounds[-1].get("test_accuracy") if rounds else None


def _unescaped(override: str) -> str:
    """A sweep job's override as the user typed it where that reads the same: Hydra's sweepers hand each
    job its string value re-escaped for their grammar (``lit\\${x}`` arrives as ``lit\\\\$\\{x\\}``); the
    value unescaped is kept when Hydra parses it back to the same string (a value with a comma or a space
    keeps its escapes), so the override stays one that Hydra reads as this job's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def value_of(line: str):
        (parsed,) = OverridesParser.create().parse_overrides([line])
        return parsed.value()

    try:
        value = value_of(override)
        if not isinstance(value, str) or "=" not in override:
            return override
        typed = f"{override.split('=', 1)[0]}={value}"
        return typed if value_of(typed) == value else override
    except Exception:  # not for us to judge here: the job reports what is wrong with it
        return override


def exit_status() -> int:
    """1 when a job failed, else 0, whichever launcher ran the jobs.

    A sweep's jobs may run in other processes (``hydra/launcher=joblib``): its status comes from
    its jobs' ``result.json``, read at the sweep's end by :class:`flmem.callbacks.SweepProgress`.
    Without that callback (removed from ``hydra.callbacks``) only the jobs run in this process count.
    """
    from flmem.callbacks import SWEEPS

    if SWEEPS:
        return 1 if any(s["failed"] for s in SWEEPS) else 0
    return 1 if FAILED_JOBS else 0
