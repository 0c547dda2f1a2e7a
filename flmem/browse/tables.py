"""One row per job, filtering and sorting, and the pairwise comparison behind ``--compare KEY``.

Row values are raw: bytes for memory, seconds for time, a fraction for accuracy, model-size
units (M, the global model's bytes) for working memory. Formatting happens in render.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

from flmem.browse.model import BrowseError, Job, Sweep
from flmem.browse.phases import finite

BOOL_ORDER = {"false": 0, "true": 1}


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str  # bytes | ratio | seconds | accuracy | text
    people: bool = True  # False: only in csv and json (the table and markdown show it another way)


METRIC_COLUMNS = [
    Column("server_peak_heap_bytes", "server\npeak heap MiB", "bytes"),
    Column("server_peak_rss_bytes", "server\npeak RSS MiB", "bytes"),
    Column("clients_peak_heap_max_bytes", "clients max\npeak heap MiB", "bytes"),
    Column("clients_peak_heap_mean_bytes", "clients mean\npeak heap MiB", "bytes"),
    Column("clients_peak_rss_max_bytes", "clients max\npeak RSS MiB", "bytes"),
    Column("clients_peak_rss_mean_bytes", "clients mean\npeak RSS MiB", "bytes"),
    Column("server_working_in_M", "server\nworking / M", "ratio"),
    Column("clients_working_in_M_max", "clients max\nworking / M", "ratio"),
    Column("server_fl_working_bytes", "server\nFL working MiB", "bytes"),
    Column("clients_fl_working_max_bytes", "clients max\nFL working MiB", "bytes"),
    Column("duration_s", "run time\ns", "seconds"),
    Column("final_accuracy", "final\naccuracy", "accuracy"),
]


def _values(job: Job, key: str, clients: bool) -> list[float]:
    return [r.get(key) for r in job.roles.values() if r.is_client == clients and r.get(key) is not None]


def _max(xs):
    return max(xs) if xs else None


def _mean(xs):
    return mean(xs) if xs else None


def job_row(job: Job, keys: list[str]) -> dict:
    """The row of ``job``: ``job``, the override ``keys``, status, failure, and the METRIC_COLUMNS."""
    server = job.roles.get("server")
    row = {"job": job.name, **{k: job.overrides.get(k) for k in keys}, "status": job.status,
           "failure_role": (job.failure or {}).get("role"), "failure_reason": (job.failure or {}).get("reason")}
    row["server_peak_heap_bytes"] = server.get("peak_heap_bytes") if server else None
    row["server_peak_rss_bytes"] = server.get("peak_rss_bytes") if server else None
    for metric in ("peak_heap", "peak_rss"):
        vals = _values(job, f"{metric}_bytes", clients=True)
        row[f"clients_{metric}_max_bytes"], row[f"clients_{metric}_mean_bytes"] = _max(vals), _mean(vals)
    row["server_working_in_M"] = server.get("working_heap_in_M") if server else None
    row["clients_working_in_M_max"] = _max(_values(job, "working_heap_in_M", clients=True))
    # FL working memory: what the FL stage adds over setup (model and data held); None for older runs
    row["server_fl_working_bytes"] = finite(server.get("fl_working_heap_bytes")) if server else None
    row["clients_fl_working_max_bytes"] = _max([v for v in map(finite, _values(job, "fl_working_heap_bytes", True))
                                                if v is not None])
    row["duration_s"] = job.duration_s
    row["final_accuracy"] = job.final_accuracy
    row["notes"] = "; ".join(([job.failure_text] if job.failure else []) + job.problems)
    return row


def columns_for(keys: list[str]) -> list[Column]:
    return ([Column("job", "job", "text")] + [Column(k, k, "text") for k in keys]
            + [Column("status", "status", "text")] + METRIC_COLUMNS + [Column("notes", "notes", "text")]
            + [Column("failure_role", "failed role", "text", False), Column("failure_reason", "reason", "text", False)])


def sweep_rows(sweep: Sweep) -> tuple[list[Column], list[dict]]:
    keys = sweep.varying
    return columns_for(keys), [job_row(j, keys) for j in sweep.jobs]


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(actual, wanted: str) -> bool:
    if actual is None:
        return wanted.lower() in ("", "none", "null", "-")
    a, w = _num(actual), _num(wanted)
    if a is not None and w is not None and not isinstance(actual, bool):
        return a == w
    return str(actual).lower() == wanted.lower()


def apply_filters(rows: list[dict], filters: list[str], jobs: list[Job]) -> list[dict]:
    """Keep rows matching every ``key=value`` (or ``key!=value``); keys are columns or any override.

    Raises BrowseError for a filter without ``=``, with an unknown key (naming the valid keys), or
    ``key=value`` with a value no row has (naming the values there are).
    """
    everything = rows
    by_name = {j.name: j for j in jobs}
    valid = sorted({k for r in rows for k in r} | {k for j in jobs for k in j.overrides})
    for spec in filters:
        key, sep, wanted = spec.partition("=")
        negate = key.endswith("!")
        key = key.rstrip("!")
        if not sep or not key:
            raise BrowseError(f"--filter {spec!r}: expected KEY=VALUE (or KEY!=VALUE); keys: {', '.join(valid)}")
        if key not in valid:
            raise BrowseError(f"--filter {spec!r}: unknown key {key!r}; valid keys: {', '.join(valid)}")

        def value(row, key=key):
            return row[key] if key in row else by_name[row["job"]].overrides.get(key)

        if not negate and everything and not any(_same(value(r), wanted) for r in everything):
            values = sorted({"-" if value(r) is None else str(value(r)) for r in everything})
            raise BrowseError(f"--filter {spec!r}: no row has {key}={wanted!r}; values: {', '.join(values[:40])}"
                              + (f" and {len(values) - 40} more" if len(values) > 40 else ""))
        rows = [r for r in rows if _same(value(r), wanted) != negate]
    return rows


def sort_rows(rows: list[dict], column: str | None, columns: list[Column]) -> list[dict]:
    """Sort by ``column`` (``-column``: descending); missing values last. Raises BrowseError for an
    unknown column, naming the valid ones."""
    if not column:
        return rows
    desc = column.startswith("-")
    key = column.lstrip("-")
    valid = [c.key for c in columns]
    if key not in valid:
        raise BrowseError(f"--sort {column!r}: unknown column; valid columns: {', '.join(valid)} "
                          "(prefix with - for descending)")
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    numeric = all(_num(r[key]) is not None for r in present)
    present.sort(key=lambda r: _num(r[key]) if numeric else str(r[key]), reverse=desc)
    return present + missing
