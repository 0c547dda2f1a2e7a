"""Find and read runs and sweeps on disk, whatever state they are in.

A *job* is one Hydra job directory (``result.json``, ``roles/<role>/...``); a *single run* is a
job under ``outputs/runs/<timestamp>/``; a *sweep* is ``outputs/multirun/<timestamp>/`` holding
one job directory per Hydra job number. Nothing here raises on a job that is still running,
failed, or lost files: the gaps are recorded as the job's status and ``problems``.
"""
from __future__ import annotations

import math
import os
import re
import time
from datetime import datetime
from pathlib import Path

from flmem.browse import shape
from flmem.browse.captures import check_capture
from flmem.browse.model import BrowseError, Job, Role, Sweep, parse_overrides, role_order
from flmem.status import read_small_text

#: a job without result.json is "running" while a role process lives or it wrote a file this recently (s)
RUNNING_WINDOW_S = 120
_STAMP = "%Y-%m-%d_%H-%M-%S-%f"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _last_activity(job_dir: Path, roles) -> float:
    """The latest write (epoch s) to the job directory, its role files, or a role's status.json."""
    stamps = [job_dir.stat().st_mtime] + [r.status.get("updated") or 0 for r in roles]
    for role in roles:
        try:
            stamps += [p.stat().st_mtime for p in role.dir.iterdir()]
        except OSError:
            continue
    return max(stamps)


def _load_role(name: str, role_dir: Path, result_summary: dict | None, finished: bool,
               problems: list[str]) -> Role:
    """One role; what is wrong with its files is appended to ``problems`` as ``"<role>: <why>"``."""
    summary, notes = shape.read(role_dir / "summary.json")
    if summary is None and notes and result_summary:
        notes = [f"{n}; using result.json's copy" for n in notes]
    summary = summary or result_summary or {}
    status, status_notes = shape.read(role_dir / "status.json")
    status = status or {}
    problems += [f"{name}: {n}" for n in notes + status_notes]
    if finished or summary:
        state, reason = check_capture(role_dir / "capture.bin", summary)
    else:
        state, reason = "open", "capture still being written (role running)"
    html = role_dir / "flamegraph.html"
    fg_reason = None
    if not html.is_file():  # a FIFO or device there would hang the browser that follows the link
        html = None
        fg_reason = (summary.get("flamegraph_error") or summary.get("capture_error")
                     or ("profiling.flamegraph=false, or not rendered yet" if summary else "role not finished"))
    return Role(name, role_dir, summary, status, state, reason, html, fg_reason)


#: what a role's name may be (``server``, ``client_3``): it names a directory, so never a path
ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
#: overrides.yaml and multirun.yaml are a few lines: anything larger is not one of ours
MAX_YAML_BYTES = 2**20


def _strings(items, where: str, problems: list[str]) -> list[str]:
    """The strings of the list ``items`` (overrides), a problem noted for anything else."""
    if not isinstance(items, list):
        problems.append(f"{where} = {shape._show(items)} is not a list of overrides (ignored)")
        return []
    bad = [i for i in items if not isinstance(i, str)]
    if bad:
        problems.append(f"{where}: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} not a string (ignored): "
                        f"{shape._show(bad)}")
    return [i for i in items if isinstance(i, str)]


def load_job(job_dir: Path, name: str | None = None) -> Job:
    """Read one job directory, whatever its files hold. Raises BrowseError when ``job_dir`` is not a
    directory; a job that cannot be read otherwise comes back with status ``damaged`` and the reason."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        raise BrowseError(f"{job_dir}: not a directory")
    try:
        return _load_job(job_dir, name)
    except Exception as exc:  # noqa: BLE001 - one damaged job never stops a listing
        return damaged_job(job_dir, name, f"unreadable job ({type(exc).__name__}: {exc})")


def damaged_job(job_dir: Path, name: str | None, reason: str) -> Job:
    """A job that could not be read: no roles, no numbers, ``reason`` as its problem."""
    return Job(dir=job_dir, name=name or job_dir.name, overrides={}, status="damaged", failure=None, result={},
               roles={}, started=None, duration_s=None, model_bytes=None, rounds=[], problems=[reason])


def _load_job(job_dir: Path, name: str | None) -> Job:
    result_path = job_dir / "result.json"
    result, result_notes = shape.read(result_path)
    damaged = result is None and bool(result_notes)  # there, but no JSON object: the job's record is lost
    result = result or {}
    overrides = result.get("overrides")
    if overrides is not None and not isinstance(overrides, list):
        result_notes.append(f"result.json: overrides = {overrides!r:.40} is not a list (using .hydra/overrides.yaml)")
        overrides = None
    if overrides is None:
        overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
        overrides = _strings(overrides, ".hydra/overrides.yaml", result_notes) if overrides is not None else []
    else:
        overrides = _strings(overrides, "result.json: overrides", result_notes)
    roles_dir = job_dir / "roles"
    saved = result.get("roles") or {}
    names = set(saved) | ({p.name for p in roles_dir.iterdir() if p.is_dir()} if roles_dir.is_dir() else set())
    odd = sorted(n for n in names if not ROLE_NAME.fullmatch(n))
    if odd:  # a name from result.json is data, not a path: never joined to a directory
        result_notes.append(f"result.json: role name{'s' if len(odd) > 1 else ''} "
                            f"{', '.join(shape._show(n) for n in odd[:3])} not a role (ignored)")
        names -= set(odd)
    problems: list[str] = list(result_notes)
    roles = {n: _load_role(n, roles_dir / n, saved.get(n) if isinstance(saved.get(n), dict) else None,
                           bool(result), problems)
             for n in sorted(names, key=role_order)}
    problems += [f"{r.name}: {r.capture_reason}" for r in roles.values() if r.capture_state not in ("ok", "open")]
    if damaged:
        status, rounds = "damaged", []
    elif result:
        status = result.get("status") if result.get("status") in ("completed", "failed") else "incomplete"
        rounds = result.get("rounds") or []
        if not isinstance(rounds, list):  # shape.clean keeps a number here (status.json's rounds planned)
            problems.append(f"result.json: rounds = {shape._show(rounds)} is not a list of rounds (ignored)")
            rounds = []
    else:
        from flmem.status import read_metrics

        rounds = []
        for record in read_metrics(roles_dir / "server"):
            record, notes = shape.clean(record, "server metrics.jsonl")
            if record is not None:
                rounds.append(record)
        live = any(_alive(r.status.get("pid")) for r in roles.values() if r.status.get("phase") != "done")
        if live or time.time() - _last_activity(job_dir, roles.values()) < RUNNING_WINDOW_S:
            status = "running"
        else:
            status = "incomplete"
            if not result_notes:
                problems.insert(0, "no result.json: the launcher stopped before the job ended")
    model_bytes = result.get("model_bytes") or next((r.get("model_bytes") for r in roles.values()
                                                     if r.get("model_bytes")), None)
    if not isinstance(result.get("client_rounds") or {}, dict) or any(
            not isinstance(v, list) for v in (result.get("client_rounds") or {}).values()):
        problems.append("result.json: client_rounds is not an object of lists of records (ignored)")
        result["client_rounds"] = {}
    return Job(dir=job_dir, name=name or job_dir.name, overrides=parse_overrides(overrides), status=status,
               failure=result.get("failure") or None, result=result, roles=roles, started=result.get("started"),
               duration_s=result.get("duration_s"), model_bytes=model_bytes, rounds=rounds, problems=problems)


def _read_yaml(path: Path):
    try:
        import yaml

        return yaml.safe_load(read_small_text(path, MAX_YAML_BYTES))
    except Exception:  # missing, half-written, no regular file or too large: treated as absent
        return None


def is_job_dir(path: Path) -> bool:
    return (path / "result.json").exists() or (path / "roles").is_dir() or (path / ".hydra").is_dir()


def _job_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _when(path: Path, jobs: list[Job]) -> datetime:
    """When a sweep or run started: its directory's time stamp, else its jobs' ``started``, else its mtime."""
    try:
        return datetime.strptime(path.name, _STAMP)
    except ValueError:
        pass
    for stamp in sorted(j.started for j in jobs if shape.is_number(j.started)) + [_mtime(path)]:
        try:
            return datetime.fromtimestamp(stamp)
        except (OverflowError, OSError, ValueError):  # a time no clock can show: the next candidate
            continue
    return datetime.fromtimestamp(0)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _expected(task_overrides: list[str]) -> int | None:
    """Jobs a basic-sweeper sweep will run: the product of the comma-separated value counts."""
    counts = []
    for item in task_overrides:
        value = str(item).partition("=")[2]
        if re.search(r"[\[\]{}()'\"]", value):
            return None  # range(), choice(), lists, quotes: not worth guessing
        counts.append(len(value.split(",")))
    return math.prod(counts) if counts else None


def load_sweep(sweep_dir: Path) -> Sweep:
    """Read a sweep root (or a single run, as a one-job sweep). Raises BrowseError for other directories."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise BrowseError(f"{sweep_dir}: no such directory")
    if is_job_dir(sweep_dir) and not (sweep_dir / "multirun.yaml").exists():
        job = load_job(sweep_dir)
        return Sweep(sweep_dir, "run", [job], _when(sweep_dir, [job]))
    subdirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and is_job_dir(p)), key=_job_key)
    if not subdirs and not (sweep_dir / "multirun.yaml").exists():
        raise BrowseError(f"{sweep_dir}: not a flmem sweep or run (no multirun.yaml, result.json or job "
                          "directories in it)")
    jobs = [load_job(p) for p in subdirs]
    multirun = _read_yaml(sweep_dir / "multirun.yaml")
    task = multirun.get("hydra") if isinstance(multirun, dict) else None
    task = task.get("overrides") if isinstance(task, dict) else None
    task = task.get("task") if isinstance(task, dict) else None
    task = _strings(task, "multirun.yaml", []) if task is not None else []
    return Sweep(sweep_dir, "sweep", jobs, _when(sweep_dir, jobs), _expected(task), task)


def list_outputs(root: Path) -> list[Sweep]:
    """The sweeps (``root/multirun/*``) and single runs (``root/runs/*``) under ``root``, newest first."""
    root = Path(root)
    found: list[Sweep] = []
    for sub in ("multirun", "runs"):
        base = root / sub
        if not base.is_dir():
            continue
        for path in base.iterdir():
            if path.is_dir():
                try:
                    found.append(load_sweep(path))
                except BrowseError:
                    continue  # a stray directory: not ours to list
                except OSError as exc:  # unreadable: listed as one damaged job, the rest still listed
                    job = damaged_job(path, path.name, f"unreadable directory ({exc})")
                    found.append(Sweep(path, "run" if sub == "runs" else "sweep", [job],
                                       _when(path, [])))
    return sorted(found, key=lambda s: s.when, reverse=True)


def resolve(target: str | None, root: Path) -> Sweep | Job | list[Sweep]:
    """What ``flmem browse TARGET`` shows: the listing of ``root`` (None), a Sweep, or a Job.

    ``latest`` is the newest sweep under ``root`` (the newest single run when there is no sweep). A
    job directory inside a sweep gives that Job. Raises BrowseError naming the target and what is accepted when it is none of these.
    """
    root = Path(root)
    if target is None:
        if not root.is_dir():
            raise BrowseError(f"{root}: no such directory; run from the directory holding outputs/ or pass --root")
        return list_outputs(root)
    if target == "latest":
        items = list_outputs(root)
        if not items:
            raise BrowseError(f"latest: no sweeps or runs under {root} (looked in {root}/multirun and {root}/runs)")
        sweeps = [item for item in items if item.kind == "sweep"]
        return sweeps[0] if sweeps else items[0].jobs[0]
    path = Path(target)
    if not path.is_dir():
        raise BrowseError(f"{target}: no such directory; give a sweep or run directory, 'latest', "
                          f"or nothing to list {root}")
    if (path / "multirun").is_dir() or (path / "runs").is_dir():
        return list_outputs(path)
    sweep = load_sweep(path)
    return sweep.jobs[0] if sweep.kind == "run" else sweep
