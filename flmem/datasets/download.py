"""torchvision's dataset downloads, bounded in time and tidied up after a failure.

The fetch functions passed in import torchvision themselves: this module imports neither torch nor
torchvision, so the launcher (which downloads before any role starts) stays light.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

DOWNLOAD_TIMEOUT_S = 20.0  # seconds one socket operation of a download may block


def download(fetch: Callable[[], object], folders: list[Path]) -> str | None:
    """Run torchvision's download ``fetch`` into ``folders`` (where its files go); the reason it failed, or None.

    Every socket operation gives up after ``DOWNLOAD_TIMEOUT_S`` seconds, so a network that drops
    packets fails in bounded time instead of hanging on the operating system's TCP timeouts. After
    a failure, the folders the attempt made (torchvision makes them before it downloads) are
    removed when empty, so a mistyped ``dataset.root`` leaves nothing behind.
    """
    made = [p for folder in folders for p in (folder, *folder.parents) if not p.exists()]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        fetch()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError... keep the cause visible
        for path in sorted(set(made), key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                path.rmdir()  # only an empty folder: a partial download stays for the user to see
            except OSError:
                pass
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def fix(failure: str | None, by_hand: str) -> str:
    """The end of a DatasetNotFoundError message: how to get the files, given the download's ``failure`` (or None)."""
    if failure is None:
        return f"Get them with dataset.download=true (needs the network), or {by_hand}."
    return (f"Downloading them through torchvision failed ({failure}). Without the network, {by_hand}; "
            f"dataset.download=false skips the download.")
