"""A page in headless chromium driven over the DevTools protocol (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on fds 3 and 4), recording every request, failed load, console error
and uncaught exception; for tests that must see a page as a person would, after its scripts ran."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def _above(fd: int, low: int = 10) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return high


class Page:
    """``Page(argv, url)`` opens ``url`` in a fresh tab and waits for its load event.

    ``requests``: every URL the page asked for; ``failed``: (url, net::ERR...) pairs; ``errors``:
    uncaught exceptions and console/log errors. Raises TimeoutError when chromium stays silent."""

    def __init__(self, argv: list[str], url: str, timeout_s: float = 120):
        self.timeout_s = timeout_s
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        # above 3 and 4 first, so that placing one end cannot overwrite the other
        to_chrome, from_chrome = (_above(to_chrome), _above(from_chrome))

        def fds_3_and_4():  # chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self._log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads chromium's log until close()
        self.proc = subprocess.Popen(argv + ["--remote-debugging-pipe", "about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log, close_fds=False,
                                     preexec_fn=fds_3_and_4, start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._id, self._session = b"", 0, None
        self.requests: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._urls: dict[str, str] = {}
        self._loaded = False
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Page.navigate", url=url)
            self._until(lambda: self._loaded)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, browser: bool = False, **params) -> dict:
        """Send a command to the page (to the browser with ``browser=True``); returns its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self._session and not browser:
            msg["sessionId"] = self._session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        reply = {}
        self._until(lambda: reply, want=self._id, into=reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def evaluate(self, expression: str):
        """The JSON value of ``expression`` in the page (promises awaited)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60, pause_s: float = 0.25):
        """Poll ``expression`` until it is truthy; returns its value (TimeoutError after ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(pause_s)
        raise TimeoutError(f"{expression!r} stayed false for {timeout_s} s; errors: {self.errors}")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> str:
        """Stop chromium (and its renderer and GPU processes); returns its log (stdout and stderr)."""
        try:
            self.call("Browser.close", browser=True)
            self.proc.wait(timeout=30)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        finally:
            try:  # renderer and GPU processes left behind; its own session holds only what this Page started
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            os.close(self._out)
            os.close(self._in)
        self._log.seek(0)
        log = self._log.read().decode(errors="replace")
        self._log.close()
        return log

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
            self._urls[p["requestId"]] = p["request"]["url"]
        elif method == "Network.loadingFailed":
            self.failed.append((self._urls.get(p["requestId"], "?"), p.get("errorText", "")))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(f"{d.get('text')} {d.get('exception', {}).get('description', '')} at {d.get('url')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                            for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Page.loadEventFired":
            self._loaded = True

    def _until(self, done, want: int | None = None, into: dict | None = None) -> None:
        end = time.monotonic() + self.timeout_s
        while not done():
            while b"\0" not in self._buf:
                left = end - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium sent nothing for {self.timeout_s} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited: {self.proc.poll()}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            msg = json.loads(raw)
            if want is not None and msg.get("id") == want:
                into.update(msg)
            else:
                self._event(msg)
