"""Check the shape and types of the JSON a run leaves on disk, once, when it is read.

``summary.json``, ``result.json`` and ``status.json`` are untrusted: a file that is valid JSON but the
wrong shape (a list where an object belongs, ``"lots"`` where bytes belong) must not reach the views.
:func:`clean` returns a copy in which objects are dicts, lists of records hold only dicts, numbers are
ints or finite floats (a non-number becomes None) and labels are strings, with one note per fix that
names the file and the key, e.g. ``summary.json: peak_heap_bytes = 'lots' is not a number (ignored)``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from flmem.status import read_small_text

#: keys whose values are numbers (bytes, seconds, ms, counts, accuracies...) wherever they appear
NUMERIC = re.compile(r"(?:^|_)(bytes|s|ms|M|count|samples|line|allocations|exit_code|round|rank|steps|accuracy|"
                     r"loss|threads|norm|started|pid|rounds_done|updated|arena|hblkhd|uordblks|fordblks|keepcost|"
                     r"system|free|seconds)$")
#: keys whose values are lists of records (dicts)
RECORDS = {"top_sites", "phases", "transfers", "malloc_arenas"}
#: keys whose values are objects
OBJECTS = {"roles", "rss_breakdown", "readings", "growth", "malloc", "failure", "exit_codes", "client_rounds"}
#: keys whose values are labels
LABELS = {"role", "phase", "stage", "function", "file", "flmem_caller", "error", "capture_error", "flamegraph_error",
          "phase_peaks", "status", "reason", "capture", "flamegraph", "final_max_rss_note", "direction", "job_dir"}
MAX_NOTES = 4  # per file: the rest are counted, not listed


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_number(value) -> bool:
    """An int or a finite float, not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and \
        (isinstance(value, int) or math.isfinite(value))


def _walk(value: dict, path: str, notes: list[str]) -> dict:
    out = {}
    for key, v in value.items():
        key = str(key)
        where = f"{path}{key}"
        if v is None:
            out[key] = None
        elif key == "rounds" and is_number(v):  # status.json: rounds planned; result.json: round records
            out[key] = v
        elif key in RECORDS or key == "rounds":
            if not isinstance(v, list):
                notes.append(f"{where} = {_show(v)} is not a list (ignored)")
                out[key] = []
                continue
            bad = [i for i, e in enumerate(v) if not isinstance(e, dict)]
            if bad:
                notes.append(f"{where}: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} not an object "
                             f"(ignored): {_show([v[i] for i in bad])}")
            out[key] = [_walk(e, f"{where}[{i}].", notes) for i, e in enumerate(v) if isinstance(e, dict)]
        elif key in OBJECTS:
            if not isinstance(v, dict):
                notes.append(f"{where} = {_show(v)} is not an object (ignored)")
                out[key] = None
            else:
                inner = _walk(v, f"{where}.", notes)
                if key == "exit_codes":  # role -> exit code
                    inner = {k: (c if is_number(c) else None) for k, c in inner.items()}
                out[key] = inner
        elif NUMERIC.search(key):
            if is_number(v):
                out[key] = v
            else:
                notes.append(f"{where} = {_show(v)} is not a number (ignored)")
                out[key] = None
        elif key in LABELS and not isinstance(v, str):
            notes.append(f"{where} = {_show(v)} is not a string (ignored)")
            out[key] = None
        elif isinstance(v, dict):
            out[key] = _walk(v, f"{where}.", notes)
        elif isinstance(v, list):
            out[key] = [_walk(e, f"{where}[{i}].", notes) if isinstance(e, dict) else e for i, e in enumerate(v)]
        else:
            out[key] = v
    return out


def clean(data, name: str) -> tuple[dict | None, list[str]]:
    """``data`` (parsed JSON of the file ``name``) checked: ``(cleaned dict, notes)``, or ``(None, [note])``
    when it is not a JSON object at all. Missing files (``data`` None) give ``(None, [])``."""
    if data is None:
        return None, []
    if not isinstance(data, dict):
        return None, [f"{name} is not a JSON object but {type(data).__name__} {_show(data)} (ignored)"]
    notes: list[str] = []
    out = _walk(data, "", notes)
    extra = len(notes) - MAX_NOTES
    notes = [f"{name}: {n}" for n in notes[:MAX_NOTES]]
    if extra > 0:
        notes.append(f"{name}: {extra} more bad value{'s' if extra > 1 else ''} ignored")
    return out, notes


def read(path: Path) -> tuple[dict | None, list[str]]:
    """The JSON object in ``path`` checked by :func:`clean`: ``(dict, notes)``; ``(None, [])`` when the file
    does not exist, ``(None, [why])`` when it cannot be read, is not JSON, or is not an object."""
    path = Path(path)
    try:
        text = read_small_text(path)
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError) as exc:
        return None, [f"{path.name} unreadable ({type(exc).__name__}: {exc})"]
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, [f"{path.name} is not valid JSON ({exc}; {len(text)} characters)"]
    if data is None:
        return None, [f"{path.name} holds null (ignored)"]
    return clean(data, path.name)
