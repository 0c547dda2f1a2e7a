"""A role's live state on disk: ``status.json`` (rewritten atomically) and ``metrics.jsonl``.

The launcher polls these files to draw its progress display and to build the job result, so
they are plain JSON that any reader (including a browser of a sweep still running) can use.
"""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename, so readers never see half a file.

    Raises:
        OSError: the write failed (a full disk: ENOSPC); its ``filename`` is ``path``, and the partial
            temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None or exc.filename == str(tmp):  # say which file the caller wrote
            exc.filename = str(path)
        raise


MAX_JSON_BYTES = 64 * 2**20  # a run's JSON files are KiB; anything far larger is not one of ours


def open_regular(path: Path, limit: int | None = None) -> int:
    """A read-only descriptor of ``path``, opened without blocking (``O_NONBLOCK``: a FIFO with no writer,
    or a device, returns at once) and kept only when ``fstat`` says it is a regular file of at most
    ``limit`` bytes (checked on the open file, so a file swapped after a check cannot slip through).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: not a regular file (a FIFO, a device, a directory, or a symlink to one), larger than
            ``limit``, or unreadable (the message names ``path`` and says which).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        if limit is not None and st.st_size > limit:
            raise OSError(f"{path}: {st.st_size} bytes, more than the {limit} a run file may hold")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_text(path: Path, limit: int = MAX_JSON_BYTES) -> str:
    """The text of a run file, refusing what is no regular file (a FIFO would block the reader forever)
    or larger than ``limit`` bytes (see :func:`open_regular`); at most ``limit`` bytes are ever read,
    even from a file that grows meanwhile.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: not a regular file, larger than ``limit``, or unreadable (the message says which).
        UnicodeDecodeError (a ValueError): not UTF-8 text.
    """
    with os.fdopen(open_regular(path, limit), "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path}: more than the {limit} bytes a run file may hold")
    return data.decode("utf-8")


def read_json(path: Path, default=None):
    """The JSON in ``path``, or ``default`` when it is missing, unreadable, not a regular file or larger
    than ``MAX_JSON_BYTES`` (see :func:`read_small_text`)."""
    try:
        return json.loads(read_small_text(path))
    except (OSError, ValueError):
        return default


class StatusWriter:
    """Reports a role's phase and progress (rounds done of ``rounds``) under ``role_dir``."""

    def __init__(self, role_dir: Path, role: str, rounds: int):
        self.dir = Path(role_dir)
        self.state = {"role": role, "pid": os.getpid(), "phase": "starting", "rounds_done": 0, "rounds": rounds,
                      "updated": time.time()}
        self.update()

    def update(self, **fields) -> None:
        self.state.update(fields, updated=time.time())
        write_json(self.dir / "status.json", self.state)

    def metric(self, record: dict) -> None:
        """Append one per-round record to ``metrics.jsonl``."""
        path = self.dir / "metrics.jsonl"
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: say which file
            exc.filename = exc.filename or str(path)
            raise


def read_metrics(role_dir: Path) -> list[dict]:
    """The records of a role's ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    try:
        lines = read_small_text(Path(role_dir) / "metrics.jsonl").splitlines()
    except (OSError, ValueError):  # missing, no regular file, too large, not UTF-8
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
