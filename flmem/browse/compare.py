"""``--compare KEY``: pair the jobs that differ only in KEY and compare them role by role.

For each pair the *before* job has the baseline value of KEY (``false`` for a boolean such as
``optimize``, else the first value the sweep gave) and the *after* job another value. Each row
holds before, after, the difference (after - before) and the ratio (after / before).

Noise. A difference is marked *within noise* when it is no larger than the noise measured in
the same pair of jobs, the largest of:

* the spread (max - min) of the metric across the clients of either job: clients run the same
  code on same-sized data, so their spread is run-to-run variation (client rows only);
* for heap metrics, the shift of the baseline heap between the two jobs (same imports, no model
  yet: any change is measurement noise);
* a floor: ``rel_noise`` (default 1 %) of the larger value for memory, 5 % for run time, and
  0.01 for accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean

from flmem.browse.model import BrowseError, Job, Sweep
from flmem.browse.tables import BOOL_ORDER

#: (metric label, summary key, kind) compared for each role
ROLE_METRICS = [("peak heap", "peak_heap_bytes", "bytes"), ("working memory", "working_heap_bytes", "bytes"),
                ("peak RSS", "peak_rss_bytes", "bytes")]
TIME_FLOOR, ACCURACY_FLOOR = 0.05, 0.01


@dataclass
class CompareRow:
    """One metric of one role in one pair; memory in bytes, time in seconds."""

    group: str
    role: str
    metric: str
    kind: str
    before: float | None
    after: float | None
    noise: float | None
    note: str = ""

    @property
    def diff(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    @property
    def ratio(self) -> float | None:
        return None if self.diff is None or not self.before else self.after / self.before

    @property
    def within_noise(self) -> bool | None:
        return None if self.diff is None or self.noise is None else abs(self.diff) <= self.noise

    def as_dict(self) -> dict:
        return {"group": self.group, "role": self.role, "metric": self.metric, "unit": _UNIT[self.kind],
                "before": self.before, "after": self.after, "diff": self.diff, "ratio": self.ratio,
                "noise": self.noise, "within_noise": self.within_noise, "note": self.note}


_UNIT = {"bytes": "bytes", "seconds": "s", "accuracy": "fraction", "text": None}


@dataclass
class Comparison:
    key: str
    before_value: str
    after_values: list[str]
    pairs: list[tuple[str, Job, Job]]
    rows: list[CompareRow]
    unpaired: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"key": self.key, "before": self.before_value, "after": self.after_values,
                "pairs": [{"group": g, "before_job": str(a.dir), "after_job": str(b.dir)} for g, a, b in self.pairs],
                "rows": [r.as_dict() for r in self.rows], "unpaired": self.unpaired}


def _ordered_values(sweep: Sweep, key: str) -> list[str]:
    values = list(dict.fromkeys(j.overrides[key] for j in sweep.jobs if key in j.overrides))
    if all(v.lower() in BOOL_ORDER for v in values):
        return sorted(values, key=lambda v: BOOL_ORDER[v.lower()])
    for item in sweep.sweep_overrides:
        k, _, listed = item.partition("=")
        if k.lstrip("+~") == key:
            order = [v.strip() for v in listed.split(",")]
            return sorted(values, key=lambda v: order.index(v) if v in order else len(order))
    return values


def _spread(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return max(xs) - min(xs) if len(xs) > 1 else 0.0


def _role_values(job: Job, key: str, clients: bool) -> list:
    return [r.get(key) for r in job.roles.values() if r.is_client == clients and r.get(key) is not None]


def _pair_rows(group: str, a: Job, b: Job, rel_noise: float) -> list[CompareRow]:
    rows: list[CompareRow] = []
    note = "; ".join(f"{side} job {j.name} {j.status}" + (f" ({j.failure_text})" if j.failure else "")
                     for side, j in (("before", a), ("after", b)) if j.status != "completed")
    if not a.roles and not b.roles:  # neither job started a role (config failure): one row says why
        return [CompareRow(group, "job", "status", "text", None, None, None, note)]
    for role, clients, agg in (("server", False, None), ("clients (max)", True, max), ("clients (mean)", True, mean)):
        for metric, key, kind in ROLE_METRICS:
            va, vb = _role_values(a, key, clients), _role_values(b, key, clients)
            before = (va[0] if va else None) if agg is None else (agg(va) if va else None)
            after = (vb[0] if vb else None) if agg is None else (agg(vb) if vb else None)
            noise = None
            if before is not None and after is not None:
                base_a, base_b = (_role_values(j, "baseline_heap_bytes", clients) for j in (a, b))
                shift = abs(mean(base_a) - mean(base_b)) if key != "peak_rss_bytes" and base_a and base_b else 0
                spread = max(_spread(va), _spread(vb)) if clients else 0
                noise = max(spread, shift, rel_noise * max(abs(before), abs(after)))
            rows.append(CompareRow(group, role, metric, kind, before, after, noise, "" if rows else note))
    da, db = a.duration_s, b.duration_s
    rows.append(CompareRow(group, "job", "run time", "seconds", da, db,
                           None if da is None or db is None else TIME_FLOOR * max(da, db)))
    acc_a, acc_b = a.final_accuracy, b.final_accuracy
    rows.append(CompareRow(group, "job", "final accuracy", "accuracy", acc_a, acc_b,
                           None if acc_a is None or acc_b is None else ACCURACY_FLOOR))
    return rows


def compare(sweep: Sweep, key: str, baseline: str | None = None, rel_noise: float = 0.01) -> Comparison:
    """Pair the jobs of ``sweep`` that differ only in ``key``.

    Raises BrowseError when ``key`` does not vary across the sweep (naming the keys that do), or
    when ``baseline`` is not one of its values.
    """
    varying = sweep.varying
    if key not in varying:
        raise BrowseError(f"--compare {key!r}: not an override that varies across {sweep.dir}; "
                          f"varying: {', '.join(varying) or 'none'}")
    values = _ordered_values(sweep, key)
    if baseline is not None:
        match = [v for v in values if v.lower() == baseline.lower()]
        if not match:
            raise BrowseError(f"--baseline {baseline!r}: not a value of {key}; values: {', '.join(values)}")
        values.remove(match[0])
        values.insert(0, match[0])
    before_value, after_values = values[0], values[1:]
    groups: dict[tuple, dict[str, Job]] = {}
    for job in sweep.jobs:
        rest = tuple(sorted((k, v) for k, v in job.overrides.items() if k != key))
        groups.setdefault(rest, {}).setdefault(job.overrides.get(key), job)
    pairs, rows, unpaired = [], [], []
    for rest, by_value in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in rest if k in varying) or "all"
        a = by_value.get(before_value)
        for value in after_values:
            b = by_value.get(value)
            if a is None or b is None:
                present = a or b
                if present is not None:
                    unpaired.append(f"{label}: only {key}={present.overrides.get(key)} (job {present.name})")
                continue
            group = label if len(after_values) == 1 else f"{label}, {key}={value}"
            pairs.append((group, a, b))
            rows.extend(_pair_rows(group, a, b, rel_noise))
    return Comparison(key, before_value, after_values, pairs, rows, sorted(set(unpaired)))


def default_key(sweep: Sweep) -> str | None:
    """``optimize`` when it varies across the sweep, else the first varying override, else None."""
    varying = sweep.varying
    return "optimize" if "optimize" in varying else (varying[0] if varying else None)
