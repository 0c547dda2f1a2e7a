"""The body of `launch.py`: one Hydra job in, one profiled FL job out."""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flmem.launcher import run_job
from flmem.report import RoleProgress, print_result

#: results of failed jobs in this process; `launch.py` exits 1 when any job failed.
FAILED_JOBS: list[dict] = []


def run_from_hydra(cfg: DictConfig) -> float | None:
    """Run the job Hydra composed, print its table; returns the final test accuracy (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    result = run_job(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), RoleProgress())
    print_result(result)
    if result["status"] != "completed":
        FAILED_JOBS.append(result)
        return None
    rounds = result.get("rounds") or []
    return rounds[-1].get("test_accuracy") if rounds else None
