"""A role's live state on disk: ``status.json`` (rewritten atomically) and ``metrics.jsonl``.

The launcher polls these files to draw its progress display and to build the job result, so
they are plain JSON that any reader (including a browser of a sweep still running) can use.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
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
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(role_dir: Path) -> list[dict]:
    """The records of a role's ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    try:
        lines = (Path(role_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
