"""The four views of ``flmem browse``: the listing, a sweep's jobs, a comparison, and a single run."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from flmem.browse.compare import Comparison
from flmem.browse.model import Job, Sweep
from flmem.browse.phases import exactness, exactness_notes, finite, phase_rows, summary_phases
from flmem.browse.render import COLOUR_LEGEND, View, Section, MiB
from flmem.browse.tables import Column, apply_filters, sort_rows, sweep_rows
from flmem.report import plural

ROLE_COLUMNS = [
    Column("role", "role", "text"), Column("exit_code", "exit", "text"),
    Column("peak_heap_bytes", "peak heap\nMiB", "bytes"), Column("baseline_heap_bytes", "baseline\nMiB", "bytes"),
    Column("working_heap_bytes", "working\nMiB", "bytes"), Column("working_heap_in_M", "working\n/ M", "ratio"),
    Column("fl_working_heap_bytes", "FL working\nMiB", "bytes"),
    Column("fl_working_heap_in_M", "FL working\n/ M", "ratio"),
    Column("peak_rss_bytes", "peak RSS\nMiB", "bytes"), Column("working_rss_bytes", "working RSS\nMiB", "bytes"),
    Column("total_allocations", "allocations", "int"),
    Column("duration_s", "run time\ns", "seconds"), Column("capture", "capture", "text"),
    Column("flamegraph", "flamegraph", "text"),
]
SITE_COLUMNS = [
    Column("role", "role", "text"), Column("rank", "#", "text"), Column("bytes", "MiB at\nhigh-water", "bytes"),
    Column("allocations", "allocations", "int"), Column("function", "function", "text"),
    Column("site", "file:line", "text"), Column("flmem_caller", "flmem caller", "text"),
    Column("file", "file", "text", False), Column("line", "line", "text", False),
]
PHASE_COLUMNS = [
    Column("role", "role", "text"), Column("phase", "phase", "text"), Column("stage", "stage", "text"),
    Column("count", "count", "int"), Column("seconds", "seconds", "seconds"),
    Column("peak_heap_bytes", "peak heap\nMiB", "bytes"), Column("peak_rss_bytes", "peak RSS\nMiB", "bytes"),
    Column("start_heap_bytes", "heap at\nstart MiB", "bytes"), Column("adds_bytes", "adds\nMiB", "bytes"),
    Column("adds_in_M", "adds\n/ M", "ratio"), Column("peaks", "peaks", "text"),
    Column("samples", "samples", "int", False), Column("exact", "exact", "text", False),
    Column("level", "level", "text", False),
]
ROUND_COLUMNS = [
    Column("round", "round", "text"), Column("test_loss", "test loss", "number"),
    Column("test_accuracy", "test accuracy", "accuracy"), Column("round_s", "round s", "seconds"),
    Column("aggregate_s", "aggregate s", "seconds"), Column("client_train_s", "clients mean\ntrain s", "seconds"),
    Column("client_loss", "clients mean\nloss", "number"),
]
COMPARE_COLUMNS = [
    Column("group", "pair", "text"), Column("role", "role", "text"), Column("phase", "phase", "text", False),
    Column("stage", "stage", "text", False), Column("metric", "metric", "text"),
    Column("before", "before", "row_range"), Column("after", "after", "row_range"), Column("diff", "diff", "diff_row"),
    Column("ratio", "ratio", "ratio_x"), Column("note", "note", "text"),
    Column("within_noise", "within noise", "text", False), Column("unit", "unit", "text", False),
    *(Column(k, k, "text", False) for k in ("before_min", "before_max", "after_min", "after_max", "n", "n_before",
                                            "n_after")),
]


def short(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except (OSError, ValueError):
        return str(path)


def _value_list(sweep: Sweep, key: str) -> str:
    return ",".join(dict.fromkeys(str(j.overrides.get(key)) for j in sweep.jobs))


def listing_view(items: list[Sweep], root: Path) -> View:
    rows = []
    for s in items:
        varying = s.varying if s.kind == "sweep" else list(s.jobs[0].overrides) if s.jobs else []
        rows.append({"kind": s.kind, "path": short(s.dir), "when": s.when.strftime("%Y-%m-%d %H:%M:%S"),
                     "jobs": len(s.jobs), "planned": s.expected_jobs, "failed": s.failed, "running": s.running,
                     "problems": sum(bool(j.problems) for j in s.jobs),
                     "varying": " ".join(f"{k}={_value_list(s, k)}" for k in varying) if s.kind == "sweep"
                     else " ".join(f"{k}={s.jobs[0].overrides[k]}" for k in varying)})
    headers = (("kind", "kind"), ("path", "path"), ("when", "when"), ("jobs", "jobs"), ("planned", "jobs planned"),
               ("failed", "failed"), ("running", "running / incomplete"), ("problems", "jobs with capture problems"),
               ("varying", "overrides that vary"))
    cols = [Column(k, h, "text") for k, h in headers]
    notes = [] if items else [f"no sweeps or runs under {root} (looked in {root}/multirun and {root}/runs)"]
    return View(f"sweeps and runs under {short(root)}, newest first", [Section("runs", "", cols, rows)], notes,
                {"root": str(root)})


def model_sizes(sweep: Sweep) -> str | None:
    """The note that says what M is for each job: one size, or each size with the overrides (and jobs)
    it belongs to, e.g. ``M = global model size: 1.61 MiB for dataset=mnist (jobs 1, 3); 2.08 MiB for
    dataset=cifar (jobs 0, 2)``. None when no job reported its model size."""
    by_size: dict[int, list[Job]] = {}
    for job in sweep.jobs:
        if job.model_bytes:
            by_size.setdefault(job.model_bytes, []).append(job)
    if not by_size:
        return None
    if len(by_size) == 1:
        (m, jobs), = by_size.items()
        return f"M = global model size: {m / MiB:.2f} MiB ({m} bytes), the same in every job that reported it"
    parts = []
    for m, jobs in sorted(by_size.items()):
        others = [j for j in sweep.jobs if j.model_bytes and j.model_bytes != m]
        common = {k: str(jobs[0].overrides.get(k)) for k in sweep.varying
                  if len({str(j.overrides.get(k)) for j in jobs}) == 1}
        telling = [f"{k}={v}" for k, v in common.items() if any(str(o.overrides.get(k)) != v for o in others)]
        names = ", ".join(j.name for j in jobs)
        parts.append(f"{m / MiB:.2f} MiB for " + (" ".join(telling) + " " if telling else "")
                     + f"({'job' if len(jobs) == 1 else 'jobs'} {names})")
    return "M = global model size: " + "; ".join(parts)


def sweep_view(sweep: Sweep, filters: list[str] = (), sort: str | None = None) -> View:
    columns, rows = sweep_rows(sweep)
    rows = sort_rows(apply_filters(rows, list(filters), sweep.jobs), sort, columns)
    notes = []
    if sweep.expected_jobs and sweep.expected_jobs > len(sweep.jobs):
        notes.append(f"{sweep.expected_jobs - len(sweep.jobs)} of {sweep.expected_jobs} jobs not started yet")
    sizes = model_sizes(sweep)
    if sizes:
        notes.append(sizes)
    title = (f"sweep {short(sweep.dir)}: {plural(len(sweep.jobs), 'job')}, {sweep.failed} failed, "
             f"{sweep.running} running or incomplete" + (f", {sweep.damaged} damaged" if sweep.damaged else ""))
    return View(title, [Section("jobs", "", columns, rows)], notes,
                {"dir": str(sweep.dir), "varying": sweep.varying})


def _compare_dicts(rows, section: str, repeats: bool) -> list[dict]:
    out = []
    for r in rows:
        d = r.as_dict()
        d["kind"], d["section"], d["repeats"] = r.kind, section, repeats
        if r.within_noise:
            noise = "%.1f MiB" % (r.noise / MiB) if r.kind == "bytes" else \
                f"{r.noise:.3g}" + (" s" if r.kind == "seconds" else "")
            d["note"] = f"within noise (±{noise})" + (f"; {r.note}" if r.note else "")
        out.append(d)
    return out


def compare_view(sweep: Sweep, comparison: Comparison, filters: list[str] = ()) -> View:
    """Two sections: ``comparison`` (per role and job: whole run, setup and FL stage) and ``phases``
    (each phase's peak heap, server and clients max). ``filters`` apply to both (``phase=train``
    keeps that phase's rows; whole-run rows have no phase)."""
    repeats = comparison.repeat_key is not None
    rows = _compare_dicts(comparison.rows, "comparison", repeats) + \
        _compare_dicts(comparison.phase_rows, "phases", repeats)
    if filters:
        rows = apply_filters(rows, list(filters), [])
    key, rk = comparison.key, comparison.repeat_key
    headers = {"before": f"before\n{key}={comparison.before_value}",
               "after": f"after\n{key}={'|'.join(comparison.after_values)}"}
    cols = [replace(c, header=headers.get(c.key, c.header)) for c in COMPARE_COLUMNS]
    cols.insert(cols.index(next(c for c in cols if c.key == "note")), Column("noise", "noise", "row"))
    phase_cols = [replace(c, people=True) if c.key in ("phase", "stage") else c for c in cols]
    notes = ["diff = after - before (memory in MiB, time in s); ratio = after / before; "
             + COLOUR_LEGEND,
             "setup peak heap: the highest heap while loading model and data; FL peak heap: the highest during the "
             "FL rounds; FL working memory = FL peak heap - heap when FL began (what FL adds over setup); "
             "working RSS = peak RSS - RSS at the baseline mark; '-': not recorded (older runs), or a phase "
             "shorter than the snapshot interval that no snapshot fell in (sampled peaks)"]
    if rk:
        notes.append(f"before and after are medians over the jobs that differ only in {rk} (shown as median "
                     f"(min-max, n=repeats)); the spread across repeats counts as measured noise")
    notes += [f"unpaired: {u}" for u in comparison.unpaired]
    notes += [f"problem: job {j.name}: {p}" for j in sweep.jobs for p in j.problems]
    if not comparison.pairs:
        notes.append(f"no pair of jobs differs only in {key}" + (f" (and {rk})" if rk else ""))
    kinds = sorted({exactness(r.summary) for _, a, b in comparison.groups for j in a + b for r in j.roles.values()
                    if summary_phases(r)} - {"-"})
    if kinds:
        notes.append(f"setup, FL and per-phase peaks: {' / '.join(kinds)} (exact: all_allocations capture, memray's "
                     "high-water mark of each interval; sampled: memory snapshots, a shorter spike can be missed)")
    if comparison.pairs and not comparison.phase_rows:
        notes.append("per phase: no phase recorded in these jobs (recorded before phases were marked)")
    n = len(comparison.pairs)
    title = f"sweep {short(sweep.dir)}: {key}={comparison.before_value} (before) vs " \
            f"{key}={'|'.join(comparison.after_values)} (after), {n} pair" + ("" if n == 1 else "s") + \
        (f", medians over {rk}" if rk else "")
    meta = {"dir": str(sweep.dir), "key": key, "before_value": comparison.before_value,
            "after_values": comparison.after_values, "repeat_key": rk,
            "pairs": [{"group": g, "before_job": a[0].name, "after_job": b[0].name,
                       "before_jobs": [j.name for j in a], "after_jobs": [j.name for j in b]}
                      for g, a, b in comparison.groups],
            "unpaired": comparison.unpaired}
    sections = [Section("comparison", "", cols, [r for r in rows if r["section"] == "comparison"]),
                Section("phases", "per phase: peak heap of each phase (baseline included) and, for FL phases, over FL start "
                        "(the peak minus the heap when FL began: what the phase adds over model and data; server, "
                        "clients max)",
                        phase_cols, [r for r in rows if r["section"] == "phases"])]
    return View(title, sections, notes, meta)


def run_view(job: Job, top: int = 5) -> View:
    roles, sites = [], []
    for r in job.roles.values():
        s = r.summary
        capture = "ok" if r.capture_state == "ok" else f"{r.capture_state}: {r.capture_reason}"
        flame = short(r.flamegraph) if r.flamegraph else f"none ({r.flamegraph_reason})"
        roles.append({**{c.key: s.get(c.key) if c.kind == "text" else finite(s.get(c.key)) for c in ROLE_COLUMNS},
                      "role": r.name, "capture": capture,
                      "flamegraph": flame, "exit_code": s.get("exit_code", r.status.get("phase"))})
        for i, site in enumerate((s.get("top_sites") or [])[:top], 1):
            sites.append({**site, "role": r.name, "rank": i, "site": f"{site.get('file')}:{site.get('line')}"})
    client_rounds = job.result.get("client_rounds") or {}
    rounds = []
    for rec in job.rounds:
        per_client = [c for recs in client_rounds.values() if isinstance(recs, list) for c in recs
                      if isinstance(c, dict) and c.get("round") == rec.get("round")]

        def mean(key):  # over the clients that recorded a number: files are untrusted
            values = [v for c in per_client if (v := finite(c.get(key))) is not None]
            return sum(values) / len(values) if values else None

        rounds.append({**rec, "client_train_s": mean("train_s"), "client_loss": mean("loss")})
    m = job.model_bytes
    notes = [f"status: {job.status}" + (f"; failed role {job.failure_text}" if job.failure else ""),
             "overrides: " + (" ".join(f"{k}={v}" for k, v in job.overrides.items()) or "none"),
             "global model M = " + (f"{m / MiB:.2f} MiB ({m} bytes)" if m else "unknown")
             + (f"; run time {job.duration_s:.1f} s" if job.duration_s else "")
             + (f"; final accuracy {job.final_accuracy:.3f}" if job.final_accuracy is not None else "")]
    notes += [f"problem: {p}" for p in job.problems]
    phases = phase_rows(job)
    if phases:
        notes.append("per phase: peak heap includes the baseline (comparable with the role's peak heap); FL stage: "
                     "heap at start = model and data held when FL began, adds = FL peak heap - heap at start "
                     "(FL working memory); working RSS = peak RSS - RSS at the baseline mark")
    notes += exactness_notes(job)
    sections = [Section("roles", "per role (memory in MiB, working memory also in units of M; FL working: what "
                        "the FL stage adds over setup)", ROLE_COLUMNS, roles),
                Section("phases", "per phase (aggregated over rounds) and per stage", PHASE_COLUMNS, phases),
                Section("top_sites", f"top {top} allocation sites per role at the high-water mark", SITE_COLUMNS,
                        sites),
                Section("rounds", "per round (server evaluation of the global model; clients' mean)", ROUND_COLUMNS,
                        rounds)]
    return View(f"run {short(job.dir)}", sections, notes, {"dir": str(job.dir), "status": job.status,
                                                         "failure": job.failure, "overrides": job.overrides,
                                                         "model_bytes": m, "duration_s": job.duration_s,
                                                         "final_accuracy": job.final_accuracy,
                                                         "problems": job.problems})
