"""The benchmark: run experiment sweeps (``conf/experiment/*.yaml``) and write BENCHMARKS.md from what they measured.

    python -m flmem.bench                                   # every default experiment, then BENCHMARKS.md
    python -m flmem.bench --experiments resnet_scaling --repeats 3
    python -m flmem.bench --tables-only                     # rebuild BENCHMARKS.md from runs on disk

Each experiment is a Hydra sweep (``launch.py -m +experiment=NAME repeat=0,..``) into
``--root/NAME``. Rows group the jobs that differ only in ``repeat``; every number is the median
over the row's completed runs, followed by its range (min-max) when there was more than one run,
e.g. ``11.7 (10.9-14.9)``. Units: MiB (2**20 bytes), M (the model's bytes), seconds, MiB/s.

The report is never rebuilt from nothing: an experiment without runs under ``--root`` keeps its
section from the current report (``--out``); when it has none there either, nothing is written and
the command exits with status 2, naming the root and the experiments it found no runs of.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import memray
import torch

REPO = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """The report cannot be written as asked (no runs to build a section from); the message says why."""

DEFAULT_EXPERIMENTS = ["resnet_scaling", "client_overhead:3", "large_model", "profiling_overhead:3", "round_time",
                       "repeat_spread:3", "strategies", "tls_cost"]
MiB = 2**20


def run_experiment(name: str, repeats: int, root: Path, extra: list[str]) -> Path:
    """Run one experiment's sweep; returns its sweep directory. Failed jobs are kept and reported."""
    sweep = root / name
    if sweep.exists():
        raise SystemExit(f"{sweep} exists; pick another --root (runs are never overwritten)")
    # repeats=1 leaves `repeat` to the experiment (one may sweep it itself, interleaved with its other keys)
    reps = [f"repeat={','.join(str(r) for r in range(repeats))}"] if repeats > 1 else []
    cmd = [sys.executable, str(REPO / "launch.py"), "-m", f"+experiment={name}", *reps,
           f"hydra.sweep.dir={sweep}", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)
    shown = ["python launch.py", *cmd[2:]]
    (sweep / "bench_command.txt").write_text(" ".join(shown) + "\n")
    return sweep


def load_jobs(sweep: Path) -> list[dict]:
    jobs = []
    for path in sorted(sweep.glob("*/result.json")):
        res = json.loads(path.read_text())
        res["params"] = dict(o.split("=", 1) for o in res.get("overrides", []) if "=" in o)
        jobs.append(res)
    return jobs


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _spread(values) -> tuple | None:
    """``(median, min, max, n)`` of the values that were measured, or None when none was."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values), len(values)


def _clients(res: dict) -> list[dict]:
    return [s for name, s in res.get("roles", {}).items() if name.startswith("client")]


def job_numbers(res: dict) -> dict:
    """The per-job numbers a benchmark row needs (bytes, seconds; None where not measured)."""
    server = res.get("roles", {}).get("server", {})
    clients = _clients(res)
    rounds = res.get("rounds") or []
    transfers = [t for r in rounds for t in r.get("transfers", []) if t["seconds"] > 0]
    return {
        "M": res.get("model_bytes"),
        "server_peak": server.get("peak_heap_bytes"), "server_base": server.get("baseline_heap_bytes"),
        "server_work": server.get("working_heap_bytes"), "server_rss": server.get("peak_rss_bytes"),
        "client_peak": max((c.get("peak_heap_bytes") or 0 for c in clients), default=None) or None,
        "client_base": max((c.get("baseline_heap_bytes") or 0 for c in clients), default=None) or None,
        "client_work": max((c.get("working_heap_bytes") or 0 for c in clients), default=None) or None,
        "client_rss": max((c.get("peak_rss_bytes") or 0 for c in clients), default=None) or None,
        "round_s": _median([r.get("round_s") for r in rounds]),
        "mib_s": _median([t["bytes"] / MiB / t["seconds"] for t in transfers]),
        "wall_s": max((s.get("duration_s") or 0 for s in res.get("roles", {}).values()), default=None),
        "client_fl_work": max((c.get("fl_working_heap_bytes") or 0 for c in clients), default=None) or None,
    }


def group(jobs: list[dict]) -> dict[tuple, list[dict]]:
    """Jobs keyed by their overrides other than ``repeat`` and ``+experiment``."""
    groups = defaultdict(list)
    for res in jobs:
        key = tuple(sorted((k, v) for k, v in res["params"].items() if k not in ("repeat", "+experiment")))
        groups[key].append(res)
    return groups


def _fmt(value, unit: str = "MiB", model=None) -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / MiB:,.1f}"
    if unit == "M":
        return f"{value / model:.2f}" if model else "-"
    return f"{value:,.2f}"


def fmt_spread(spread: tuple | None, unit: str = "MiB") -> str:
    """A table cell: the median, and ``(min-max)`` after it when more than one run was measured.

    ``unit``: ``MiB`` (bytes shown in MiB, one decimal), ``M`` (a ratio, two decimals) or ``""``
    (seconds or MiB/s, two decimals). ``-`` when nothing was measured.
    """
    if spread is None:
        return "-"
    med, lo, hi, n = spread
    one = (lambda v: _fmt(v, "MiB")) if unit == "MiB" else (lambda v: f"{v:.2f}") if unit == "M" \
        else (lambda v: _fmt(v, ""))
    if n < 2:
        return one(med)
    sep = " to " if lo < 0 or hi < 0 else "-"  # "-1.0--0.5" would read as a typo
    return f"{one(med)} ({one(lo)}{sep}{one(hi)})"


#: (column, field of job_numbers, unit); "work_M" fields are working memory / M, per run.
COLUMN_FIELDS = [("server peak MiB", "server_peak", "MiB"), ("server base MiB", "server_base", "MiB"),
                 ("server working MiB", "server_work", "MiB"), ("server working M", "server_work_M", "M"),
                 ("server RSS MiB", "server_rss", "MiB"), ("client peak MiB", "client_peak", "MiB"),
                 ("client working MiB", "client_work", "MiB"), ("client working M", "client_work_M", "M"),
                 ("client RSS MiB", "client_rss", "MiB"), ("round s", "round_s", ""), ("MiB/s", "mib_s", "")]
COLUMNS = [c for c, _, _ in COLUMN_FIELDS]


def experiment_table(jobs: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    """Header, rows and the medians themselves, keyed like :func:`group`.

    Each cell is the median over the row's completed runs with its range when there was more than
    one (:func:`fmt_spread`); ``runs`` counts those completed runs, ``failed`` names the failures.
    ``medians[key]`` maps every :func:`job_numbers` field to its median, plus ``"runs"`` (the count)
    and ``"ranges"`` (field -> ``(min, max)``).
    """
    groups = group(jobs)
    keys = sorted({k for key in groups for k, _ in key})
    header = [*keys, "runs", "failed", *COLUMNS]
    rows, medians = [], {}
    for key in sorted(groups, key=lambda k: [(a, _num(b)) for a, b in k]):
        done = [j for j in groups[key] if j["status"] == "completed"]
        nums = [job_numbers(j) for j in done]
        for n in nums:  # working memory in units of M per run, so its range is over runs too
            for role in ("server", "client"):
                n[f"{role}_work_M"] = n[f"{role}_work"] / n["M"] if n[f"{role}_work"] is not None and n["M"] else None
        spreads = {f: _spread([n[f] for n in nums]) for f in (nums[0] if nums else {})}
        med = {f: sp[0] if sp else None for f, sp in spreads.items()}
        med["runs"] = len(done)
        med["ranges"] = {f: (sp[1], sp[2]) for f, sp in spreads.items() if sp}
        medians[key] = med
        values = dict(key)
        failed = [j for j in groups[key] if j["status"] != "completed"]
        reason = "; ".join(f"{j['failure']['role']}: {j['failure']['reason']}"[:160] for j in failed)
        rows.append([values.get(k, "") for k in keys] + [str(len(done)), reason or "0"] +
                    [fmt_spread(spreads.get(field), unit) for _, field, unit in COLUMN_FIELDS])
    return header, rows, medians


def _num(text):
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM; "
            f"Python {platform.python_version()}, torch {torch.__version__}, memray {memray.__version__}")


def sections(text: str) -> dict[str, str]:
    """The ``## NAME`` sections of a report, by name, each from its heading to the next (text as is)."""
    found, name, lines = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if name is not None:
                found[name] = "\n".join(lines).rstrip() + "\n"
            name, lines = line[3:].strip(), [line]
        elif name is not None:
            lines.append(line)
    if name is not None:
        found[name] = "\n".join(lines).rstrip() + "\n"
    return found


def write_report(root: Path, experiments: list[str], out: Path, command: str) -> str:
    """Write the markdown report of every experiment sweep under ``root`` to ``out``; returns its text.

    An experiment without job results under ``root`` keeps its section from the current ``out``
    (marked as kept), and so do sections that are not experiments (hand-written notes), so measured
    numbers are never replaced by nothing. Raises BenchError, writing nothing, when an experiment
    has neither runs nor a section to keep.
    """
    from flmem.benchnotes import findings  # derived comparisons (targets), kept apart from the tables

    runs = {name: load_jobs(root / name) for name in experiments}
    previous = out.read_text() if out.is_file() else ""
    old = sections(previous)
    old_machine = next((ln for ln in previous.splitlines() if ln.startswith("Machine: ")), "")
    missing = [name for name in experiments if not runs[name] and name not in old]
    if not any(runs.values()):
        missing = list(experiments)
        raise BenchError(f"no job results (*/result.json) under {root} for any of {', '.join(missing)} (looked in "
                         f"{', '.join(str(root / name) for name in missing)}); {out} was not written. Run the "
                         "benchmark without --tables-only, or point --root at the directory that holds its sweeps")
    if missing:
        looked = ", ".join(str(root / name) for name in missing)
        raise BenchError(f"no job results (*/result.json) under {root} for {', '.join(missing)} (looked in "
                         f"{looked}), and {out} has no section to keep for them; {out} was not written. Run them "
                         f"(python -m flmem.bench --experiments {','.join(missing)}) or point --root at their sweeps")
    parts = ["# flmem benchmarks", "",
             f"Machine: {machine()}.", "", f"Command: `{command}`", "",
             "Every number below was measured by the runs under "
             f"`{root}`; each cell is the median over its row's completed runs (`runs`), followed by the range "
             "(min-max) over those runs when there was more than one. MiB = 2^20 bytes; M = the model's "
             "bytes (sum of numel * element_size over the state dict); working = peak heap - baseline heap "
             "(the heap after imports, before any model or data); client columns are the largest client; "
             "round s = the server's median round wall time; MiB/s = median model-stream rate "
             "(encode + transfer + decode or fold) seen by the server.", ""]
    for name in experiments:
        jobs = runs[name]
        if not jobs:
            kept = old[name].splitlines()
            parts += [kept[0], "", f"Kept from the previous {out.name}: no job results under `{root / name}` "
                      "when this report was written." + (f" Measured on: {old_machine[9:]}" if old_machine else ""),
                      *kept[1:], ""]
            continue
        header, rows, medians = experiment_table(jobs)
        ran = root / name / "bench_command.txt"
        parts += [f"## {name}", ""]
        if ran.exists():
            parts += [f"Sweep: `{ran.read_text().strip()}`", ""]
        parts += [markdown(header, rows), ""]
        parts += findings(name, medians)
    for name, text in old.items():  # hand-written sections (notes) and experiments not rebuilt this time
        if name not in experiments:
            parts += [text.rstrip(), ""]
    text = "\n".join(parts).rstrip() + "\n"
    out.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flmem.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(DEFAULT_EXPERIMENTS),
                        help="comma-separated names of conf/experiment/*.yaml, each optionally NAME:REPEATS")
    parser.add_argument("--repeats", type=int, default=1,
                        help="repetitions of every job without its own :REPEATS (medians are quoted)")
    parser.add_argument("--root", type=Path, default=Path("outputs/bench"), help="where the sweeps go")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--tables-only", action="store_true", help="only rebuild the report from --root")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    plan = {}
    for item in (e for e in args.experiments.split(",") if e):
        name, _, reps = item.partition(":")
        if reps and not reps.isdigit():
            parser.error(f"--experiments item {item!r}: REPEATS must be a whole number, e.g. {name}:3")
        plan[name] = int(reps) if reps else args.repeats
    known = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    unknown = [e for e in plan if e not in known]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    bad = [f"{n}:{r}" for n, r in plan.items() if r < 1]
    if bad:
        parser.error(f"repeats must be at least 1: {', '.join(bad)}")
    experiments = list(plan)
    if not args.tables_only:
        for name, repeats in plan.items():
            run_experiment(name, repeats, args.root, args.overrides)
    command = "python -m flmem.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        write_report(args.root, experiments, args.out, command.strip())
    except BenchError as exc:
        print(f"python -m flmem.bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
