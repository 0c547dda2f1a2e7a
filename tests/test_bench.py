"""The benchmark command runs its sweeps for real (on a tiny experiment) and writes a well-formed table."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_runs_a_tiny_experiment_and_writes_the_table(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "flmem.bench", "--experiments", "bench_tiny", "--root",
                           str(tmp_path / "bench"), "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(REPO), **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.startswith("# flmem benchmarks") and "Machine: " in text and "cores" in text
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["optimize", "runs", "failed"] and "server working M" in header
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]
    assert sorted(r[0] for r in rows) == ["False", "True"]
    for row in rows:
        assert len(row) == len(header) and row[1] == "1" and row[2] == "0"
        cells = dict(zip(header, row))
        assert float(cells["server peak MiB"].replace(",", "")) > float(cells["server working MiB"].replace(",", "")) > 0
        assert float(cells["round s"]) > 0 and float(cells["MiB/s"]) > 0


def test_bench_refuses_unknown_experiments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flmem.bench", "--experiments", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown experiment(s) nope; choose from" in proc.stderr
    assert "resnet_scaling" in proc.stderr
