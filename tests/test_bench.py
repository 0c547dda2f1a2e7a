"""The benchmark command runs its sweeps for real (on a tiny experiment), writes medians with their
ranges over repeats, and never replaces measured tables with nothing."""
import os
import re
import subprocess
import sys

import pytest

from flmem.bench import MiB, fmt_spread, sections
from tests.conftest import REPO

CELL = re.compile(r"^(-?[\d,]+\.\d+) \((-?[\d,]+\.\d+)-(-?[\d,]+\.\d+)\)$")  # "11.7 (10.9-14.9)"


def bench(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flmem.bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})


def table_rows(text: str, heading: str) -> tuple[list[str], list[dict]]:
    body = sections(text)[heading]
    table = [ln for ln in body.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [dict(zip(header, [c.strip() for c in ln.strip("|").split("|")])) for ln in table[2:]]
    return header, rows


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_a_cell_is_the_median_with_its_range_when_there_was_more_than_one_run():
    assert fmt_spread((11.7 * MiB, 10.9 * MiB, 14.9 * MiB, 3)) == "11.7 (10.9-14.9)"
    assert fmt_spread((1200.25 * MiB, 1100.0 * MiB, 1300.0 * MiB, 2)) == "1,200.2 (1,100.0-1,300.0)"
    assert fmt_spread((2.36, 2.31, 2.4, 2), "M") == "2.36 (2.31-2.40)"
    assert fmt_spread((12.07, 12.07, 12.07, 1), "") == "12.07"  # one run: no range to quote
    assert fmt_spread((-0.5 * MiB, -1.0 * MiB, 0.25 * MiB, 2)) == "-0.5 (-1.0 to 0.2)"
    assert fmt_spread(None) == "-"


def test_tables_only_without_runs_refuses_and_leaves_the_report_as_it_was(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text((REPO / "BENCHMARKS.md").read_text())
    before = out.read_text()
    proc = bench(["--tables-only", "--root", str(tmp_path / "empty"), "--out", str(out)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(tmp_path / "empty") in proc.stderr and "was not written" in proc.stderr
    for name in ("resnet_scaling", "client_overhead", "large_model", "profiling_overhead", "round_time"):
        assert name in proc.stderr
    assert out.read_text() == before
    # no report at all: refused the same way, and nothing is created
    proc = bench(["--tables-only", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "new.md")], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "new.md").exists()


@pytest.mark.slow
def test_bench_runs_repeats_and_writes_medians_with_ranges(tmp_path):
    out, root = tmp_path / "BENCHMARKS.md", tmp_path / "bench"
    proc = bench(["--experiments", "bench_tiny:2", "--root", str(root), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.startswith("# flmem benchmarks") and "Machine: " in text and "cores" in text
    assert "followed by the range (min-max)" in text
    header, rows = table_rows(text, "bench_tiny")
    assert header[:3] == ["optimize", "runs", "failed"] and "server working M" in header
    assert sorted(r["optimize"] for r in rows) == ["False", "True"]
    for cells in rows:
        assert cells["runs"] == "2" and cells["failed"] == "0", cells
        for col in ("server peak MiB", "server working MiB", "server working M", "client peak MiB", "round s",
                    "MiB/s"):
            match = CELL.match(cells[col])
            assert match, f"{col}: {cells[col]!r} is not 'median (min-max)'"
            med, lo, hi = (number(g) for g in match.groups())
            assert lo <= med <= hi and med > 0, (col, cells[col])
        assert number(CELL.match(cells["server peak MiB"]).group(1)) > \
            number(CELL.match(cells["server working MiB"]).group(1)) > 0

    # Rebuilding with an experiment that has no runs keeps its section (and hand-written notes) from the
    # current report; the rebuilt table is the same as the one the runs wrote.
    old = (REPO / "BENCHMARKS.md").read_text()
    out.write_text(old)
    proc = bench(["--tables-only", "--experiments", "bench_tiny,round_time", "--root", str(root), "--out", str(out)],
                 tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rebuilt = out.read_text()
    assert table_rows(rebuilt, "bench_tiny") == (header, rows)
    kept = sections(rebuilt)["round_time"]
    assert f"Kept from the previous BENCHMARKS.md: no job results under `{root / 'round_time'}`" in kept
    old_table = [ln for ln in sections(old)["round_time"].splitlines() if ln.startswith("|")]
    assert old_table and all(ln in kept.splitlines() for ln in old_table)
    for name, body in sections(old).items():  # nothing measured is lost: every old table line is still there
        assert all(ln in rebuilt.splitlines() for ln in body.splitlines() if ln.startswith("|")), name

    # An experiment with neither runs nor a section to keep: the whole write is refused.
    out.write_text("# flmem benchmarks\n")
    proc = bench(["--tables-only", "--experiments", "bench_tiny,large_model", "--root", str(root), "--out",
                  str(out)], tmp_path)
    assert proc.returncode == 2 and "large_model" in proc.stderr and str(root) in proc.stderr
    assert out.read_text() == "# flmem benchmarks\n"


def test_bench_refuses_unknown_experiments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flmem.bench", "--experiments", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown experiment(s) nope; choose from" in proc.stderr
    assert "resnet_scaling" in proc.stderr
