"""Reading output directories is safe: hostile names and values stay text in the HTML report (checked in
headless chromium) and in every terminal table, the report is never written through a symlink, files
that are no regular file are refused instead of waited on, and damaged runs are listed as damaged while
the rest is listed, compared and reported. Runs are written by tests/hostile_runs.py (no job started)."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest

from flmem.browse import cli
from flmem.browse.discover import load_job, load_sweep

from browse_fixtures import chromium_argv
from cdp import Page
from flamegraph_browser import browser_or_skip
from hostile_runs import MARKUP, capture, write_job, write_sweep  # noqa: F401 (fixture)

#: each payload sets a global (or the title) if it ever runs as script: in text, in an attribute, in a URL
SCRIPT = "<script>window.pwned_text=1</script>"
IMG = '"><img src=x onerror="window.pwned_attr=1;document.title=\'pwned\'">'
QUOTE = "' autofocus tabindex=1 onfocus='window.pwned_quote=1"
JS_DIR = "javascript:window.pwned_href=1;1"  # as a job directory: the first segment of its flamegraph links
GLOBALS = ("pwned_text", "pwned_attr", "pwned_quote", "pwned_href", "pwned_key", "pwned_site", "pwned_phase")


def browse(capsys, *args) -> tuple[int, str, str]:
    try:
        code = cli.main(["browse", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


def hostile_sweep(root: Path, capture) -> Path:
    """Two jobs (optimize=false, true) whose override key and value, directory names, failure reason,
    top allocation site, phase name and flamegraph reason carry script, attribute and URL payloads."""
    key = "k<script>Object.assign(window,{pwned_key:1})</script>" + MARKUP
    site = {"function": SCRIPT, "file": IMG, "line": 1, "bytes": 10, "allocations": 1, "flmem_caller": QUOTE}
    sweep = write_sweep(root, [[f"optimize={v}", f"{key}={IMG}{MARKUP}"] for v in ("false", "true")], capture,
                        names=[JS_DIR, f"1{IMG}"], phase="<img src=x onerror=window.pwned_phase=1>")
    for job in sweep.iterdir():
        if not job.is_dir():
            continue
        path = job / "roles" / "client_1" / "summary.json"
        data = json.loads(path.read_text())
        data.update(top_sites=[site], flamegraph_error=QUOTE + IMG)
        path.write_text(json.dumps(data))
        (job / "roles" / "client_1" / "flamegraph.html").unlink()  # its reason goes into a title attribute
        result = json.loads((job / "result.json").read_text())
        result.update(status="failed", failure={"role": "server", "reason": SCRIPT + IMG + MARKUP})
        (job / "result.json").write_text(json.dumps(result))
    return sweep


PAGE_FACTS = """(() => {
  const meta = document.querySelector('meta[http-equiv="Content-Security-Policy"]');
  const handlers = [...document.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))
      .filter(n => n.startsWith('on') || n === 'autofocus');
  return {title: document.title, csp: meta ? meta.content : null, scripts: document.scripts.length,
          handlers, globals: %s.filter(g => g in window),
          text: document.body.textContent,
          titles: [...document.querySelectorAll('[title]')].map(e => e.title),
          links: [...document.links].map(a => [a.protocol, a.getAttribute('href')]),
          imgs: [...document.images].map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)]),
          th: getComputedStyle(document.querySelector('th')).backgroundColor};
})()""" % json.dumps(list(GLOBALS))


CLICK = """(() => { const a = [...document.links].find(a => decodeURIComponent(a.getAttribute('href'))
                                                  .startsWith('javascript:'));
  a.click(); return a.getAttribute('href'); })()"""


def _open(page_path: Path, profile: Path, click: bool = False) -> tuple[dict, list[str]]:
    """The page's facts after load (PAGE_FACTS); with ``click``, then also the global and title after a
    click on the link whose decoded href starts with ``javascript:`` (it must open the flamegraph file)."""
    with Page(chromium_argv(browser_or_skip(), profile), page_path.as_uri()) as page:
        page.wait_for("document.readyState === 'complete'")  # after every image loaded or failed (and its onerror)
        facts = page.evaluate(PAGE_FACTS)
        if click:
            facts["clicked"] = page.evaluate(CLICK)
            facts["after_click"] = page.wait_for("'pwned_href' in window ? [document.title, true] : "
                                                 "document.readyState === 'complete' && "
                                                 "document.title.startsWith('flamegraph') && [document.title, false]",
                                                 timeout_s=20)
        return facts, page.errors


def _assert_nothing_ran(facts: dict, title: str) -> None:
    assert facts["globals"] == [] and facts["title"] == title, facts
    assert facts["scripts"] == 0 and facts["handlers"] == [], facts
    for payload in (SCRIPT, IMG, QUOTE, MARKUP, "<img src=x onerror=window.pwned_phase=1>"):
        assert payload in facts["text"], payload  # shown as text
    assert QUOTE + IMG in facts["titles"]  # an attribute value, whole


def test_report_shows_hostile_values_as_text_in_chromium(capsys, tmp_path, capture):
    sweep = hostile_sweep(tmp_path / "sweep", capture)
    code, _, err = browse(capsys, sweep, "--html", "--format", "json")
    assert code == 0, err
    report = sweep / "report.html"
    facts, errors = _open(report, tmp_path / "profile")
    _assert_nothing_ran(facts, "flmem sweep sweep")
    # the policy: no script, no fetch; the page's own style and its embedded charts are allowed, and work
    csp = facts["csp"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe" not in csp, csp
    assert "img-src data:" in csp and "style-src 'sha256-" in csp
    assert facts["th"] == "rgb(244, 244, 246)"  # the stylesheet applied under the policy
    charts = [i for i in facts["imgs"] if i[2].startswith("data:image/png")]
    assert len(charts) >= 2 and all(done and width > 300 for done, width, _ in charts), facts["imgs"]
    assert not [e for e in errors if "Content Security Policy" in e], errors
    # every link is a relative file link to a file there: a directory named javascript:... is a path
    assert facts["links"] and {p for p, _ in facts["links"]} == {"file:"}, facts["links"]
    flame = [h for _, h in facts["links"] if h.endswith("flamegraph.html")]
    assert any(h.startswith("javascript%3A") for h in flame), flame
    for _, href in facts["links"]:
        assert (sweep / unquote(href)).is_file(), href
    # escaping alone holds too: the same page without its policy runs nothing either
    bare = sweep / "report.nocsp.html"
    text = report.read_text()
    start = text.index('<meta http-equiv="Content-Security-Policy"')
    bare.write_text(text[:start] + text[text.index(">", start) + 1:])
    facts, _ = _open(bare, tmp_path / "profile2", click=True)
    assert facts["csp"] is None
    _assert_nothing_ran(facts, "flmem sweep sweep")
    # the link a directory named javascript:... gets opens that directory's flamegraph, and runs nothing
    assert facts["clicked"].startswith("javascript%3A") and facts["after_click"] == ["flamegraph server", False]


def test_run_report_escapes_and_keeps_links_inside(capsys, tmp_path, capture):
    run = write_job(tmp_path / JS_DIR, ["optimize=true", f"x={IMG}"], capture, phase=SCRIPT)
    result = json.loads((run / "result.json").read_text())
    result["roles"]["../../etc"] = result["roles"]["server"]  # a role name is data, never a path
    (run / "result.json").write_text(json.dumps(result))
    code, _, err = browse(capsys, run, "--html", "--format", "json")
    assert code == 0, err
    text = (run / "report.html").read_text()
    assert "<script>" not in text and "<img src=x" not in text and "&lt;script&gt;" in text
    assert 'href="roles/server/flamegraph.html"' in text and "etc" not in text.split("<body>")[1].split("problem")[0]
    assert any("role name '../../etc' not a role" in p for p in load_job(run).problems)


# ---------------------------------------------------------------------------------------------- terminal
def test_markup_in_names_and_values_prints_literally(capsys, tmp_path, capture, wide):
    key = f"key{MARKUP}"
    root = tmp_path / "outputs"
    # a directory name cannot hold '/': '[bold]' here, '[/x]' in a path below
    sweep = write_sweep(root / "multirun" / "2030[bold]", [[f"optimize={v}", f"{key}=v{v}{MARKUP}"]
                                                           for v in ("false", "true")],
                        capture, names=["0", "1[bold]"])
    for args in ([sweep], [sweep, "--compare", "optimize"], [sweep / "0"], ["--root", root], [sweep, "--html"]):
        code, out, err = browse(capsys, *args)
        assert code == 0 and "Traceback" not in err, (args, err)
        assert "2030[bold]" in out and ("--root" in args or MARKUP in out), (args, out[-2000:])
    code, out, _ = browse(capsys, sweep)
    assert f"{key}" in out and f"vtrue{MARKUP}" in out and "1[bold]" in out  # header, cell, job name
    # a deeper path: the sweep directory itself is '.../[/x]/...' (a directory cannot hold '/')
    nested = tmp_path / "a[" / "x]b"
    write_sweep(nested, [["optimize=false"], ["optimize=true"]], capture)
    code, out, err = browse(capsys, nested)
    assert code == 0 and "a[/x]b" in out, err


def test_sweep_summary_and_result_lines_print_markup_literally(capsys, tmp_path, capture):
    from flmem.callbacks import write_summary
    from flmem.report import RoleProgress, print_result
    from flmem.termtable import make_console

    sweep = write_sweep(tmp_path / "s[" / f"x]{MARKUP}", [["optimize=false", f"k{MARKUP}=1"],
                                                         ["optimize=true", f"k{MARKUP}=2"]], capture)
    data = write_summary(sweep, echo=True)  # what the sweep callback prints at the end of a sweep
    out = capsys.readouterr().out
    assert data["jobs_total"] == 2 and f"s[/x]{MARKUP}" in " ".join(out.split()), out[-2000:]
    assert f"summary: {sweep / 'summary.md'}" in out and "optimize=false" in out
    assert f"k{MARKUP}" in (sweep / "summary.md").read_text()
    # the launcher's last lines and its live progress, fed with markup from a job's files
    result = json.loads((sweep / "0" / "result.json").read_text())
    result.update(status="failed", job_dir=str(sweep / "0"), failure={"role": "server", "reason": f"bad {MARKUP}"})
    console = make_console(file=io.StringIO(), width=200)
    print_result(result, console)
    printed = console.file.getvalue()
    assert f"bad {MARKUP}" in printed and f"x]{MARKUP}" in printed
    (sweep / "0" / "roles" / "server" / "status.json").write_text(json.dumps({"phase": f"round {MARKUP}"}))
    progress = RoleProgress(make_console(file=io.StringIO(), width=200))
    progress.start_job(SimpleNamespace(rounds=1, num_clients=1, role=SimpleNamespace(name="local")))
    role = SimpleNamespace(name="server", dir=sweep / "0" / "roles" / "server", returncode=None, proc=None)
    progress.update([role])
    try:  # the phase column as the live display draws it
        drawn = progress.progress.columns[3].render(progress.progress.tasks[0]).plain
    finally:
        progress.stop()
    assert drawn == f"rounds  round {MARKUP}"


# ---------------------------------------------------------------------------------------- symlinks
def test_report_is_never_written_through_a_symlink(capsys, tmp_path, capture):
    sweep = write_sweep(tmp_path / "sweep", [["optimize=false"], ["optimize=true"]], capture)
    victim, victim_dir = tmp_path / "victim.txt", tmp_path / "victim_dir"
    victim.write_text("keep me")
    victim_dir.mkdir()
    (victim_dir / "peak_memory.png").write_text("keep me too")
    (sweep / "report.html").symlink_to(victim)
    (sweep / "report").symlink_to(victim_dir, target_is_directory=True)
    code, _, err = browse(capsys, sweep, "--html", "--format", "json")
    assert code == 0, err
    assert victim.read_text() == "keep me" and [p.name for p in victim_dir.iterdir()] == ["peak_memory.png"]
    assert (victim_dir / "peak_memory.png").read_text() == "keep me too"
    assert not (sweep / "report.html").is_symlink() and "<!DOCTYPE html>" in (sweep / "report.html").read_text()
    assert not (sweep / "report").is_symlink() and (sweep / "report" / "peak_memory.png").stat().st_size > 1000
    umask = os.umask(0)
    os.umask(umask)  # the report is as readable as anything else written here: mode from the umask, not 0700/0600
    assert stat.S_IMODE((sweep / "report").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((sweep / "report.html").stat().st_mode) == 0o666 & ~umask
    # a second report replaces the first, chart files included, and leaves no temporary file behind
    (sweep / "report" / "stale.png").write_text("old")
    code, _, err = browse(capsys, sweep, "--html", "--format", "json")
    assert code == 0 and not (sweep / "report" / "stale.png").exists(), err
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith(".")) == []
    # the run report too
    run = write_job(tmp_path / "run", ["optimize=true"], capture)
    (run / "report.html").symlink_to(victim)
    code, _, err = browse(capsys, run, "--html", "--format", "json")
    assert code == 0 and victim.read_text() == "keep me" and not (run / "report.html").is_symlink(), err


# ------------------------------------------------------------------------------ no regular file
SPECIAL = ["roles/client_0/capture.bin", "result.json", "roles/client_0/markers.json", "roles/server/summary.json",
           "roles/server/status.json", "roles/server/metrics.jsonl", ".hydra/overrides.yaml"]


def _plant(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifos_and_devices_are_refused_not_waited_on(tmp_path, capture, kind):
    """A FIFO with no writer or /dev/zero in place of any run file: each named as no regular file, and
    every view and the report finish (the subprocess timeout only guards against a hang)."""
    sweep = write_sweep(tmp_path / "sweep", [["optimize=false"], ["optimize=true"], ["optimize=true", "seed=2"]],
                        capture)
    for name in SPECIAL:
        _plant(sweep / "0" / name, kind)
    _plant(sweep / "multirun.yaml", kind)
    _plant(sweep / "1" / "roles" / "client_1" / "capture.bin", kind)
    env = dict(os.environ, COLUMNS="300")
    for args in ([sweep], [sweep, "--format", "json"], [sweep, "--compare", "optimize"], [sweep / "0"],
                 [sweep / "1", "--html"], [sweep, "--html"]):
        proc = subprocess.run([sys.executable, "-m", "flmem.browse", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
    data = json.loads(subprocess.run([sys.executable, "-m", "flmem.browse", str(sweep), "--format", "json"],
                                     capture_output=True, text=True, timeout=300, env=env).stdout)
    jobs = {j["job"]: j for j in data["jobs"]}
    assert set(jobs) == {"0", "1", "2"}
    assert jobs["0"]["status"] == "damaged" and "result.json" in jobs["0"]["notes"], jobs["0"]
    assert "not a regular file" in jobs["0"]["notes"]
    assert "client_1: capture.bin is not a regular file" in jobs["1"]["notes"]
    assert jobs["1"]["status"] == jobs["2"]["status"] == "completed"
    assert jobs["2"]["server_peak_heap_bytes"] > 0 and jobs["2"]["notes"] == ""
    job = load_job(sweep / "0")
    problems = " ".join(job.problems)
    for name in ("summary.json", "status.json", "capture.bin"):
        assert f"{name} unreadable" in problems or f"{name} is not a regular file" in problems, (name, problems)
    roles = load_job(sweep / "1").roles
    assert roles["client_1"].capture_state == "unreadable" and roles["server"].capture_state == "ok"
    assert "not a regular file" in " ".join(c for c in (sweep / "1" / "report.html").read_text().split("<li>"))


# ---------------------------------------------------------------------------------------- damaged JSON
def _damage(job: Path, how: str) -> str:
    """Damage ``job``; returns what its problems must say."""
    if how == "bad_json":
        (job / "result.json").write_text('{"status": "completed", "roles": {')
        return "result.json is not valid JSON"
    if how == "wrong_types":
        (job / "result.json").write_text(json.dumps({"status": 5, "roles": "x", "overrides": [1, {"a": 2}],
                                                     "rounds": -1, "client_rounds": [3], "started": "now"}))
        return "result.json: roles = 'x' is not an object"
    if how == "truncated_capture":
        capture = job / "roles" / "server" / "capture.bin"
        os.truncate(capture, capture.stat().st_size // 2)
        return "server: unreadable capture"
    if how == "missing_files":
        for name in ("summary.json", "capture.bin", "markers.json"):
            (job / "roles" / "client_0" / name).unlink()
        return "client_0: no capture.bin"
    if how == "huge":
        with open(job / "roles" / "server" / "summary.json", "wb") as fh:
            fh.truncate(65 * 2**20)  # sparse: no disk used
        return "more than the"
    raise AssertionError(how)


DAMAGE = ("bad_json", "wrong_types", "truncated_capture", "missing_files", "huge")


def test_damaged_runs_are_listed_as_damaged_and_the_rest_compared(capsys, tmp_path, capture, wide):
    root = tmp_path / "outputs"
    # jobs 0 and 1: a healthy pair; jobs 2..: each damaged one way
    jobs = [["optimize=false"], ["optimize=true"]] + [["optimize=true", f"seed={i}"] for i in range(len(DAMAGE))]
    sweep = write_sweep(root / "multirun" / "2030-01-01_00-00-00-000000", jobs, capture)
    expected = {str(i + 2): _damage(sweep / str(i + 2), how) for i, how in enumerate(DAMAGE)}
    code, out, err = browse(capsys, sweep, "--format", "json")
    assert code == 0, err
    rows = {r["job"]: r for r in json.loads(out)["jobs"]}
    assert set(rows) == {str(i) for i in range(len(jobs))}
    for job, why in expected.items():
        assert why in rows[job]["notes"], (job, rows[job]["notes"])
    assert rows["2"]["status"] == "damaged" and rows["3"]["status"] == "incomplete"
    assert rows["0"]["status"] == rows["1"]["status"] == "completed" and rows["0"]["notes"] == ""
    # the table, the listing, the comparison and the report all go on
    code, out, err = browse(capsys, sweep)
    assert code == 0 and "damaged" in out and "1 damaged" in out, err
    code, out, err = browse(capsys, "--root", root, "--format", "json")
    assert code == 0 and json.loads(out)["runs"][0]["jobs"] == len(jobs), err
    code, out, err = browse(capsys, sweep, "--compare", "optimize", "--format", "json")
    data = json.loads(out)
    assert code == 0 and any(r["metric"] == "peak heap" and r["before"] and r["after"] for r in data["comparison"])
    code, _, err = browse(capsys, sweep, "--html", "--format", "json")
    text = (sweep / "report.html").read_text()
    assert code == 0 and all(f'data-job="{j}"' in text for j in rows), err
    for job in expected:
        code, out, err = browse(capsys, sweep / job, "--format", "json")
        assert code == 0 and "Traceback" not in err, (job, err)


def test_an_unreadable_job_does_not_stop_the_sweep(tmp_path, capture):
    sweep = write_sweep(tmp_path / "sweep", [["optimize=false"], ["optimize=true"]], capture)
    roles = sweep / "1" / "roles"
    for role in roles.iterdir():  # roles/ whose entries are files, not directories, and a stray role name
        for f in role.iterdir():
            f.unlink()
        role.rmdir()
        role.write_text("")
    result = json.loads((sweep / "1" / "result.json").read_text())
    result["roles"] = {"/abs": {}, "..": {}, "server": []}
    (sweep / "1" / "result.json").write_text(json.dumps(result))
    loaded = load_sweep(sweep)
    assert [j.name for j in loaded.jobs] == ["0", "1"] and loaded.jobs[0].status == "completed"
    assert any("not a role" in p for p in loaded.jobs[1].problems), loaded.jobs[1].problems
    assert not any(r.dir.resolve().is_relative_to(Path("/abs")) for r in loaded.jobs[1].roles.values())


@pytest.mark.slow
def test_launcher_sweep_summary_prints_markup_in_its_directory_literally(tmp_path):
    """A real sweep (its two jobs fail config validation: no role starts) into a directory whose path holds
    rich markup: the launcher prints the summary's table and the summary line with the path as written."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "launch.py"), "-m", "optimize=true,false", "num_clients=0",
                           f"hydra.sweep.dir='out/s{MARKUP}d'"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 1, proc.stderr[-3000:]  # the jobs failed, as planned; the launcher did not crash
    assert "MarkupError" not in proc.stdout + proc.stderr and "could not summarize" not in proc.stdout
    sweep = tmp_path / "out" / f"s{MARKUP}d"
    assert f"summary: {sweep / 'summary.md'} and summary.json" in proc.stdout, proc.stdout[-3000:]
    assert f"sweep out/s{MARKUP}d: optimize=False (before) vs optimize=True (after)" in proc.stdout
    assert json.loads((sweep / "summary.json").read_text())["jobs_failed"] == 2
