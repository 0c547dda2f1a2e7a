"""Make memray's flamegraph HTML open without network access.

``memray flamegraph`` (1.20) writes HTML whose scripts and stylesheet come from CDNs (jquery,
bootstrap, popper.js, lodash, plotly.js, d3, d3-scale-chromatic, d3-flame-graph). flmem packages
those exact files (``flmem/flamegraph_assets/<package>@<version>/<path>``, with their licenses;
see the README there), copies the ones a flamegraph uses into ``<job dir>/flamegraph-assets/``
(hard links where the file system allows, copies otherwise), and rewrites each CDN URL into a
relative link (``../../flamegraph-assets/...`` from ``<job dir>/roles/<role>/flamegraph.html``),
so a job directory can be moved or archived and its flamegraphs still open offline.

The rewrite is checked against ``CDN_FILES``: a script, stylesheet or other auto-loaded resource
with an external URL that flmem has no copy of (a new memray template) is reported by name.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

ASSETS = Path(__file__).with_name("flamegraph_assets")
JOB_ASSETS = "flamegraph-assets"
_JSDELIVR = "https://cdn.jsdelivr.net/npm/"
#: Every CDN URL in memray's report templates -> its copy under ASSETS (``<package>@<version>/<path>``).
CDN_FILES = {
    **{_JSDELIVR + path: path for path in (
        "bootstrap@4.6.0/dist/css/bootstrap.min.css",
        "bootstrap@4.6.0/dist/js/bootstrap.min.js",
        "popper.js@1.16.1/dist/umd/popper.min.js",
        "jquery@3.6.0/dist/jquery.min.js",
        "lodash@4.17.21/lodash.min.js",
        "plotly.js@2.11.1/dist/plotly.min.js",
        "d3@7.9.0/dist/d3.min.js",
        "d3-scale-chromatic@3.1.0/dist/d3-scale-chromatic.min.js",
        "d3-flame-graph@4.1.3/dist/d3-flamegraph.min.js")},
    # memray's table report; npm packages datatables.net and datatables.net-bs4
    "https://cdn.datatables.net/1.10.23/js/jquery.dataTables.min.js": "datatables.net@1.10.23/js/jquery.dataTables.min.js",
    "https://cdn.datatables.net/1.10.23/js/dataTables.bootstrap4.min.js":
        "datatables.net-bs4@1.10.23/js/dataTables.bootstrap4.min.js",
}
#: Attributes a browser fetches on its own while loading a page (``<a href>`` is only followed on a click).
_FETCHED = {"script": ("src",), "link": ("href",), "img": ("src", "srcset"), "iframe": ("src",),
            "frame": ("src",), "embed": ("src",), "object": ("data",), "source": ("src", "srcset"),
            "video": ("src", "poster"), "audio": ("src",), "track": ("src",), "input": ("src",),
            "base": ("href",)}
_EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, ws://, //host (not data:)
_CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)["']?\s*((?:[a-z][a-z0-9+.-]*:)?//[^"')\s;]+)""", re.I)


class ExternalResourceError(RuntimeError):
    """The HTML still loads resources from the network; ``urls`` names each of them."""

    def __init__(self, html: Path, urls: list[str]):
        self.urls = urls
        super().__init__(f"{html} still loads {len(urls)} resource(s) from the network, with no local copy in "
                         f"{ASSETS}: {', '.join(urls)}. Add each (npm pack NAME@VERSION) there and to CDN_FILES "
                         f"in {__name__}")


class _Resources(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and name in _FETCHED.get(tag, ()):
                candidates = [c.split()[0] for c in value.split(",") if c.strip()] if name == "srcset" else [value]
                self.urls += [c.strip() for c in candidates if _EXTERNAL.match(c)]
            elif value and name == "style":
                self.urls += _CSS_URL.findall(value)
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.urls += _CSS_URL.findall(data)


def external_resources(text: str) -> list[str]:
    """Each external URL (http(s)://, //host, ...) that ``text`` (an HTML page) makes a browser fetch
    on load: script/link/img/iframe/... sources and CSS ``url()``/``@import``, in order, duplicates kept.
    Scripts' code is not searched: URLs built at run time show up only in a browser."""
    parser = _Resources()
    parser.feed(text)
    parser.close()
    return parser.urls


def job_dir_of(html: Path) -> Path:
    """``<job>`` for ``<job>/roles/<role>/flamegraph.html``; the HTML's own folder otherwise."""
    return html.parents[2] if html.parent.parent.name == "roles" else html.parent


def _install(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically (roles render in parallel threads): hard link, else copy."""
    if dst.exists() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or protected_hardlinks for a package owned by another user
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def localize(html: Path, assets_dir: Path | None = None) -> dict[str, str]:
    """Rewrite ``html`` in place so that every CDN URL in ``CDN_FILES`` points at a copy in ``assets_dir``
    (default ``<job dir>/flamegraph-assets``), installing those files there with their packages'
    licenses and README. Returns {CDN URL: relative link written}.

    Raises ExternalResourceError (HTML left unchanged) when a resource with an external URL has no
    local copy, UnicodeDecodeError when ``html`` is not UTF-8, OSError when a file cannot be written.
    """
    html = Path(html)
    assets_dir = Path(assets_dir) if assets_dir is not None else job_dir_of(html) / JOB_ASSETS
    text = html.read_text(encoding="utf-8")
    found = list(dict.fromkeys(external_resources(text)))
    unknown = [u for u in found if u not in CDN_FILES]
    if unknown:
        raise ExternalResourceError(html, unknown)
    links = {}
    for url in found:
        rel = CDN_FILES[url]
        package = rel.split("/", 1)[0]
        licenses = [p for p in (ASSETS / package).iterdir() if p.name.lower().startswith(("license", "licence"))]
        for src in [ASSETS / rel, *licenses, ASSETS / "README.md"]:
            _install(src, assets_dir / src.relative_to(ASSETS))
        links[url] = quote(Path(os.path.relpath(assets_dir / rel, html.parent)).as_posix(), safe="/@")
        # only inside src=/href= attributes: a URL quoted in a script's code stays as it is
        text = re.sub(r"""(\b(?:src|href)\s*=\s*)(["']?)""" + re.escape(url) + r"\2",
                      lambda m, link=links[url]: f"{m.group(1)}{m.group(2)}{link}{m.group(2)}", text)
    left = external_resources(text)
    if left:  # e.g. the same URL in a srcset or CSS url(): not a form memray writes
        raise ExternalResourceError(html, left)
    tmp = html.with_name(f".{html.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, html)
    return links


def localize_flamegraph(html: Path) -> str | None:
    """``localize(html)``, for a flamegraph just rendered: None when it now opens offline, else why not
    (the HTML is kept as memray wrote it, readable online)."""
    try:
        localize(html)
    except ExternalResourceError as exc:
        return str(exc)
    except (OSError, UnicodeDecodeError) as exc:
        return f"{html}: could not make it readable offline: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m flmem.flamegraph_offline HTML...``: make memray HTML files (rendered by hand, or by an
    older flmem) readable offline, each with the assets in its job dir (or next to it). Exit 1 on any error."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m flmem.flamegraph_offline FLAMEGRAPH.html...", file=sys.stderr)
        return 2
    errors = [e for e in map(localize_flamegraph, map(Path, paths)) if e]
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
