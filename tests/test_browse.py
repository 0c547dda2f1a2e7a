"""flmem browse on a sweep produced for real (tests/browse_fixtures.py), its formats, the Hydra
callback's summary, damaged and unfinished runs, and the HTML report in a headless chromium."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from flmem.browse import cli
from flmem.browse.discover import load_job, load_sweep
from flmem.browse.model import parse_overrides
from flmem.browse.render import fmt

from browse_fixtures import (REPO, chromium_argv, completed_job, find_chromium,  # noqa: F401 (fixtures)
                             damaged_run, outputs, sweep, sweep_log, unfinished_runs)

MiB = 2**20
slow = pytest.mark.slow


def browse(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["browse", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def browse_json(capsys, *args) -> dict:
    code, out, err = browse(capsys, *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def summaries(job_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in job_dir.glob("roles/*/summary.json")}


def result(job_dir: Path) -> dict:
    return json.loads((job_dir / "result.json").read_text())


# ---------------------------------------------------------------------------------------- units
def test_parse_overrides_and_format():
    assert parse_overrides(["optimize=True", "+a.b=1", "~c", "++d=x=y"]) == \
        {"optimize": "True", "a.b": "1", "c": "<deleted>", "d": "x=y"}
    assert fmt(3 * MiB, "bytes") == "3.0"
    assert fmt(-1.5 * MiB, "diff_bytes") == "-1.5"
    assert fmt(0.5, "ratio_x") == "0.500x"
    assert fmt(None, "bytes") == "-"


# ---------------------------------------------------------------------------------- sweep view
@slow
def test_sweep_rows_equal_role_summaries(capsys, sweep):
    data = browse_json(capsys, sweep)
    rows = {r["job"]: r for r in data["jobs"]}
    assert len(rows) == 4 and data["varying"] == ["optimize", "num_clients"]
    completed = [r for r in rows.values() if r["status"] == "completed"]
    assert len(completed) == 2
    for row in completed:
        job = sweep / row["job"]
        s = summaries(job)
        clients = [v for k, v in s.items() if k.startswith("client_")]
        assert len(clients) == 2 and row["num_clients"] == "2"
        assert row["server_peak_heap_bytes"] == s["server"]["peak_heap_bytes"]
        assert row["server_peak_rss_bytes"] == s["server"]["peak_rss_bytes"]
        assert row["clients_peak_heap_max_bytes"] == max(c["peak_heap_bytes"] for c in clients)
        assert row["clients_peak_heap_mean_bytes"] == pytest.approx(sum(c["peak_heap_bytes"] for c in clients) / 2)
        assert row["clients_peak_rss_max_bytes"] == max(c["peak_rss_bytes"] for c in clients)
        assert row["server_working_in_M"] == pytest.approx(s["server"]["working_heap_in_M"])
        server = s["server"]
        assert row["server_working_in_M"] == pytest.approx(server["working_heap_bytes"] / server["model_bytes"])
        assert row["clients_working_in_M_max"] == pytest.approx(max(c["working_heap_in_M"] for c in clients))
        assert row["duration_s"] == pytest.approx(result(job)["duration_s"])
        assert row["final_accuracy"] == result(job)["rounds"][-1]["test_accuracy"]
    for row in rows.values():
        if row["status"] == "failed":
            assert row["num_clients"] == "0" and row["failure_role"] == "config"
            assert "num_clients" in row["failure_reason"] and row["server_peak_heap_bytes"] is None
    # the terminal table shows the same numbers in MiB, and the failure reason
    code, out, _ = browse(capsys, sweep)
    assert code == 0
    for row in completed:
        assert f"{row['server_peak_heap_bytes'] / MiB:,.1f}" in out
        assert f"{row['clients_peak_rss_mean_bytes'] / MiB:,.1f}" in out
    assert "failed" in out and "config:" in out and "invalid" in out


@slow
def test_filter_and_sort(capsys, sweep):
    rows = browse_json(capsys, sweep, "--filter", "status=completed", "--sort=-server_peak_heap_bytes")["jobs"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert rows[0]["server_peak_heap_bytes"] >= rows[1]["server_peak_heap_bytes"]
    rows = browse_json(capsys, sweep, "--filter", "num_clients=2", "--filter", "optimize=true")["jobs"]
    assert len(rows) == 1 and rows[0]["optimize"].lower() == "true"
    rows = browse_json(capsys, sweep, "--filter", "status!=completed", "--sort", "job")["jobs"]
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert [int(r["job"]) for r in rows] == sorted(int(r["job"]) for r in rows)


@slow
def test_csv_and_markdown_parse(capsys, sweep):
    code, out, _ = browse(capsys, sweep, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 4
    by_job = {r["job"]: r for r in rows}
    for job, row in by_job.items():
        if row["status"] == "completed":
            assert int(row["server_peak_heap_bytes"]) == summaries(sweep / job)["server"]["peak_heap_bytes"]
        else:
            assert row["server_peak_heap_bytes"] == "" and "num_clients" in row["notes"]
    code, out, _ = browse(capsys, sweep, "--format", "markdown")
    table = [line for line in out.splitlines() if line.startswith("|")]
    widths = {len(re.split(r"(?<!\\)\|", line)) for line in table}
    assert code == 0 and len(table) == 2 + 4 and len(widths) == 1, table
    assert set(table[1].replace(":", "").split("|")[1:-1]) == {"---"}


# -------------------------------------------------------------------------------------- compare
@slow
def test_compare_pairs_jobs_that_differ_only_in_key(capsys, sweep):
    data = browse_json(capsys, sweep, "--compare", "optimize")
    assert data["before_value"].lower() == "false" and [v.lower() for v in data["after_values"]] == ["true"]
    assert {p["group"] for p in data["pairs"]} == {"num_clients=0", "num_clients=2"}
    pair = next(p for p in data["pairs"] if p["group"] == "num_clients=2")
    before, after = sweep / pair["before_job"], sweep / pair["after_job"]
    assert before == completed_job(sweep, "false") and after == completed_job(sweep, "true")
    rows = {(r["group"], r["role"], r["metric"]): r for r in data["comparison"]}
    sb, sa = summaries(before), summaries(after)
    for metric, key in (("peak heap", "peak_heap_bytes"), ("working memory", "working_heap_bytes"),
                        ("peak RSS", "peak_rss_bytes")):
        r = rows[("num_clients=2", "server", metric)]
        assert (r["before"], r["after"]) == (sb["server"][key], sa["server"][key])
        assert r["diff"] == sa["server"][key] - sb["server"][key]
        assert r["ratio"] == pytest.approx(sa["server"][key] / sb["server"][key])
        assert r["within_noise"] == (abs(r["diff"]) <= r["noise"])
        cmax = rows[("num_clients=2", "clients (max)", metric)]
        assert cmax["after"] == max(v[key] for k, v in sa.items() if k.startswith("client"))
        # noise is at least the spread across the clients of either job
        spread = max(max(v[key] for k, v in s.items() if k.startswith("client")) -
                     min(v[key] for k, v in s.items() if k.startswith("client")) for s in (sa, sb))
        assert cmax["noise"] >= spread
    acc = rows[("num_clients=2", "job", "final accuracy")]
    assert acc["before"] == result(before)["rounds"][-1]["test_accuracy"]
    failed = rows[("num_clients=0", "job", "status")]
    assert failed["before"] is None and "failed" in failed["note"] and "num_clients" in failed["note"]
    code, out, _ = browse(capsys, sweep, "--compare", "optimize", "--filter", "role=server")
    assert code == 0
    assert "peak heap" in out and "clients (max)" not in out


@slow
def test_callback_wrote_summary_and_printed_comparison(sweep, sweep_log):
    data = json.loads((sweep / "summary.json").read_text())
    assert data["jobs_total"] == 4 and data["jobs_failed"] == 2
    assert {f["role"] for f in data["failures"]} == {"config"}
    assert all("num_clients" in f["reason"] for f in data["failures"])
    assert data["comparison"]["key"] == "optimize" and len(data["comparison"]["pairs"]) == 2
    md = (sweep / "summary.md").read_text()
    assert "| job |" in md and "before optimize=" in md and md.count("| failed |") == 2
    assert "optimize=False (before) vs optimize=True (after)" in sweep_log
    assert "summary.md" in sweep_log


# ------------------------------------------------------------------------------ listing and runs
@slow
def test_listing_newest_first_with_counts(capsys, outputs, sweep, damaged_run):
    data = browse_json(capsys, "--root", outputs)
    items = data["runs"]
    assert [i["kind"] for i in items] == ["run", "sweep"]  # the copied run is stamped 2030
    s = items[1]
    assert (s["jobs"], s["planned"], s["failed"], s["running"]) == (4, 4, 2, 0)
    assert s["varying"].lower() == "optimize=true,false num_clients=0,2"
    assert items[0]["problems"] == 1
    code, out, _ = browse(capsys, "latest", "--root", outputs)  # the newest sweep, though a run is newer
    assert code == 0 and sweep.name in out and "2030-01-01_00-00-00-000000" not in out


@slow
def test_run_view_reports_missing_unreadable_truncated_captures(capsys, damaged_run):
    data = browse_json(capsys, damaged_run)
    problems = "\n".join(data["problems"])
    assert "server: capture.bin missing" in problems
    assert "client_0: unreadable capture" in problems
    assert "client_1: truncated capture" in problems
    roles = {r["role"]: r for r in data["roles"]}
    assert roles["server"]["capture"].startswith("missing")
    assert roles["client_1"]["capture"].startswith("truncated")
    s = summaries(damaged_run)
    assert roles["client_1"]["peak_heap_bytes"] == s["client_1"]["peak_heap_bytes"]  # summary.json still holds
    sites = [x for x in data["top_sites"] if x["role"] == "server"]
    assert [(x["function"], x["line"], x["bytes"]) for x in sites] == \
        [(x["function"], x["line"], x["bytes"]) for x in s["server"]["top_sites"][:5]]
    assert [r["test_accuracy"] for r in data["rounds"]] == [r["test_accuracy"] for r in result(damaged_run)["rounds"]]
    code, out, _ = browse(capsys, damaged_run, "--top", "3")
    assert code == 0 and "truncated capture" in out and "unreadable capture" in out
    assert "high-water mark" in out and "per round" in out


@slow
def test_running_and_incomplete_jobs(unfinished_runs):
    running, dead = unfinished_runs
    job = load_job(running)
    assert job.status == "running" and job.rounds  # per-round metrics come from metrics.jsonl
    assert {r.capture_state for r in job.roles.values()} == {"open"}
    job = load_job(dead)
    assert job.status == "incomplete" and "no result.json" in job.problems[0]


def test_bad_input_exits_2_with_choices(capsys, tmp_path):
    code, _, err = browse(capsys, tmp_path / "nope")
    assert code == 2 and "nope: no such directory" in err and "latest" in err
    code, _, err = browse(capsys, "latest", "--root", tmp_path)
    assert code == 2 and "no sweeps or runs" in err
    code, _, err = browse(capsys, tmp_path)
    assert code == 2 and "not a flmem sweep or run" in err
    proc = subprocess.run([sys.executable, "-m", "flmem.browse", str(tmp_path / "nope")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such directory" in proc.stderr


@slow
def test_bad_sort_filter_compare_exit_2(capsys, sweep):
    code, _, err = browse(capsys, sweep, "--sort", "peak")
    assert code == 2 and "'peak'" in err and "server_peak_heap_bytes" in err
    code, _, err = browse(capsys, sweep, "--filter", "optimize")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = browse(capsys, sweep, "--filter", "colour=red")
    assert code == 2 and "'colour'" in err and "num_clients" in err
    code, _, err = browse(capsys, sweep, "--compare", "seed")
    assert code == 2 and "'seed'" in err and "optimize, num_clients" in err
    code, _, err = browse(capsys, sweep, "--compare", "optimize", "--baseline", "maybe")
    assert code == 2 and "'maybe'" in err


def test_sweep_loader_tolerates_an_empty_sweep(tmp_path):
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - optimize=true,false\n")
    s = load_sweep(tmp_path)
    assert s.kind == "sweep" and s.jobs == [] and s.expected_jobs == 2


# ----------------------------------------------------------------------------------- HTML report
class _DOM(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.cells, self.scripts = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.links.append(a)
        elif tag == "td" and a.get("data-col"):
            self.cells.append(a)
        elif tag in ("script", "link"):
            self.scripts.append(a)


PROBE = """<script>window.addEventListener('load', () => {
  for (const img of document.images) {
    img.dataset.naturalWidth = img.naturalWidth; img.dataset.naturalHeight = img.naturalHeight;
    img.dataset.complete = img.complete; }
  document.body.dataset.probed = 'yes'; });</script></body>"""


@slow
def test_html_report_in_headless_chromium(capsys, sweep, tmp_path):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium); the report test must run in CI")
        pytest.skip("chromium is not installed: apt-get install chromium")
    code, _, err = browse(capsys, sweep, "--html", "--format", "csv")
    report = sweep / "report.html"
    assert code == 0 and report.exists(), err
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch: readable offline
    for name in ("peak_memory", "memory_over_time_0"):
        for ext in ("png", "svg"):
            assert (sweep / "report" / f"{name}.{ext}").stat().st_size > 1000
    # the DOM after load, with each image's natural size recorded by a probe next to the report
    probe = sweep / "report.probe.html"
    probe.write_text(text.replace("</body>", PROBE))
    argv = chromium_argv(browser, tmp_path / "profile")
    dump = subprocess.run(argv + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert 'data-probed="yes"' in dump.stdout, dump.stderr[-2000:]
    dom = _DOM()
    dom.feed(dump.stdout)
    assert not dom.scripts or all("src" not in s and "href" not in s for s in dom.scripts)
    charts = [i for i in dom.imgs if i.get("src", "").startswith("data:image/png")]
    assert len(charts) >= 2
    for img in charts:
        assert img["data-complete"] == "true" and int(img["data-natural-width"]) > 300 \
            and int(img["data-natural-height"]) > 150, img.get("alt")
    _charts_are_not_blank(sweep / "report")
    # the tables hold the summaries' numbers (raw in data-value, MiB in the text)
    values = {}
    for c in dom.cells:
        values.setdefault(c["data-col"], []).append(c.get("data-value"))
    for optimize in ("true", "false"):
        s = summaries(completed_job(sweep, optimize))
        assert str(s["server"]["peak_heap_bytes"]) in values["server_peak_heap_bytes"]
        assert str(max(v["peak_rss_bytes"] for k, v in s.items() if k != "server")) in \
            values["clients_peak_rss_max_bytes"]
        assert f"{s['server']['peak_heap_bytes'] / MiB:,.1f}" in dump.stdout
    assert any("num_clients" in (v or "") for v in values["notes"])  # the failed jobs' reason
    assert values["ratio"] and all(v for v in values["before"] if v)
    # every flamegraph link resolves to a file: 2 completed jobs x 3 roles, in the jobs table and details
    flame = [a["href"] for a in dom.links if a.get("class") == "flamegraph"]
    assert len(set(flame)) == 6 and len(flame) >= 12
    for href in flame:
        assert not href.startswith(("/", "http")) and (sweep / href).resolve().is_file(), href
    for a in dom.links:
        assert (sweep / a["href"]).resolve().exists(), a["href"]
    # a screenshot for people (and CI artifacts)
    shot = REPO / "test-artifacts" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    subprocess.run(argv + ["--window-size=1400,2000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    _charts_are_not_blank(shot.parent, pattern="report.png")


def _charts_are_not_blank(folder: Path, pattern: str = "*.png") -> None:
    import matplotlib.image

    for png in folder.glob(pattern):
        pixels = matplotlib.image.imread(png)
        assert pixels.std() > 0.01, f"{png} is blank"
