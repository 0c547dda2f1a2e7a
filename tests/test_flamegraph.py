"""Flamegraphs open offline: memray's CDN scripts and styles are packaged (with their licenses), copied
into the job directory, linked relatively, and the page draws its flame graph in a headless chromium
that cannot reach any network."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import memray
import pytest

from flmem.flamegraph_offline import (ASSETS, CDN_FILES, JOB_ASSETS, ExternalResourceError, external_resources,
                                      localize)
from flmem.profiling import render_flamegraph

from browse_fixtures import REPO
from flamegraph_browser import browser_or_skip, frames_are_painted, open_offline

MEMRAY_TEMPLATES = Path(memray.__file__).parent / "reporters" / "templates"
CAPTURE = '''
import sys
import memray

def client_update(n):
    return [bytearray(4096) for _ in range(n)]

def aggregate(size):
    return bytearray(size)

with memray.Tracker(sys.argv[1]):
    updates = [client_update(200) for _ in range(3)]
    total = aggregate(6 * 2**20)
'''
#: memray's template names a script/stylesheet like this; a regex independent of flmem's HTML parser
RESOURCE_URL = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)""", re.I)


def capture(tmp_path: Path) -> Path:
    """A real memray capture of CAPTURE, at ``<tmp>/job/roles/server/capture.bin``."""
    role_dir = tmp_path / "job" / "roles" / "server"
    role_dir.mkdir(parents=True)
    script = tmp_path / "fedavg_allocations.py"
    script.write_text(textwrap.dedent(CAPTURE))
    proc = subprocess.run([sys.executable, str(script), str(role_dir / "capture.bin")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return role_dir / "capture.bin"


# ------------------------------------------------------------------------------------ packaging
def test_every_cdn_url_in_memray_templates_has_a_packaged_copy():
    found = set()
    for template in MEMRAY_TEMPLATES.glob("*.html"):
        text = template.read_text(encoding="utf-8")
        urls = external_resources(text)
        assert set(RESOURCE_URL.findall(text)) <= set(urls), template  # the parser sees what a regex sees
        found |= set(urls)
    unknown = sorted(found - set(CDN_FILES))
    assert not unknown, (f"memray {memray.__version__}'s templates load {unknown} from the network: package them "
                         f"under {ASSETS} (see its README) and add them to CDN_FILES")
    assert len(found) >= 9  # bootstrap css+js, popper, jquery, lodash, plotly, d3, d3-scale-chromatic, d3-flame-graph


def test_packaged_files_match_the_readme_and_carry_licenses(tmp_path):
    readme = (ASSETS / "README.md").read_text()
    rows = re.findall(r"^\| ([\w.-]+) \| ([\d.]+) \| (\S+) \| [\w.-]+, `([^`]+)`(?: \(\*\))? \| ([0-9a-f]{64}) \|$",
                      readme, re.M)
    assert len(rows) == len(CDN_FILES) == 11
    assert {f"{pkg}@{ver}/{path}" for pkg, ver, path, _, _ in rows} == set(CDN_FILES.values())
    for pkg, ver, path, license_file, sha256 in rows:
        data = (ASSETS / f"{pkg}@{ver}" / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256, path
        assert len(data) > 1000 and b"sourceMappingURL=http" not in data
        assert license_file.startswith(f"{pkg}@{ver}/")
        assert re.search(r"MIT|ISC|Apache License", (ASSETS / license_file).read_text()), license_file
    for url, rel in CDN_FILES.items():
        assert url.split("/")[-1] == rel.split("/")[-1], url  # the URL's file, not a look-alike
    # each package's license travels with its file into a job directory (datatables' is License.txt)
    page = tmp_path / "table.html"
    page.write_text("".join(f'<script src="{url}"></script>' for url in CDN_FILES if "datatables" in url))
    assert len(localize(page)) == 2
    assert {p.name for p in (tmp_path / JOB_ASSETS).glob("datatables.net*/*") if p.is_file()} == \
        {"License.txt", "LICENSE"}


def test_a_wheel_carries_the_assets(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "flmem", src / "flmem", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("flmem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {p.relative_to(REPO).as_posix() for p in ASSETS.rglob("*") if p.is_file()}
    assert len(packaged) == 11 + 10 + 1 and packaged <= names, sorted(packaged - names)  # files, licenses, README


# ----------------------------------------------------------------------------------- rewriting
def test_unknown_external_resources_are_reported_and_the_html_left_alone(tmp_path):
    known = next(iter(CDN_FILES))
    page = tmp_path / "job" / "roles" / "server" / "flamegraph.html"
    page.parent.mkdir(parents=True)
    text = (f'<html><head><link rel="stylesheet" href="{known}"><script src="https://cdn.example.org/new.js">'
            '</script><style>@import "//fonts.example.org/a.css"; b{background:url(data:image/png;base64,AA)}'
            '</style></head><body><a href="https://bloomberg.github.io/memray/">docs</a>'
            '<script>const u = "https://not-fetched.example.org/";</script></body></html>')
    page.write_text(text)
    with pytest.raises(ExternalResourceError) as err:
        localize(page)
    assert err.value.urls == ["https://cdn.example.org/new.js", "//fonts.example.org/a.css"]
    assert "https://cdn.example.org/new.js" in str(err.value) and "CDN_FILES" in str(err.value)
    assert page.read_text() == text and not (tmp_path / "job" / JOB_ASSETS).exists()
    # without the unknown ones: rewritten to the job's copy; links and script strings stay
    page.write_text(text.replace('<script src="https://cdn.example.org/new.js"></script>', "")
                    .replace('@import "//fonts.example.org/a.css"; ', ""))
    links = localize(page)
    rel = CDN_FILES[known]
    assert links == {known: f"../../{JOB_ASSETS}/{rel}"}
    out = page.read_text()
    assert f'href="../../{JOB_ASSETS}/{rel}"' in out and known not in out
    assert "https://bloomberg.github.io/memray/" in out and "https://not-fetched.example.org/" in out
    copy = tmp_path / "job" / JOB_ASSETS / rel
    assert copy.read_bytes() == (ASSETS / rel).read_bytes()
    package = rel.split("/")[0]
    assert list((tmp_path / "job" / JOB_ASSETS / package).glob("LICEN[CS]E*"))
    assert (tmp_path / "job" / JOB_ASSETS / "README.md").exists()
    assert localize(page) == {}  # a second pass finds nothing left to do


def test_command_makes_a_hand_rendered_flamegraph_offline(tmp_path):
    cap = capture(tmp_path)
    hand = tmp_path / "by-hand.html"
    memray_cli = subprocess.run([sys.executable, "-m", "memray", "flamegraph", "-o", str(hand), str(cap)],
                                capture_output=True, text=True, timeout=300)
    assert memray_cli.returncode == 0 and len(RESOURCE_URL.findall(hand.read_text())) == 9, memray_cli.stderr
    missing = tmp_path / "missing.html"
    proc = subprocess.run([sys.executable, "-m", "flmem.flamegraph_offline", str(hand), str(missing)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1 and str(missing) in proc.stderr and str(hand) not in proc.stderr, proc.stderr
    text = hand.read_text()
    assert external_resources(text) == [] and f'src="{JOB_ASSETS}/d3@7.9.0/dist/d3.min.js"' in text
    assert (tmp_path / JOB_ASSETS / "d3@7.9.0" / "dist" / "d3.min.js").is_file()


# ------------------------------------------------------------------------------------- browser
def test_flamegraph_renders_offline_in_headless_chromium(tmp_path):
    browser_or_skip()
    cap = capture(tmp_path)
    html = cap.with_name("flamegraph.html")
    assert render_flamegraph(cap, html) is None
    text = html.read_text()
    assert RESOURCE_URL.findall(text) == [] and external_resources(text) == []
    assert text.count(f'="../../{JOB_ASSETS}/') == 9
    assets = tmp_path / "job" / JOB_ASSETS
    used = sorted(p.relative_to(assets).as_posix() for p in assets.rglob("*.min.[jc]s*") if p.is_file())
    assert used == sorted(v for v in CDN_FILES.values() if "datatables" not in v)  # the flamegraph's 9 files
    plotly = assets / "plotly.js@2.11.1/dist/plotly.min.js"
    if plotly.stat().st_dev == (ASSETS / "plotly.js@2.11.1").stat().st_dev:
        assert plotly.stat().st_nlink >= 2  # hard-linked from the package: no 3.5 MB copy per job
    # the job directory moved elsewhere still opens: every link is relative
    moved = tmp_path / "archive" / "job-moved"
    moved.parent.mkdir()
    (tmp_path / "job").rename(moved)
    shot = REPO / "test-artifacts" / "flamegraph-offline.png"
    shot.unlink(missing_ok=True)
    frames = open_offline(moved / "roles" / "server" / "flamegraph.html", tmp_path / "profile", shot)
    width = {}
    for name, px, _ in frames:  # memray names a frame by its source line; a line can appear at two depths
        width[name.strip()] = max(px, width.get(name.strip(), 0))
    assert width["<root>"] > 1000
    for line in ("return [bytearray(4096) for _ in range(n)]", "updates = [client_update(200) for _ in range(3)]",
                 "return bytearray(size)", "total = aggregate(6 * 2**20)"):
        assert line in width, (line, sorted(width))
    # width is bytes held at the peak: 6 MiB in aggregate against 600 x 4 KiB in client_update (+ overheads)
    ratio = width["return bytearray(size)"] / width["return [bytearray(4096) for _ in range(n)]"]
    assert 0.9 * 6 * 2**20 / (600 * 4096) < ratio < 1.1 * 6 * 2**20 / (600 * 4096), ratio
    assert abs(width["return bytearray(size)"] + width["updates = [client_update(200) for _ in range(3)]"]
               - width["<root>"]) < 3
    assert shot.stat().st_size > 20_000
    frames_are_painted(shot, {fill for _, _, fill in frames})
