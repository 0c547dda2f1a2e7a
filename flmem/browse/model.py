"""What the browser knows about a run: roles, jobs and sweeps, and the error for bad input.

Memory is in bytes and time in seconds throughout; formatting happens in render.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


class BrowseError(ValueError):
    """Bad input to the browser (unknown directory, column, filter); the CLI prints it and exits 2."""


def parse_overrides(items) -> dict[str, str]:
    """``["optimize=True", "+a.b=1"]`` -> ``{"optimize": "True", "a.b": "1"}`` (``~key`` -> ``<deleted>``)."""
    out: dict[str, str] = {}
    for item in items or []:
        item = str(item)
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        out[key] = value if sep else "<deleted>"
    return out


def role_order(name: str):
    m = re.fullmatch(r"client_(\d+)", name)
    return (0, 0, name) if name == "server" else (1, int(m.group(1)), name) if m else (2, 0, name)


@dataclass
class Role:
    """One role process of a job: its summary (bytes, seconds) and the state of its capture."""

    name: str
    dir: Path
    summary: dict
    status: dict
    capture_state: str  # ok | missing | truncated | unreadable | open (still being written)
    capture_reason: str | None
    flamegraph: Path | None
    flamegraph_reason: str | None

    def get(self, key: str):
        return self.summary.get(key)

    @property
    def is_client(self) -> bool:
        return self.name.startswith("client")


@dataclass
class Job:
    """One Hydra job; ``status`` is completed | failed | running | incomplete | damaged (its result.json is
    there but unusable, or the job could not be read at all: ``problems`` says why)."""

    dir: Path
    name: str
    overrides: dict[str, str]
    status: str
    failure: dict | None
    result: dict
    roles: dict[str, Role]
    started: float | None
    duration_s: float | None
    model_bytes: int | None
    rounds: list[dict]
    problems: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].get("test_accuracy") if self.rounds else None

    @property
    def failure_text(self) -> str:
        if not self.failure:
            return ""
        return " ".join(f"{self.failure.get('role')}: {self.failure.get('reason')}".split())


@dataclass
class Sweep:
    """A sweep root (``kind="sweep"``) or a single run (``kind="run"``, one job) with its jobs."""

    dir: Path
    kind: str
    jobs: list[Job]
    when: datetime
    expected_jobs: int | None = None
    sweep_overrides: list[str] = field(default_factory=list)

    @property
    def varying(self) -> list[str]:
        """The override keys whose values differ across the jobs, in the order the sweep gave them."""
        keys: list[str] = []
        for k in [parse_overrides([o]).popitem()[0] for o in self.sweep_overrides] + \
                [k for j in self.jobs for k in j.overrides]:
            if k not in keys:
                keys.append(k)
        return [k for k in keys if len({j.overrides.get(k) for j in self.jobs}) > 1]

    @property
    def failed(self) -> int:
        return sum(j.status == "failed" for j in self.jobs)

    @property
    def running(self) -> int:
        return sum(j.status in ("running", "incomplete") for j in self.jobs)

    @property
    def damaged(self) -> int:
        return sum(j.status == "damaged" for j in self.jobs)
