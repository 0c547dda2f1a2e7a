"""``--compare KEY``: pair the jobs that differ only in KEY and compare them role by role and phase by phase.

For each pair the *before* job has the baseline value of KEY (``false`` for a boolean such as
``optimize``, else the first value the sweep gave) and the *after* job another value. Each row
holds before, after, the difference (after - before) and the ratio (after / before). A second
list of rows compares each phase's peak heap (server, clients max), from the roles' ``summary.json``.

Repeats. When the sweep also varies ``repeat`` (a key that changes nothing, swept to repeat jobs)
and KEY is not ``repeat``, the jobs that differ only in ``repeat`` and KEY form one group: before
and after are the *median* over the repeats of each side, and each row carries the range (min,
max) and the number of repeats behind each side.

Noise. A difference is marked *within noise* when it is no larger than the noise measured in
the same jobs, the largest of:

* the spread (max - min) of the metric across the repeats of either side;
* the spread of the metric across the clients of any job: clients run the same code on
  same-sized data, so their spread is run-to-run variation (client rows only);
* for absolute heap metrics, the shift of the mean baseline heap between the two sides (same
  imports, no model yet: any change is measurement noise);
* a floor: ``rel_noise`` (default 1 %) of the larger value for memory, 5 % for run time, and
  0.01 for accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean, median
from typing import Callable

from flmem.browse.model import BrowseError, Job, Sweep
from flmem.browse.phases import finite, phase_names, phase_value, stage_of
from flmem.browse.tables import BOOL_ORDER

#: (metric label, summary key, whether the baseline shift counts as noise) compared for each role, in bytes;
#: the setup / FL split says what each memory path saves in FL separately from loading model and data
ROLE_METRICS = [("peak heap", "peak_heap_bytes", True), ("working memory", "working_heap_bytes", True),
                ("peak RSS", "peak_rss_bytes", False), ("setup peak heap", "setup_peak_heap_bytes", True),
                ("FL peak heap", "fl_peak_heap_bytes", True), ("FL working memory", "fl_working_heap_bytes", False),
                ("working RSS", "working_rss_bytes", False)]
ROLE_AGGS = (("server", False, None), ("clients (max)", True, max), ("clients (mean)", True, mean))
PHASE_AGGS = ROLE_AGGS[:2]
REPEAT_KEY = "repeat"
TIME_FLOOR, ACCURACY_FLOOR = 0.05, 0.01


@dataclass
class CompareRow:
    """One metric of one role in one pair (or group of repeats); memory in bytes, time in seconds.

    ``before``/``after``: the value of each side, the median over its repeats; ``*_range``: (min, max)
    over the repeats; ``n_before``/``n_after``: repeats with a value. ``phase``: None for whole-job rows."""

    group: str
    role: str
    metric: str
    kind: str
    before: float | None
    after: float | None
    noise: float | None
    note: str = ""
    phase: str | None = None
    stage: str | None = None
    before_range: tuple | None = None
    after_range: tuple | None = None
    n_before: int = 1
    n_after: int = 1
    n_paired: int | None = None  # repeats with a value on both sides (None: n_before and n_after's minimum)

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
        lo_a, hi_a = self.before_range or (None, None)
        lo_b, hi_b = self.after_range or (None, None)
        return {"group": self.group, "role": self.role, "phase": self.phase, "stage": self.stage,
                "metric": self.metric, "unit": _UNIT[self.kind], "before": self.before, "after": self.after,
                "diff": self.diff, "ratio": self.ratio, "noise": self.noise, "within_noise": self.within_noise,
                "note": self.note, "before_min": lo_a, "before_max": hi_a, "after_min": lo_b, "after_max": hi_b,
                "n": min(self.n_before, self.n_after) if self.n_paired is None else self.n_paired,
                "n_before": self.n_before, "n_after": self.n_after}


_UNIT = {"bytes": "bytes", "seconds": "s", "accuracy": "fraction", "text": None}


@dataclass
class Comparison:
    """``pairs``: (group, first before job, first after job) per group, for charts; ``groups``: every
    job of each side (several when the sweep varies ``repeat``); ``repeat_key``: ``repeat`` or None."""

    key: str
    before_value: str
    after_values: list[str]
    pairs: list[tuple[str, Job, Job]]
    rows: list[CompareRow]
    unpaired: list[str] = field(default_factory=list)
    phase_rows: list[CompareRow] = field(default_factory=list)
    groups: list[tuple[str, list[Job], list[Job]]] = field(default_factory=list)
    repeat_key: str | None = None

    def as_dict(self) -> dict:
        return {"key": self.key, "before": self.before_value, "after": self.after_values,
                "repeat_key": self.repeat_key,
                "pairs": [{"group": g, "before_job": str(a[0].dir), "after_job": str(b[0].dir),
                           "before_jobs": [str(j.dir) for j in a], "after_jobs": [str(j.dir) for j in b]}
                          for g, a, b in self.groups],
                "rows": [r.as_dict() for r in self.rows], "phase_rows": [r.as_dict() for r in self.phase_rows],
                "unpaired": self.unpaired}


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
    return [v for r in job.roles.values() if r.is_client == clients and (v := finite(r.get(key))) is not None]


def _getter(key: str, clients: bool, agg) -> Callable[[Job], float | None]:
    """job -> the server's ``key``, or ``agg`` over the clients' (None when no role has it)."""
    def get(job: Job):
        vals = _role_values(job, key, clients)
        return (vals[0] if vals else None) if agg is None else (agg(vals) if vals else None)
    return get


def _over_fl_start(role, phase: str) -> float | None:
    """``phase``'s peak heap minus the heap when the role's FL stage began (model and data held): what the
    phase adds over setup, so the data a role keeps does not hide what its FL code paths cost."""
    peak, start = phase_value(role, phase), finite(role.get("fl_start_heap_bytes"))
    return None if peak is None or start is None else peak - start


def _phase_getter(phase: str, clients: bool, agg, value=phase_value) -> Callable[[Job], float | None]:
    def get(job: Job):
        vals = [v for r in job.roles.values() if r.is_client == clients
                and (v := value(r, phase)) is not None]
        return (vals[0] if vals else None) if agg is None else (agg(vals) if vals else None)
    return get


def _client_spread(jobs: list[Job], values: Callable[[Job], list]) -> float:
    return max((_spread(values(j)) for j in jobs), default=0.0)


def _baseline_shift(a: list[Job], b: list[Job], clients: bool) -> float:
    base_a = [v for j in a for v in _role_values(j, "baseline_heap_bytes", clients)]
    base_b = [v for j in b for v in _role_values(j, "baseline_heap_bytes", clients)]
    return abs(mean(base_a) - mean(base_b)) if base_a and base_b else 0.0


def _row(group: str, role: str, metric: str, kind: str, a: list[Job], b: list[Job], get, floor: float,
         extra_noise: float = 0.0, **fields) -> CompareRow:
    """The medians of ``get`` over the jobs of each side, their ranges, and the noise (the spread
    across repeats, ``extra_noise``, and ``floor`` times the larger value, or ``floor`` itself for accuracy)."""
    ka, kb = ({j.overrides.get(REPEAT_KEY): v for j in side if (v := get(j)) is not None} for side in (a, b))
    va, vb = [v for j in a if (v := get(j)) is not None], [v for j in b if (v := get(j)) is not None]
    n_paired = len(set(ka) & set(kb))
    if len(a) == len(b) == 1:  # a plain pair (no repeats, or comparing repeat itself): nothing to pair up
        n_paired = int(bool(ka and kb))
    elif ka and kb and set(ka) != set(kb):
        unpaired = (f"before from repeat {', '.join(sorted(map(str, ka)))}, after from repeat "
                    f"{', '.join(sorted(map(str, kb)))}: medians of different repeats")
        fields["note"] = "; ".join(t for t in (fields.get("note"), unpaired) if t)
    before, after = (median(va) if va else None), (median(vb) if vb else None)
    noise = None
    if before is not None and after is not None:
        scaled = floor if kind == "accuracy" else floor * max(abs(before), abs(after))
        noise = max(_spread(va), _spread(vb), extra_noise, scaled)
    return CompareRow(group, role, metric, kind, before, after, noise, before_range=(min(va), max(va)) if va else None,
                      after_range=(min(vb), max(vb)) if vb else None, n_before=len(va), n_after=len(vb),
                      n_paired=n_paired, **fields)


def _pair_rows(group: str, a: list[Job], b: list[Job], rel_noise: float) -> list[CompareRow]:
    rows: list[CompareRow] = []
    note = "; ".join(f"{side} job {j.name} {j.status}" + (f" ({j.failure_text})" if j.failure else "")
                     for side, jobs in (("before", a), ("after", b)) for j in jobs if j.status != "completed")
    if not any(j.roles for j in a + b):  # no job started a role (config failure): one row says why
        return [CompareRow(group, "job", "status", "text", None, None, None, note, n_before=0, n_after=0)]
    for role, clients, agg in ROLE_AGGS:
        shift = _baseline_shift(a, b, clients)
        for metric, key, heap in ROLE_METRICS:
            spread = _client_spread(a + b, lambda j, key=key: _role_values(j, key, True)) if clients else 0.0
            rows.append(_row(group, role, metric, "bytes", a, b, _getter(key, clients, agg), rel_noise,
                             max(spread, shift if heap else 0.0), note="" if rows else note))
    # a failed job's run time and accuracy measure the failure, not the run: left out like its memory
    ok = lambda value: (lambda j: value(j) if j.status == "completed" else None)  # noqa: E731
    rows.append(_row(group, "job", "run time", "seconds", a, b, ok(lambda j: j.duration_s), TIME_FLOOR))
    rows.append(_row(group, "job", "final accuracy", "accuracy", a, b, ok(lambda j: j.final_accuracy),
                     ACCURACY_FLOOR))
    return rows


def _phase_rows(group: str, a: list[Job], b: list[Job], rel_noise: float) -> list[CompareRow]:
    """Each phase's peak heap (baseline included) for the server and the clients (max) and, for FL phases,
    that peak minus the heap when FL began ("over FL start"); phases a role did not record on either side
    give no row."""
    rows = []
    for phase in phase_names(a + b):
        stage = stage_of(a + b, phase)
        for role, clients, agg in PHASE_AGGS:
            spread = _client_spread(a + b, lambda j: [v for r in j.roles.values() if r.is_client
                                                      and (v := phase_value(r, phase)) is not None]) \
                if clients else 0.0
            row = _row(group, role, "peak heap", "bytes", a, b, _phase_getter(phase, clients, agg), rel_noise,
                       max(spread, _baseline_shift(a, b, clients)), phase=phase, stage=stage)
            if row.n_before or row.n_after:
                rows.append(row)
            if stage == "fl":  # the baseline cancels out here, so its shift is no noise
                spread = _client_spread(a + b, lambda j: [v for r in j.roles.values() if r.is_client
                                                          and (v := _over_fl_start(r, phase)) is not None]) \
                    if clients else 0.0
                row = _row(group, role, "over FL start", "bytes", a, b,
                           _phase_getter(phase, clients, agg, _over_fl_start), rel_noise, spread, phase=phase,
                           stage=stage)
                if row.n_before or row.n_after:
                    rows.append(row)
    return rows


def compare(sweep: Sweep, key: str, baseline: str | None = None, rel_noise: float = 0.01) -> Comparison:
    """Pair the jobs of ``sweep`` that differ only in ``key`` (and in ``repeat``, when the sweep varies
    it: each side of a pair is then the group of its repeats, compared by medians).

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
    repeat_key = REPEAT_KEY if key != REPEAT_KEY and REPEAT_KEY in varying else None
    groups: dict[tuple, dict[str, list[Job]]] = {}
    for job in sweep.jobs:
        rest = tuple(sorted((k, v) for k, v in job.overrides.items() if k not in (key, repeat_key)))
        groups.setdefault(rest, {}).setdefault(job.overrides.get(key), []).append(job)
    pairs, sides, rows, phase_rows, unpaired = [], [], [], [], []
    for rest, by_value in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in rest if k in varying) or "all"
        a = by_value.get(before_value)
        for value in after_values:
            b = by_value.get(value)
            if not a or not b:
                for j in a or b or []:
                    unpaired.append(f"{label}: only {key}={j.overrides.get(key)} (job {j.name})")
                continue
            group = label if len(after_values) == 1 else f"{label}, {key}={value}"
            pairs.append((group, a[0], b[0]))
            sides.append((group, a, b))
            rows.extend(_pair_rows(group, a, b, rel_noise))
            phase_rows.extend(_phase_rows(group, a, b, rel_noise))
    return Comparison(key, before_value, after_values, pairs, rows, sorted(set(unpaired)), phase_rows, sides,
                      repeat_key)


def default_key(sweep: Sweep) -> str | None:
    """``optimize`` when it varies across the sweep, else the first varying override, else None."""
    varying = sweep.varying
    return "optimize" if "optimize" in varying else (varying[0] if varying else None)
