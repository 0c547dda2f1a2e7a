"""What the terminal, the logs and the docs say about a real sweep: tables that fit 80, 100 and 200
columns without splitting a number, output that is never wrapped when piped, a quiet exit when the
reader leaves early, launch.log, messages (plurals, what M belongs to, the data label), the README's
file layout, and that the transformer row's defaults learn."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from flmem.browse.compare import compare
from flmem.browse.discover import load_job, load_sweep
from flmem.browse.render import FORMATS, View, cell, emit, people
from flmem.browse.views import compare_view, run_view, sweep_view
from flmem.report import print_result
from flmem.termtable import UNLIMITED, FitColumn, fit_table, make_console, middle_ellipsis
from tests.conftest import REPO, launch, result, write_cifar, write_idx

slow = pytest.mark.slow
TINY = ["rounds=1", "local_steps=2", "batch_size=16", "dataset.samples_per_client=48", "dataset.test_samples=64",
        "num_clients=1", "profiling.memory_interval_ms=5"]
#: a long folder name, so that the sweep's paths are longer than 200 characters
DEEP = ("a-folder-name-long-enough-that-every-path-below-it-is-longer-than-two-hundred-characters-"
        "as-real-project-trees-sometimes-are")


@pytest.fixture(scope="module")
def deep_sweep(tmp_path_factory) -> tuple[Path, str]:
    """A real two-job sweep over CIFAR-10 and MNIST (two model sizes M) under a deep directory; and its log."""
    base = tmp_path_factory.mktemp("out")
    data = base / "data"
    write_cifar(data)
    write_idx(data / "MNIST" / "raw")
    cwd = base / DEEP
    cwd.mkdir()
    proc = launch(["-m", "dataset=cifar,mnist", *TINY], cwd, env={"FLMEM_DATA": str(data)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (cwd / "outputs" / "multirun").iterdir()
    return sweep, proc.stdout


def views(sweep_dir: Path) -> list[View]:
    sweep = load_sweep(sweep_dir)
    return [sweep_view(sweep), compare_view(sweep, compare(sweep, "dataset", None, 0.01)),
            run_view(load_job(sweep_dir / "0"))]


def render(view: View, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    emit(view, "table", console)
    return console.export_text()


def dropped_columns(text: str) -> list[str]:
    """The headers the 'not shown' captions name (a caption may wrap over lines), and those named as
    the same in every row (``the same in every row: pair: all, stage: fl``)."""
    flat = " ".join(text.split())
    names = [name.strip() for m in re.finditer(r"not shown, to fit \d+ columns: (.*?) \(a wider terminal", flat)
             for name in m.group(1).split(", ")]
    for m in re.finditer(r"the same in every row: (.{0,400})", flat):
        names += [part.split(": ")[0].strip() for part in m.group(1).split(", ") if ": " in part]
    return names


@slow
@pytest.mark.parametrize("width", [80, 100, 200])
def test_tables_fit_the_width_and_never_split_a_number(deep_sweep, width):
    sweep_dir, _ = deep_sweep
    dropped_any = False
    for view in views(sweep_dir):
        text = render(view, width)
        lines = text.splitlines()
        table_lines = [ln for ln in lines if ln[:1] in "┏┃┡│└"]
        assert table_lines and all(len(ln) <= width for ln in table_lines), "\n".join(table_lines)
        dropped = dropped_columns(text)
        dropped_any |= bool(dropped)
        cells_per_line = [[c.strip() for c in ln.split("│")] for ln in lines if ln.startswith("│")]
        for section in view.sections:
            cols = [c for c in people(section) if c.kind != "text" and " ".join(c.header.split()) not in dropped]
            for row in section.rows:
                numbers = [cell(row, c) for c in cols]
                # every number of the row stands whole, in one cell, on the row's first line
                assert any(all(n in parts for n in numbers) for parts in cells_per_line), (numbers, text)
    # the per-role table a job prints when it ends (flmem/report.py)
    res = result(sweep_dir / "0")
    console = Console(width=width, record=True, file=io.StringIO())
    print_result(res, console)
    text = console.export_text()
    assert all(len(ln) <= width for ln in text.splitlines() if ln[:1] in "┏┃┡│└")
    dropped = dropped_columns(text)
    cells_per_line = [[c.strip() for c in ln.split("│")] for ln in text.splitlines() if ln.startswith("│")]
    for name, summary in res["roles"].items():
        numbers = {"peak heap MiB": f"{summary['peak_heap_bytes'] / 2**20:,.1f}",
                   "peak RSS MiB": f"{summary['peak_rss_bytes'] / 2**20:,.1f}",
                   "working / M": f"{summary['working_heap_in_M']:.2f}"}
        shown = [v for k, v in numbers.items() if k not in dropped]
        assert any(parts[1:2] == [name] and all(v in parts for v in shown) for parts in cells_per_line), text
    assert f"run directory: {sweep_dir / '0'}\n" in text  # soft-wrapped: the terminal folds it, rich never cuts it
    if width == 80:
        assert dropped_any, "at 80 columns the sweep's tables cannot show every column"
    if width == 200:
        assert not dropped_columns(render(views(sweep_dir)[0], width)), "the jobs table fits 200 columns"


def test_fit_table_drops_columns_and_says_which():
    columns = [FitColumn("job", "text"), FitColumn("peak heap MiB"), FitColumn("peak RSS MiB", drop=1),
               FitColumn("flamegraph", "path")]
    rows = [["0", "1,234.5", "12,345.6", "/very/long/" + "x" * 80 + "/roles/server/flamegraph.html"]]
    console = Console(width=40, record=True, file=io.StringIO())
    table, dropped = fit_table(columns, rows, 40)
    console.print(table)
    assert dropped == [2]
    text = console.export_text()
    assert "1,234.5" in text and "12,345.6" not in text and dropped_columns(text) == ["peak RSS MiB"]
    assert "/very/lon…graph.html" in text  # the path keeps its start and end, shortened in the middle
    assert middle_ellipsis("/a/b/c/d/e/f/g", 7) == "/a/…f/g"


def test_a_console_that_is_not_a_terminal_never_wraps():
    console = make_console(file=io.StringIO())
    assert not console.is_terminal and console.width == UNLIMITED


@slow
def test_piped_output_is_never_wrapped_or_cut(deep_sweep, tmp_path):
    sweep_dir, _ = deep_sweep
    flame = sweep_dir / "0" / "roles" / "server" / "flamegraph.html"
    assert len(str(flame)) > 200
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="80")  # $COLUMNS is for terminals only
    for target in (sweep_dir, sweep_dir / "0"):
        out = {fmt: subprocess.run([sys.executable, "-m", "flmem.browse", str(target), "--format", fmt], cwd=tmp_path,
                                   env=env, capture_output=True, text=True, timeout=300) for fmt in FORMATS}
        assert all(p.returncode == 0 and not p.stderr for p in out.values()), {f: p.stderr for f, p in out.items()}
        assert str(target) in out["table"].stdout.splitlines()[0]
        assert "not shown" not in out["table"].stdout and "…" not in out["table"].stdout
        assert json.loads(out["json"].stdout)["dir"] == str(target)
        if target == sweep_dir:
            assert len(list(csv.reader(io.StringIO(out["csv"].stdout)))) == 3  # header + two jobs
        else:
            assert any(str(flame) in ln for ln in out["table"].stdout.splitlines())
            assert any(str(flame) in ln for ln in out["markdown"].stdout.splitlines())


@slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_reader_that_leaves_early_ends_the_output_quietly(deep_sweep, tmp_path, fmt):
    sweep_dir, _ = deep_sweep
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` once it has its line: every write now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "flmem.browse", str(sweep_dir), "--format", fmt], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = subprocess.run(f"set -o pipefail; {sys.executable} -m flmem.browse {sweep_dir} --format {fmt} | head -1",
                          shell=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, executable="/bin/bash", timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr


@slow
def test_launch_log_tells_the_job_and_the_console_shows_it_once(deep_sweep):
    sweep_dir, stdout = deep_sweep
    for job in ("0", "1"):
        text = (sweep_dir / job / "launch.log").read_text()
        res = result(sweep_dir / job)
        assert f"job started: {sweep_dir / job}; role=local, 1 client; overrides: " in text
        assert re.search(r"role server started: pid \d+, listening on 127\.0\.0\.1:\d+", text)
        assert re.search(r"role client_0 started: pid \d+", text)
        assert f"job completed in {res['duration_s']:.1f} s: " in text
        peak = res["roles"]["server"]["peak_heap_bytes"]
        assert f"server: peak heap {peak / 2**20:,.1f} MiB ({peak} bytes)" in text
        assert f"result: {sweep_dir / job / 'result.json'}" in text
    assert "[flmem.job]" not in stdout  # launch.log only: the terminal shows the job as printed
    assert "global model after 1 round: test accuracy" in stdout and "after 1 rounds" not in stdout


@slow
def test_the_sweep_note_says_which_jobs_each_model_size_belongs_to(deep_sweep):
    sweep_dir, _ = deep_sweep
    sweep = load_sweep(sweep_dir)
    sizes = {j.overrides["dataset"]: (j.name, j.model_bytes) for j in sweep.jobs}
    assert sizes["cifar"][1] != sizes["mnist"][1]
    note = next(n for n in sweep_view(sweep).notes if n.startswith("M = global model size"))
    for dataset, (name, m) in sizes.items():
        assert f"{m / 2**20:.2f} MiB for dataset={dataset} (job {name})" in note
    assert sweep_view(sweep).title.endswith("2 jobs, 0 failed, 0 running or incomplete")


@slow
def test_missing_data_is_labelled_data_not_config(tmp_path):
    proc = launch(["dataset=cifar", f"dataset.root={tmp_path / 'missing'}"], tmp_path)
    assert proc.returncode == 1
    (job,) = [p.parent for p in (tmp_path / "outputs").rglob("result.json")]
    res = result(job)
    assert res["failure"]["role"] == "data" and "cifar-10-batches-py lacks" in res["failure"]["reason"]
    assert "job failed in data: " in proc.stdout
    assert "; failed in data: " in (job / "launch.log").read_text()
    proc = launch(["num_clients=0"], tmp_path)
    assert "job failed in config: invalid config: num_clients=0" in " ".join(proc.stdout.split())


@slow
def test_the_readme_names_every_file_a_run_leaves(deep_sweep):
    sweep_dir, _ = deep_sweep
    layout = REPO.joinpath("README.md").read_text().split("## What a run leaves on disk", 1)[1].split("\n## ", 1)[0]
    # flamegraph-assets/ holds packaged third-party files (listed in its own README): named as a folder
    names = {p.name for p in sweep_dir.rglob("*") if (p.is_file() or p.name in (".hydra", "flamegraph-assets"))
             and "flamegraph-assets" not in p.parent.parts}
    names -= {"report.html"}  # written by `flmem browse --html`, not by the run: checked below
    for name in sorted(names):
        assert name in layout, f"{name} (left by a real sweep) is missing from README's 'What a run leaves on disk'"
    for name in ("report.html", "global_model.pt", "bench_command.txt"):
        assert name in layout


@slow
def test_the_transformer_row_learns_with_its_defaults(tmp_path):
    proc = launch(["dataset=tokens", "model=transformer", "profiling.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = [p.parent for p in (tmp_path / "outputs").rglob("result.json")]
    res = result(job)
    vocab = OmegaConf.load(job / "config.yaml").dataset.vocab_size  # the default, conf/dataset/tokens.yaml
    chance = math.log(vocab)  # cross-entropy of a uniform guess
    for name, rounds in res["client_rounds"].items():
        assert rounds[-1]["loss"] < chance - 0.5, (name, rounds[-1]["loss"], chance)
    assert res["rounds"][-1]["test_loss"] < chance - 0.5


def test_print_result_says_one_round():
    console = Console(width=100, record=True, file=io.StringIO())
    print_result({"status": "completed", "job_dir": "/j", "overrides": [], "roles": {},
                  "rounds": [{"round": 0, "test_accuracy": 0.5, "test_loss": 1.0}]}, console)
    assert "global model after 1 round: test accuracy 0.500" in console.export_text()


def test_failure_reasons_left_out_to_fit_are_listed_below_the_table():
    from flmem.browse.render import Section
    from flmem.browse.tables import METRIC_COLUMNS, Column

    cols = [Column("job", "job", "text"), Column("status", "status", "text"), *METRIC_COLUMNS,
            Column("notes", "notes", "text")]
    rows = [{"job": "0", "status": "failed", "notes": "data: cifar-10-batches-py lacks data_batch_1"},
            {"job": "1", "status": "completed", "server_peak_heap_bytes": 170711887, "duration_s": 33.1},
            # every column varies, so none is left out as the same in every row
            {"job": "2", "status": "completed", **{c.key: 123456789 if c.key.endswith("bytes") else 0.5
                                                    for c in METRIC_COLUMNS}}]
    text = render(View("sweep", [Section("jobs", "", cols, rows)]), 80)
    assert "notes: below the table" in " ".join(text.split())
    assert "  job 0: data: cifar-10-batches-py lacks data_batch_1" in text and "job 1:" not in text
    assert "162.8" in text  # the server's peak heap in MiB, whole
