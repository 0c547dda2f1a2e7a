"""The README's custom strategy, as written there, runs a real job selected by ``strategy._target_``."""
import re

import pytest

from conftest import REPO, TINY, job_dirs, launch, result


def readme_strategy() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(import torch\nfrom flmem.strategies import FedAvg\n.*?)```", text, re.S)
    assert block, "README.md lost its custom strategy example"
    return block.group(1)


@pytest.mark.slow
def test_readme_custom_strategy_runs_on_both_paths(tmp_path):
    (tmp_path / "my_strategies.py").write_text(readme_strategy())
    for optimize in ("true", "false"):
        proc = launch([*TINY, "strategy._target_=my_strategies.FedAvgM", f"optimize={optimize}"], tmp_path,
                      env={"PYTHONPATH": str(tmp_path)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (optimized, original) = [result(j) for j in job_dirs(tmp_path)]
    for res in (optimized, original):
        assert res["status"] == "completed" and [r["strategy"] for r in res["rounds"]] == ["FedAvgM", "FedAvgM"]
    assert [r["test_loss"] for r in optimized["rounds"]] == [r["test_loss"] for r in original["rounds"]]
