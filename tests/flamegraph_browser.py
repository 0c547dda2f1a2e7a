"""A memray flamegraph as a person sees it: opened in headless chromium that cannot reach any network,
after d3-flame-graph has drawn (and finished animating) its frames."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from PIL import Image

from browse_fixtures import chromium_argv, find_chromium
from cdp import Page


def browser_or_skip() -> str:
    browser = find_chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium); the flamegraph test must run in CI")
        pytest.skip("chromium is not installed: apt-get install chromium")
    return browser


def open_offline(html: Path, profile: Path, shot: Path | None = None) -> list[tuple[str, float, str]]:
    """Open ``html`` in headless chromium whose proxy refuses everything; wait until the flame graph has
    drawn its frames; check that every request was a local file and none failed, and no script error
    occurred. Returns each frame's (name, width in px, fill colour as ``rgb(r, g, b)``); saves a
    screenshot to ``shot``."""
    argv = chromium_argv(browser_or_skip(), profile) + ["--window-size=1400,900", "--enable-logging=stderr", "--v=0"]
    page = Page(argv, html.as_uri())
    try:
        assert not page.failed, page.failed  # every script and stylesheet loads before the load event
        # d3-flame-graph animates the frames into place: wait until two looks 300 ms apart agree
        # (null after 60 s: a page that failed to load never draws any)
        frames = page.evaluate("""new Promise(done => {
            let last = null;
            setTimeout(() => done(null), 60000);
            const look = () => {
                const frames = [...document.querySelectorAll('#chart svg.d3-flame-graph g.frame')];
                const now = JSON.stringify(frames.map(g => [g.getAttribute('name'), g.getAttribute('transform'),
                                                            g.querySelector('rect').getAttribute('width'),
                                                            g.querySelector('rect').getAttribute('fill')]));
                if (frames.length && now === last) done(frames.map(g => {
                    const rect = g.querySelector('rect');
                    return [g.getAttribute('name'), +rect.getAttribute('width'), getComputedStyle(rect).fill];
                }));
                else { last = now; setTimeout(look, 300); }
            };
            look();
        })""")
        styled = page.evaluate("getComputedStyle(document.querySelector('nav.navbar')).display")
        if shot is not None:
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(shot)
        requests, failed, errors = page.requests, page.failed, page.errors
    finally:
        log = page.close()
    assert "net::ERR" not in log, log[-3000:]
    assert not failed, failed
    assert not errors, errors
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert any(u.endswith("/d3-flamegraph.min.js") for u in requests)
    assert frames, "the flame graph drew no frames"
    assert styled == "flex"  # bootstrap's stylesheet applied (unstyled, a <nav> is display: block)
    return [tuple(f) for f in frames]


def frames_are_painted(shot: Path, fills: set[str]) -> None:
    """The screenshot shows the frames: many pixels near the (non-grey) fill colours the DOM gave them
    (near: d3-flame-graph paints them slightly transparent over the page)."""
    colours = [c for c in (tuple(int(v) for v in re.findall(r"\d+", f)[:3]) for f in fills) if max(c) - min(c) > 10]
    assert colours, fills
    with Image.open(shot) as im:
        counts = im.convert("RGB").getcolors(maxcolors=1 << 22)
    painted = sum(n for n, px in counts if any(sum((a - b) ** 2 for a, b in zip(px, c)) < 25 ** 2 for c in colours))
    assert painted > 20_000, f"{painted} pixels near the frames' colours {colours} in {shot}"
