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

from browse_fixtures import (REPO, add_phases, chromium_argv, completed_job, copy_job,  # noqa: F401 (fixtures)
                             damaged_run, find_chromium, make_sweep, outputs, strip_phases, sweep, sweep_log,
                             unfinished_runs)

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
    # the DOM after load, with each image's natural size recorded by a probe next to the report (the probe is
    # a script, which the report's policy forbids: the copy goes without it; tests/test_browse_hostile.py
    # checks that the report renders under its policy)
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="[^"]*">', text)
    assert csp and "default-src &#x27;none&#x27;" in csp.group(0)
    probe = sweep / "report.probe.html"
    probe.write_text(text.replace(csp.group(0), "").replace("</body>", PROBE))
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


# ------------------------------------------------------------------------------ phases and stages
def _by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


@slow
def test_run_view_per_phase_and_stage_rows(capsys, sweep, tmp_path):
    job = copy_job(completed_job(sweep, "true"), tmp_path / "run")
    written = add_phases(job)
    data = browse_json(capsys, job)
    rows = _by(data["phases"], "role", "phase")
    assert {r for r, _ in rows} == {"server", "client_0", "client_1"}
    for role, numbers in written.items():
        for p in numbers["phases"]:
            row = rows[(role, p["phase"])]
            assert (row["stage"], row["count"], row["seconds"]) == (p["stage"], p["count"], p["seconds"])
            assert (row["peak_heap_bytes"], row["peak_rss_bytes"]) == (p["peak_heap_bytes"], p["peak_rss_bytes"])
            assert row["peaks"] == "sampled every 10 ms" and row["level"] == "phase"
        fl = rows[(role, "FL stage")]
        assert (fl["level"], fl["stage"]) == ("stage", "fl")
        assert fl["peak_heap_bytes"] == numbers["fl_peak_heap_bytes"]
        assert fl["start_heap_bytes"] == numbers["fl_start_heap_bytes"]
        assert fl["adds_bytes"] == numbers["fl_working_heap_bytes"] == fl["peak_heap_bytes"] - fl["start_heap_bytes"]
        assert fl["adds_in_M"] == pytest.approx(numbers["fl_working_heap_in_M"])
        assert fl["count"] == sum(p["count"] for p in numbers["phases"] if p["stage"] == "fl")
        assert rows[(role, "setup stage")]["peak_heap_bytes"] == numbers["setup_peak_heap_bytes"]
    # phases in first-occurrence order per role, the role's stage rows after them
    assert [r["phase"] for r in data["phases"] if r["role"] == "client_0"] == \
        ["model", "data", "connect", "fetch", "train", "push", "setup stage", "FL stage"]
    roles = _by(data["roles"], "role")
    for role, numbers in written.items():
        assert roles[(role,)]["fl_working_heap_bytes"] == numbers["fl_working_heap_bytes"]
        assert roles[(role,)]["fl_working_heap_in_M"] == pytest.approx(numbers["fl_working_heap_in_M"])
        assert roles[(role,)]["working_rss_bytes"] == numbers["working_rss_bytes"]
    assert any("server, client_0, client_1: per-phase peaks sampled every 10 ms" in n for n in data["notes"])
    code, out, _ = browse(capsys, job)
    assert code == 0 and "per phase" in out and "FL stage" in out and "serve final" in out
    assert f"{written['client_0']['fl_working_heap_bytes'] / MiB:,.1f}" in out
    # an exact capture says so, per phase and in the notes
    summary_path = job / "roles" / "server" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["phase_peaks"] = "exact"
    summary["phases"][0]["exact"] = True
    summary_path.write_text(json.dumps(summary))
    data = browse_json(capsys, job)
    rows = _by(data["phases"], "role", "phase")
    assert rows[("server", "model")]["peaks"] == "exact" and rows[("server", "data")]["peaks"].startswith("sampled")
    assert any(n.startswith("server: per-phase peak heap exact") for n in data["notes"])


@slow
def test_runs_without_phases_still_display(capsys, sweep, tmp_path):
    job = strip_phases(copy_job(completed_job(sweep, "true"), tmp_path / "old"))
    data = browse_json(capsys, job)
    assert data["phases"] == [] and all(r["fl_working_heap_bytes"] is None for r in data["roles"])
    assert any("no per-phase numbers" in n for n in data["notes"])
    code, out, _ = browse(capsys, job)
    assert code == 0 and "FL working" in out
    # hostile phase records are skipped, never raised on
    summary_path = job / "roles" / "server" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["phases"] = ["x", {"phase": 3}, {"phase": "train", "peak_heap_bytes": "lots", "count": float("nan")}]
    summary["fl_working_heap_bytes"] = "many"
    summary_path.write_text(json.dumps(summary))
    markers_path = job / "roles" / "server" / "markers.json"
    markers = json.loads(markers_path.read_text())
    markers["phases"] = [1, {"phase": "train", "start_ms": "soon", "end_ms": 2}, {"phase": "x", "start_ms": 5}]
    markers_path.write_text(json.dumps(markers))
    rows = browse_json(capsys, job)["phases"]
    assert [(r["phase"], r["peak_heap_bytes"], r["count"]) for r in rows] == [("train", None, None)]
    from flmem.browse.charts import memory_over_time_chart

    chart = memory_over_time_chart("old", "old run", [("old", load_job(job))], tmp_path / "charts")
    assert "3 malformed phase marks" in " ".join(chart.notes) and "no bands" in " ".join(chart.notes)
    assert chart.png.stat().st_size > 1000


def _phase_sweep(sweep: Path, root: Path, extra: dict[str, list[int]]) -> tuple[Path, dict]:
    """A sweep at ``root``: for optimize in false/true, one job per entry of ``extra[optimize]``
    (repeat=0,1,.. when there are several), each with phases whose FL peaks are that many MiB higher."""
    jobs, written = [], {}
    for optimize, extras in extra.items():
        for r, _ in enumerate(extras):
            jobs.append((completed_job(sweep, optimize), {"repeat": str(r)} if len(extras) > 1 else {}))
    task = ["optimize=true,false"] + ([f"repeat={','.join(map(str, range(len(next(iter(extra.values()))))))}"]
                                      if len(next(iter(extra.values()))) > 1 else [])
    make_sweep(root, jobs, task)
    i = 0
    for optimize, extras in extra.items():
        for e in extras:
            written[(optimize, i)] = add_phases(root / str(i), fl_extra=e * MiB)
            i += 1
    return root, written


@slow
def test_compare_fl_stage_and_per_phase(capsys, sweep, tmp_path):
    root, written = _phase_sweep(sweep, tmp_path / "sw", {"false": [6], "true": [0]})
    before, after = written[("false", 0)], written[("true", 1)]
    data = browse_json(capsys, root, "--compare", "optimize")
    rows = _by(data["comparison"], "role", "metric")
    for metric, key in (("FL peak heap", "fl_peak_heap_bytes"), ("FL working memory", "fl_working_heap_bytes"),
                        ("setup peak heap", "setup_peak_heap_bytes"), ("working RSS", "working_rss_bytes")):
        r = rows[("server", metric)]
        assert (r["before"], r["after"]) == (before["server"][key], after["server"][key])
        assert r["diff"] == after["server"][key] - before["server"][key]
        assert r["ratio"] == pytest.approx(after["server"][key] / before["server"][key])
        assert r["phase"] is None and r["n"] == 1
        c = rows[("clients (max)", metric)]
        assert c["after"] == max(after[k][key] for k in after if k.startswith("client"))
    over = _by([r for r in data["phases"] if r["metric"] == "over FL start"], "role", "phase")
    phases = _by([r for r in data["phases"] if r["metric"] == "peak heap"], "role", "phase")
    assert ("server", "train") not in phases and ("clients (max)", "aggregate") not in phases

    def side(written_job, role, phase, over_start=False):
        return max(p["peak_heap_bytes"] - (s["fl_start_heap_bytes"] if over_start else 0)
                   for k, s in written_job.items() if (k == "server") == (role == "server")
                   for p in s["phases"] if p["phase"] == phase)
    for (role, phase), r in phases.items():
        b, a = side(before, role, phase), side(after, role, phase)
        assert (r["metric"], r["before"], r["after"], r["diff"]) == ("peak heap", b, a, a - b), (role, phase)
        assert r["ratio"] == pytest.approx(a / b) and r["stage"] == next(
            p["stage"] for p in before["server"]["phases"] + before["client_0"]["phases"] if p["phase"] == phase)
        # FL phases also compare what they add over the heap when FL began (model and data held)
        assert ((role, phase) in over) == (r["stage"] == "fl"), (role, phase)
        if r["stage"] == "fl":
            o = over[(role, phase)]
            assert (o["before"], o["after"]) == (side(before, role, phase, True), side(after, role, phase, True))
    # FL phases of the before job are 6 MiB higher on top of the jobs' own difference; setup phases equal theirs
    train = phases[("clients (max)", "train")]
    assert train["before"] == max(before[c]["fl_peak_heap_bytes"] for c in ("client_0", "client_1"))
    assert any(n.startswith("setup, FL and per-phase peaks: sampled every 10 ms") for n in data["notes"])
    # --filter phase=...: only that phase's rows; whole-run rows have no phase
    data = browse_json(capsys, root, "--compare", "optimize", "--filter", "phase=train")
    assert data["comparison"] == [] and [(r["phase"], r["metric"]) for r in data["phases"]] == [
        ("train", "peak heap"), ("train", "over FL start")]
    data = browse_json(capsys, root, "--compare", "optimize", "--filter", "role=server", "--filter", "phase=-")
    assert {r["metric"] for r in data["comparison"]} >= {"FL peak heap", "setup peak heap"} and data["phases"] == []
    # csv: the comparison rows, then the per-phase rows, raw bytes
    code, out, _ = browse(capsys, root, "--compare", "optimize", "--format", "csv")
    csv_rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {"phase", "before_min", "after_max", "n"} <= set(csv_rows[0])
    train_csv = next(r for r in csv_rows if r["phase"] == "train")
    assert int(train_csv["before"]) == train["before"] and train_csv["n"] == "1"
    code, out, _ = browse(capsys, root, "--compare", "optimize")
    assert code == 0 and "FL working memory" in out and "per phase" in out and "serve final" in out
    # the sweep view: FL working memory for scripts to sort by
    jobs = browse_json(capsys, root, "--sort=-server_fl_working_bytes")["jobs"]
    assert [j["server_fl_working_bytes"] for j in jobs] == sorted(
        [before["server"]["fl_working_heap_bytes"], after["server"]["fl_working_heap_bytes"]], reverse=True)
    assert jobs[0]["clients_fl_working_max_bytes"] == max(
        written[k][c]["fl_working_heap_bytes"] for k in written if k[1] == int(jobs[0]["job"])
        for c in ("client_0", "client_1"))
    code, out, _ = browse(capsys, root, "--format", "csv")
    assert "server_fl_working_bytes" in out.splitlines()[0] and "clients_fl_working_max_bytes" in out.splitlines()[0]


@slow
def test_compare_medians_and_ranges_over_repeats(capsys, sweep, tmp_path):
    # before: FL peaks +0, +40, +20 MiB over three repeats (spread 40 MiB); after: +20 MiB each time
    root, written = _phase_sweep(sweep, tmp_path / "sw", {"false": [0, 40, 20], "true": [20, 20, 20]})
    data = browse_json(capsys, root, "--compare", "optimize")
    assert data["repeat_key"] == "repeat" and len(data["pairs"]) == 1
    assert data["pairs"][0]["before_jobs"] == ["0", "1", "2"] and data["pairs"][0]["after_jobs"] == ["3", "4", "5"]
    rows = _by(data["comparison"], "role", "metric")
    r = rows[("server", "FL peak heap")]
    befores = sorted(written[("false", i)]["server"]["fl_peak_heap_bytes"] for i in range(3))
    afters = sorted(written[("true", i)]["server"]["fl_peak_heap_bytes"] for i in range(3, 6))
    assert (r["before"], r["before_min"], r["before_max"]) == (befores[1], befores[0], befores[2])
    assert (r["after"], r["after_min"], r["after_max"]) == (afters[1], afters[0], afters[2])
    assert (r["n"], r["n_before"], r["n_after"]) == (3, 3, 3)
    # the spread across repeats (40 MiB) is the measured noise: a difference of a few MiB is within it
    assert r["noise"] == befores[2] - befores[0] == 40 * MiB
    assert r["within_noise"] is True and abs(r["diff"]) < 40 * MiB
    phase = _by(data["phases"], "role", "phase")[("server", "aggregate")]
    assert phase["n"] == 3 and phase["noise"] >= 40 * MiB and phase["within_noise"] is True
    setup = rows[("server", "setup peak heap")]  # same in every repeat: no spread, not within a 40 MiB noise
    assert setup["before_min"] == setup["before_max"] and setup["noise"] < 5 * MiB
    # people see the median, the range and n
    code, out, _ = browse(capsys, root, "--compare", "optimize", "--filter", "metric=FL peak heap",
                          "--filter", "role=server")
    assert code == 0
    text = " ".join(out.split())
    assert f"{befores[1] / MiB:,.1f} ({befores[0] / MiB:,.1f}-{befores[2] / MiB:,.1f}, n=3)" in text
    assert "medians over repeat" in text
    # comparing repeat itself: plain pairs, no medians
    data = browse_json(capsys, root, "--compare", "repeat", "--filter", "role=server")
    assert data["repeat_key"] is None and all(r["n"] in (0, 1) for r in data["comparison"])
    # the sweep summary written by the Hydra callback carries the medians too
    from flmem.callbacks import write_summary

    summary = write_summary(root)
    row = next(x for x in summary["comparison"]["rows"] if (x["role"], x["metric"]) == ("server", "FL peak heap"))
    assert (row["before"], row["before_min"], row["before_max"], row["n"]) == (befores[1], befores[0], befores[2], 3)
    assert summary["comparison"]["phase_rows"] and summary["comparison"]["repeat_key"] == "repeat"
    md = (root / "summary.md").read_text()
    assert f"({befores[0] / MiB:,.1f}-{befores[2] / MiB:,.1f}, n=3)" in md and "per phase" in md


@slow
def test_phase_bands_and_per_phase_tables_in_the_report(sweep, tmp_path):
    from flmem.browse.charts import memory_over_time_chart
    from flmem.browse.html import write_run_report, write_sweep_report

    job_dir = copy_job(completed_job(sweep, "true"), tmp_path / "run")
    add_phases(job_dir)
    summary_path = job_dir / "roles" / "client_0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["phases"][0]["phase"] = "<b>evil</b> & $x$"
    summary_path.write_text(json.dumps(summary))
    markers_path = job_dir / "roles" / "client_0" / "markers.json"
    markers = json.loads(markers_path.read_text())
    markers["phases"][0]["phase"] = "<b>evil</b> & $x$"
    markers_path.write_text(json.dumps(markers))
    job = load_job(job_dir)
    chart = memory_over_time_chart("bands", "with phases", [("optimize=True", job)], tmp_path / "charts")
    svg = chart.svg.read_text()
    for name in ("model", "connect", "receive", "aggregate", "serve final", "save", "fetch", "train", "push",
                 "phases"):
        assert f">{name}<" in svg, name
    assert "&lt;b&gt;evil&lt;/b&gt; &amp;" in svg and not chart.notes
    report = write_run_report(job).read_text()
    assert 'data-section="phases"' in report and "FL stage" in report and "serve final" in report
    assert "&lt;b&gt;evil&lt;/b&gt; &amp;amp;" not in report and "&lt;b&gt;evil&lt;/b&gt; &amp; $x$" in report
    assert "<b>evil" not in report
    # a job without phases still renders, without bands
    old = strip_phases(copy_job(completed_job(sweep, "false"), tmp_path / "old"))
    chart = memory_over_time_chart("plain", "without phases", [("old", load_job(old))], tmp_path / "charts")
    assert ">serve final<" not in chart.svg.read_text() and "no bands" in " ".join(chart.notes)
    assert 'data-section="phases"' in write_run_report(load_job(old)).read_text()
    # a sweep report: the per-phase comparison table and the overlaid charts with both sides' bands
    root, _ = _phase_sweep(sweep, tmp_path / "sw", {"false": [6], "true": [0]})
    text = write_sweep_report(load_sweep(root), "optimize").read_text()
    assert text.count('data-section="phases"') == 3  # the comparison's and each job's
    svg = (root / "report" / "memory_over_time_0.svg").read_text()
    assert ">train<" in svg and "bottom: optimize=False" in svg


# ------------------------------------------------------------------ valid JSON, wrong shape
def _set(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def _pair_sweep(sweep: Path, root: Path) -> Path:
    """optimize=false (job 0) and optimize=true (job 1), copies of the fixture's completed jobs."""
    return make_sweep(root, [(completed_job(sweep, "false"), {}), (completed_job(sweep, "true"), {})],
                      ["optimize=true,false"])


WRONG_SHAPES = {  # damage to job 0 -> what its problem note must name
    "summary_list": (lambda j: (j / "roles/server/summary.json").write_text("[1,2]"),
                     "server: summary.json is not a JSON object but list"),
    "summary_str_peak": (lambda j: _set(j / "roles/server/summary.json", "peak_heap_bytes", "lots"),
                         "summary.json: peak_heap_bytes = 'lots' is not a number"),
    "top_sites_str_bytes": (lambda j: _set(j / "roles/server/summary.json", "top_sites",
                                           [{"function": "f", "file": "x.py", "line": 1, "bytes": "y"}]),
                            "summary.json: top_sites[0].bytes = 'y' is not a number"),
    "result_list": (lambda j: (j / "result.json").write_text("[1]"), "result.json is not a JSON object but list"),
    "result_roles_list": (lambda j: _set(j / "result.json", "roles", [1]), "result.json: roles = [1] is not an object"),
    "result_rounds_junk": (lambda j: _set(j / "result.json", "rounds", [1, "a", {"test_accuracy": "hi"}]),
                           "result.json: rounds: 2 entries not an object"),
}


@slow
@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_wrong_shape_files_are_named_not_crashed_on(capsys, sweep, tmp_path, case):
    damage, problem = WRONG_SHAPES[case]
    root = _pair_sweep(sweep, tmp_path / "sw")
    damage(root / "0")
    for args in ([root], [root / "0"], [root, "--compare", "optimize"], [root, "--html"], [root / "0", "--html"]):
        code, out, err = browse(capsys, *args, "--format", "json") if "--html" not in args else \
            browse(capsys, *args)
        assert code == 0 and "Traceback" not in err, (args, err)
    job = load_job(root / "0")
    assert any(problem in p for p in job.problems), job.problems
    # views never see a wrong type: every number read from the summaries is a number or None
    for role in job.roles.values():
        assert role.get("peak_heap_bytes") is None or isinstance(role.get("peak_heap_bytes"), int)
        assert all(isinstance(s.get("bytes"), (int, type(None))) for s in role.get("top_sites") or [])
    assert all(isinstance(r, dict) for r in job.rounds)
    assert job.final_accuracy is None or isinstance(job.final_accuracy, float)
    # the problem is named in the sweep view, the job view and their json
    data = browse_json(capsys, root)
    assert any(problem in (j["notes"] or "") for j in data["jobs"] if j["job"] == "0"), data["jobs"]
    data = browse_json(capsys, root / "0")
    assert any(problem in p for p in data["problems"]), data["problems"]
    os.environ["COLUMNS"] = "250"
    try:
        code, out, _ = browse(capsys, root / "0")
    finally:
        del os.environ["COLUMNS"]
    assert code == 0 and problem in " ".join(out.split())
    # --compare names the damaged job's problem too
    code, out, _ = browse(capsys, root, "--compare", "optimize", "--format", "json")
    assert code == 0 and problem in out


def _fail(job_dir: Path) -> None:
    data = json.loads((job_dir / "result.json").read_text())
    data.update(status="failed", failure={"role": "launcher", "reason": "config validation failed"}, duration_s=0.077)
    (job_dir / "result.json").write_text(json.dumps(data))


@slow
def test_failed_jobs_give_no_run_time_and_n_counts_paired_repeats(capsys, sweep, tmp_path):
    # a plain pair whose before job failed: no run time or accuracy compared, whatever the job recorded
    root = _pair_sweep(sweep, tmp_path / "pair")
    _fail(root / "0")
    rows = _by(browse_json(capsys, root, "--compare", "optimize")["comparison"], "role", "metric")
    for metric in ("run time", "final accuracy"):
        r = rows[("job", metric)]
        assert r["before"] is None and r["after"] is not None and r["ratio"] is None and r["diff"] is None
    # repeats: before has a run time only in repeat 1, after only in repeat 0: n = 0, and the note says why
    root, _ = _phase_sweep(sweep, tmp_path / "rep", {"false": [0, 0], "true": [0, 0]})
    _fail(root / "0")  # optimize=false, repeat=0
    _fail(root / "3")  # optimize=true, repeat=1
    rows = _by(browse_json(capsys, root, "--compare", "optimize")["comparison"], "role", "metric")
    r = rows[("job", "run time")]
    assert (r["n"], r["n_before"], r["n_after"]) == (0, 1, 1)
    assert "before from repeat 1, after from repeat 0: medians of different repeats" in r["note"]


@slow
def test_setup_rss_not_profiled_units_legend_and_unknown_filter_value(capsys, sweep, tmp_path):
    root, _ = _phase_sweep(sweep, tmp_path / "sw", {"false": [0], "true": [0]})
    rows = browse_json(capsys, root / "0")["phases"]
    for role in {r["role"] for r in rows}:
        setup = [r["peak_rss_bytes"] for r in rows if r["role"] == role and r["stage"] == "setup"
                 and r["level"] == "phase" and r["peak_rss_bytes"] is not None]
        stage = next(r for r in rows if r["role"] == role and r["phase"] == "setup stage")
        assert setup and stage["peak_rss_bytes"] == max(setup)
    # profiling.enabled=false: no capture, so per-phase peaks are "not profiled", not "sampled"
    for path in (root / "0").glob("roles/*/summary.json"):
        _set(path, "phase_peaks", None)
        _set(path, "capture_error", "no capture file (profiling.enabled=false, or the role never started)")
        (path.parent / "capture.bin").unlink()
    data = browse_json(capsys, root / "0")
    assert {r["peaks"] for r in data["phases"]} == {"not profiled (profiling.enabled=false)"}
    assert not any("no snapshot fell inside" in n or "sampled" in n for n in data["notes"])
    assert any("per-phase peaks not profiled (profiling.enabled=false)" in n for n in data["notes"])
    # the run-time noise has its unit; markdown has no colours, so its legend names none
    same = make_sweep(tmp_path / "same", [(completed_job(sweep, "false"), {"optimize": "False"}),
                                          (completed_job(sweep, "false"), {"optimize": "True"})],
                      ["optimize=true,false"])
    rows = _by(browse_json(capsys, same, "--compare", "optimize")["comparison"], "role", "metric")
    run_time = rows[("job", "run time")]
    assert re.search(r"within noise \(±[0-9.]+ s\)", run_time["note"]), run_time["note"]
    code, out, _ = browse(capsys, same, "--compare", "optimize", "--format", "markdown")
    assert code == 0 and not re.search(r"\b(green|red|dim)\b", out) and "ratio below 1x" in out
    # a filter value no row has exits 2 and names the values there are, like an unknown key
    code, _, err = browse(capsys, same, "--compare", "optimize", "--filter", "phase=nosuch")
    assert code == 2 and "phase='nosuch'" in err and "train" in err
    code, _, err = browse(capsys, same, "--filter", "status=failed")
    assert code == 2 and "completed" in err


def _render(view, width: int) -> str:
    from rich.console import Console

    from flmem.browse.render import emit

    console = Console(width=width, record=True, file=io.StringIO())
    emit(view, "table", console)
    return " ".join(console.export_text().split())


@slow
@pytest.mark.parametrize("width", [80, 100])
def test_narrow_terminals_keep_before_after_ratio_and_memory(sweep, tmp_path, width):
    from flmem.browse.compare import compare
    from flmem.browse.views import compare_view, run_view

    root, _ = _phase_sweep(sweep, tmp_path / "sw", {"false": [0, 40], "true": [20, 20]})
    loaded = load_sweep(root)
    text = _render(compare_view(loaded, compare(loaded, "optimize", None, 0.01)), width)
    shown = re.findall(r"not shown, to fit \d+ columns: (.*?) \(a wider terminal", text)
    # the comparison keeps before, after and ratio; the per-phase table, where the row also needs its phase
    # and metric to be read, keeps before and after at least (at 80 columns not all of them fit)
    assert shown and all(k not in shown[0].split(", ") for k in ("before", "after", "metric"))
    if width == 100:
        assert "ratio" not in shown[0].split(", ")
    assert all(k not in part.split(", ") for part in shown for k in ("before", "after"))
    if width == 100:
        assert "┃ ratio ┃" in text.replace("  ", " ") or " ratio ┃" in text
    assert "the same in every row: pair: all" in text  # constant columns go first, with their value
    if width == 100:
        assert "diff" not in shown[0].split(", ")  # the comparison; the per-phase table also keeps phase and metric
    text = _render(run_view(load_job(root / "0")), width)
    shown = [n for part in re.findall(r"not shown, to fit \d+ columns: (.*?) \(a wider terminal", text)
             for n in part.split(", ")]
    assert "FL working MiB" not in shown and "peak RSS MiB" not in shown
    if width == 80:
        assert "count" in shown and "stage" in shown
    assert "peaks: sampled every" in text  # the exactness column, the same in every row, keeps its value


def test_fifos_and_huge_files_in_a_run_are_refused_not_waited_on(sweep, tmp_path):
    """A FIFO would block a reader forever and a huge file would fill memory: both are named as problems,
    and every view finishes, within a bound, with the rest of the run shown."""
    job = copy_job(completed_job(sweep, "true"), tmp_path / "job")
    for name in ("summary.json", "status.json", "capture.bin"):
        (job / "roles" / "client_0" / name).unlink()
        os.mkfifo(job / "roles" / "client_0" / name)
    (job / "roles" / "server" / "metrics.jsonl").unlink()
    os.mkfifo(job / "roles" / "server" / "metrics.jsonl")
    with open(job / "roles" / "client_1" / "summary.json", "wb") as fh:  # sparse: 65 MiB on paper, no disk
        fh.truncate(65 * 2**20)
    for args in ([], ["--format", "json"], ["--html"]):
        proc = subprocess.run([sys.executable, "-m", "flmem.browse", str(job), *args], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    data = json.loads(subprocess.run([sys.executable, "-m", "flmem.browse", str(job), "--format", "json"],
                                     capture_output=True, text=True, timeout=120).stdout)
    problems = " ".join(data["problems"])
    assert "client_0: capture.bin is not a regular file" in problems
    assert "not a regular file" in problems and "more than the" in problems  # summary.json, both kinds named
    server = next(r for r in data["roles"] if r["role"] == "server")
    assert server["peak_heap_bytes"] > 0  # the rest of the run is still shown
