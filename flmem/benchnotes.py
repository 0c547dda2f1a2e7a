"""Comparisons derived from an experiment's medians, written under its table in BENCHMARKS.md.

Each function takes ``medians`` as built by :func:`flmem.bench.experiment_table` (a dict keyed by
sorted ``(override, value)`` tuples) and returns markdown lines. Only measured numbers are used;
where a number is missing the line says so. Working memory in units of M is quoted as its median
with the range over runs, ``2.35 (2.31-2.40)``, when the row had more than one run.
"""
from __future__ import annotations

MiB = 2**20


def _pick(medians: dict, **want) -> dict | None:
    for key, med in medians.items():
        params = dict(key)
        if all(str(params.get(k, "")).lower() == str(v).lower() for k, v in want.items()):
            return med
    return None


def _in_m(med: dict | None, field: str) -> float | None:
    if med and med.get(f"{field}_M") is not None:
        return med[f"{field}_M"]  # the median of the per-run ratios
    if not med or med.get(field) is None or not med.get("M"):
        return None
    return med[field] / med["M"]


def _in_m_text(med: dict | None, field: str) -> str:
    """``field`` in units of M: the median, with ``(min-max)`` over runs when there was more than one."""
    value = _in_m(med, field)
    span = (med or {}).get("ranges", {}).get(f"{field}_M")
    if value is None or not span or (med or {}).get("runs", 1) < 2:
        return _f(value)
    return f"{value:.2f} ({span[0]:.2f}-{span[1]:.2f})"


def _f(value, fmt="{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _reduction(before, after) -> float | None:
    return None if before in (None, 0) or after is None else 1 - after / before


def resnet_scaling(medians: dict) -> list[str]:
    ns = sorted({int(dict(k)["num_clients"]) for k in medians if "num_clients" in dict(k)})
    lines = ["Server working memory in units of M, by number of clients:", "",
             "| path | " + " | ".join(f"N={n}" for n in ns) + " | growth N=%d to N=%d |" % (ns[0], ns[-1]),
             "|---|" + "---|" * (len(ns) + 1)]
    for label, flag in (("optimized", True), ("original", False)):
        picked = [_pick(medians, num_clients=n, optimize=flag) for n in ns]
        values = [_in_m(med, "server_work") for med in picked]
        growth = None if None in (values[0], values[-1]) else values[-1] - values[0]
        lines.append(f"| {label} | " + " | ".join(_in_m_text(med, "server_work") for med in picked)
                     + f" | {_f(growth, '{:+.2f}')} M |")
    lines.append("")
    n = 4 if 4 in ns else ns[0]
    opt, org = _pick(medians, num_clients=n, optimize=True), _pick(medians, num_clients=n, optimize=False)
    for role in ("server", "client"):
        red = _reduction(org and org.get(f"{role}_work"), opt and opt.get(f"{role}_work"))
        lines.append(f"- N={n}, {role} working memory: original {_in_m_text(org, f'{role}_work')} M, optimized "
                     f"{_in_m_text(opt, f'{role}_work')} M: {_f(red and 100 * red, '{:.0f}')}% lower (medians).")
    for n in ns:
        opt, org = _pick(medians, num_clients=n, optimize=True), _pick(medians, num_clients=n, optimize=False)
        if opt and org and opt.get("round_s") and org.get("round_s"):
            lines.append(f"- N={n}: round wall time optimized/original = {opt['round_s'] / org['round_s']:.2f}.")
    return lines + [""]


def client_overhead(medians: dict) -> list[str]:
    lines = ["FL overhead of a client = its peak heap in `client.mode=train` minus its peak heap in "
             "`client.mode=local_only` (the same training loop without any communication):", ""]
    for label, flag in (("optimized", True), ("original", False)):
        train = _pick(medians, **{"client.mode": "train", "optimize": flag})
        local = _pick(medians, **{"client.mode": "local_only", "optimize": flag})
        if train and local and train.get("client_peak") and local.get("client_peak"):
            over = train["client_peak"] - local["client_peak"]
            lines.append(f"- {label}: {over / MiB:+.1f} MiB = {over / train['M']:+.3f} M.")
        else:
            lines.append(f"- {label}: not measured (a job is missing or failed).")
    return lines + [""]


def large_model(medians: dict) -> list[str]:
    lines = []
    opt, org = _pick(medians, optimize=True), _pick(medians, optimize=False)
    if opt and opt.get("M"):
        lines.append(f"- Optimized path, model of {opt['M'] / 2**30:.2f} GiB: server working memory "
                     f"{_in_m_text(opt, 'server_work')} M, client {_in_m_text(opt, 'client_work')} M, "
                     f"model streams at {_f(opt.get('mib_s'), '{:.0f}')} MiB/s (median).")
    else:
        lines.append("- Optimized path: did not complete (see the failure column).")
    if org is not None and org.get("M"):
        lines.append(f"- Original path completed: server working memory {_in_m_text(org, 'server_work')} M.")
    else:
        lines.append("- Original path: stopped early (see the failure column: the 2 GiB protobuf message limit).")
    return lines + [""]


def profiling_overhead(medians: dict) -> list[str]:
    on, off = _pick(medians, **{"profiling.enabled": True}), _pick(medians, **{"profiling.enabled": False})
    if not (on and off and on.get("wall_s") and off.get("wall_s")):
        return ["- Profiling overhead: not measured (a job is missing or failed).", ""]
    lines = [f"- Role wall time, profiled / unprofiled: {on['wall_s'] / off['wall_s']:.2f} "
             f"({on['wall_s']:.1f} s / {off['wall_s']:.1f} s)."]
    if on.get("round_s") and off.get("round_s"):
        lines.append(f"- Round wall time, profiled / unprofiled: {on['round_s'] / off['round_s']:.2f}.")
    lines.append(f"- Peak RSS recorded with profiling off: server {_f(off.get('server_rss') and off['server_rss'] / MiB, '{:.0f}')} "
                 f"MiB, client {_f(off.get('client_rss') and off['client_rss'] / MiB, '{:.0f}')} MiB.")
    return lines + [""]


def round_time(medians: dict) -> list[str]:
    opt, org = _pick(medians, optimize=True), _pick(medians, optimize=False)
    if not (opt and org and opt.get("round_s") and org.get("round_s")):
        return ["- Round wall time: not measured (a job is missing or failed).", ""]
    return [f"- Median round wall time: optimized {opt['round_s']:.2f} s, original {org['round_s']:.2f} s: "
            f"ratio optimized/original = {opt['round_s'] / org['round_s']:.2f}.", ""]


def tls_cost(medians: dict) -> list[str]:
    """Round time and model-stream rate with TLS against without, as ratios of the medians."""
    on, off = _pick(medians, **{"security.tls": True}), _pick(medians, **{"security.tls": False})
    if not (on and off and on.get("round_s") and off.get("round_s") and on.get("mib_s") and off.get("mib_s")):
        return ["- TLS cost: not measured (a job is missing or failed).", ""]
    return [f"- Median round wall time: TLS {on['round_s']:.2f} s, plaintext {off['round_s']:.2f} s: ratio "
            f"TLS/plaintext = {on['round_s'] / off['round_s']:.2f}.",
            f"- Median model-stream rate: TLS {on['mib_s']:.1f} MiB/s, plaintext {off['mib_s']:.1f} MiB/s: ratio "
            f"TLS/plaintext = {on['mib_s'] / off['mib_s']:.2f}.", ""]


def repeat_spread(medians: dict) -> list[str]:
    """How much working memory varies between repeats of the same job, per path and role."""
    lines = []
    for role in ("server", "client"):
        parts = []
        for label, flag in (("original", False), ("optimized", True)):
            med = _pick(medians, optimize=flag)
            span = (med or {}).get("ranges", {}).get(f"{role}_work_M")
            width = None if not span else span[1] - span[0]
            parts.append(f"{label} {_in_m_text(med, f'{role}_work')} M (spread {_f(width)} M over "
                         f"{(med or {}).get('runs', 'n/a')} runs)")
        lines.append(f"- {role} working memory: " + "; ".join(parts) + ".")
    lines += ["- On the original path concurrency decides how many client models the server holds at once, "
              "so its peak varies between repeats; the optimized server folds one update at a time.", ""]
    return lines


#: strategy -> (role, what the target bounds, bound in M, plus N chunks?) for the optimized path on ResNet-18
STRATEGY_TARGETS = {"fedavg": ("server", 2.5, False), "fedadam": ("server", 4.5, False),
                    "fedmedian": ("server", 2.5, True)}
CHUNK_BYTES = 262144  # transport.chunk_size (the experiment keeps the default)


def strategies(medians: dict) -> list[str]:
    """Working memory per strategy and path, by N, with the optimized path's targets marked met or missed."""
    ns = sorted({int(dict(k)["num_clients"]) for k in medians if "num_clients" in dict(k)})
    names = sorted({dict(k)["strategy"] for k in medians if "strategy" in dict(k)})
    lines = ["Working memory in units of M (peak heap minus the baseline, sampled peak), by number of clients:", "",
             "| strategy | path | " + " | ".join(f"server N={n}" for n in ns) + " | "
             + " | ".join(f"client N={n}" for n in ns) + " |", "|---|---|" + "---|" * (2 * len(ns))]
    for name in names:
        for label, flag in (("original", False), ("optimized", True)):
            picked = [_pick(medians, strategy=name, num_clients=n, optimize=flag) for n in ns]
            lines.append(f"| {name} | {label} | " + " | ".join(_in_m_text(m, "server_work") for m in picked) + " | "
                         + " | ".join(_in_m_text(m, "client_work") for m in picked) + " |")
    lines += ["", "Targets of the optimized path (server working memory, ResNet-18):", ""]
    for name, (role, bound, chunks) in STRATEGY_TARGETS.items():
        for n in ns:
            med = _pick(medians, strategy=name, num_clients=n, optimize=True)
            limit = bound + (n * CHUNK_BYTES / med["M"] if chunks and med and med.get("M") else 0)
            value = _in_m(med, f"{role}_work")
            verdict = "n/a" if value is None else "met" if value <= limit else "missed"
            lines.append(f"- {name}, N={n}: {role} working {_f(value)} M, target <= {limit:.2f} M"
                         f"{' (2.5 M + N chunks of 256 KiB)' if chunks else ''}: {verdict}.")
    for n in ns:
        prox, avg = (_pick(medians, strategy=s, num_clients=n, optimize=True) for s in ("fedprox", "fedavg"))
        a, b = _in_m(prox, "client_fl_work"), _in_m(avg, "client_fl_work")
        diff = None if None in (a, b) else a - b
        verdict = "n/a" if diff is None else "met" if diff <= 1.1 else "missed"
        lines.append(f"- fedprox, N={n}: client FL working memory {_f(a)} M vs fedavg's {_f(b)} M: "
                     f"{_f(diff, '{:+.2f}')} M, target <= +1.1 M: {verdict}.")
    lines.append("- Rank-order folding (the optimized sum path adds updates in rank order, so the global model is "
                 "the same bits run to run): an update that arrives before a lower rank's waits in gRPC's window "
                 "(`queued_s`). The round then ends at most N-1 folds later than folding in arrival order would "
                 "(the updates queued behind the last to arrive); that bound, from the measured fold rate:")
    for n in ns:
        med = _pick(medians, strategy="fedavg", num_clients=n, optimize=True)
        if med and med.get("mib_s") and med.get("M") and med.get("round_s"):
            bound = (n - 1) * med["M"] / MiB / med["mib_s"]
            lines.append(f"  - fedavg, N={n}: (N-1) x {med['M'] / MiB:.1f} MiB / {med['mib_s']:.1f} MiB/s = "
                         f"{bound:.2f} s, {100 * bound / med['round_s']:.0f}% of the median round "
                         f"({med['round_s']:.2f} s).")
    return lines + [""]


def findings(name: str, medians: dict) -> list[str]:
    """Markdown lines of derived comparisons for experiment ``name`` (none for unknown experiments)."""
    fn = {"resnet_scaling": resnet_scaling, "client_overhead": client_overhead, "large_model": large_model,
          "profiling_overhead": profiling_overhead, "round_time": round_time,
          "repeat_spread": repeat_spread, "strategies": strategies, "tls_cost": tls_cost}.get(name)
    return fn(medians) if fn else []
