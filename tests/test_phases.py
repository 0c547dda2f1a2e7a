"""Phase marks and per-phase memory: real tiny jobs (sampled and exact), and the arithmetic on its own."""
import json

import memray
import pytest

from flmem.phase_summary import summarize_phases, valid_phases
from flmem.profiling import summarize_role
from tests.conftest import TINY, job_dirs, launch, result

ROUNDS = 2  # TINY's rounds
ROLES = ["server", "client_0", "client_1"]


def run_tiny(tmp_path_factory, name, extra):
    cwd = tmp_path_factory.mktemp(name)
    proc = launch([*TINY, "profiling.flamegraph=false", *extra], cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = job_dirs(cwd)
    return job, proc


@pytest.fixture(scope="module")
def sampled_job(tmp_path_factory):
    return run_tiny(tmp_path_factory, "sampled", [])


@pytest.fixture(scope="module")
def exact_job(tmp_path_factory):
    return run_tiny(tmp_path_factory, "exact", ["profiling.capture_format=all_allocations"])


def read(job, role, name):
    return json.loads((job / "roles" / role / name).read_text())


def expected_rounds(role):
    if role == "server":
        per_round = {"receive": list(range(ROUNDS)), "aggregate": list(range(ROUNDS)),
                     "evaluate": list(range(ROUNDS)), "serve final": [ROUNDS]}
        return ["model", "data", "connect"], per_round, ["save", "shutdown"]
    per_round = {"fetch": list(range(ROUNDS + 1)), "train": list(range(ROUNDS)), "push": list(range(ROUNDS))}
    return ["model", "data", "connect"], per_round, ["shutdown"]


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_markers_hold_each_phase_in_time_order(sampled_job, role):
    job, _ = sampled_job
    markers = read(job, role, "markers.json")
    phases = markers["phases"]
    setup, per_round, teardown = expected_rounds(role)
    assert [p["phase"] for p in phases if p["stage"] == "setup"] == setup
    assert [p["phase"] for p in phases if p["stage"] == "teardown"] == teardown
    for name, rounds in per_round.items():
        assert [p["round"] for p in phases if p["phase"] == name] == rounds, name
        assert all(p["stage"] == "fl" for p in phases if p["phase"] == name)
    assert all(p["round"] is None for p in phases if p["stage"] != "fl")
    stages = [p["stage"] for p in phases]
    assert stages == sorted(stages, key=["setup", "fl", "teardown"].index)
    assert markers["baseline_ms"] <= phases[0]["start_ms"]
    for before, after in zip(phases, phases[1:]):
        assert before["start_ms"] <= before["end_ms"] <= after["start_ms"] <= after["end_ms"]
    fl = [p for p in phases if p["stage"] == "fl"]
    for before, after in zip(fl, fl[1:]):  # the FL phases follow each other: no memory falls between them
        # (no code runs between two phases but a loop step; on a loaded machine the OS may still
        # deschedule the role there, hence the slack)
        assert after["start_ms"] - before["end_ms"] < 250.0
    assert phases[-1]["end_ms"] <= markers["end_ms"]
    assert markers["baseline_rss_bytes"] > 50 * 2**20  # torch alone is more


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_sampled_phase_peaks_add_up(sampled_job, role):
    job, proc = sampled_job
    s, markers = read(job, role, "summary.json"), read(job, role, "markers.json")
    assert result(job)["roles"][role]["phases"] == s["phases"]
    names = list(dict.fromkeys(p["phase"] for p in markers["phases"]))
    assert [p["phase"] for p in s["phases"]] == names
    counts = {n: sum(p["phase"] == n for p in markers["phases"]) for n in names}
    assert {p["phase"]: p["count"] for p in s["phases"]} == counts
    assert s["phase_peaks"] == "sampled" and s["memory_interval_ms"] == 5
    assert not any(p["exact"] for p in s["phases"])
    for p in s["phases"]:
        assert p["seconds"] >= 0
        if p["samples"] == 0:
            assert p["peak_heap_bytes"] is None and p["peak_rss_bytes"] is None
        else:
            assert s["baseline_heap_bytes"] < p["peak_heap_bytes"] <= s["peak_heap_bytes"]
            assert p["peak_rss_bytes"] <= s["peak_rss_bytes"]
    by_stage = {st: [p["peak_heap_bytes"] for p in s["phases"] if p["stage"] == st and p["peak_heap_bytes"]]
                for st in ("setup", "fl")}
    assert max(by_stage["setup"]) == s["setup_peak_heap_bytes"]
    assert max(by_stage["fl"]) == s["fl_peak_heap_bytes"]
    # The training loop's samples: far more than one per train phase at 5 ms.
    if role != "server":
        assert next(p for p in s["phases"] if p["phase"] == "train")["samples"] >= ROUNDS
    assert s["baseline_heap_bytes"] < s["fl_start_heap_bytes"] <= s["fl_peak_heap_bytes"]
    assert s["fl_working_heap_bytes"] == s["fl_peak_heap_bytes"] - s["fl_start_heap_bytes"]
    assert s["fl_working_heap_in_M"] == pytest.approx(s["fl_working_heap_bytes"] / s["model_bytes"])
    assert s["fl_peak_rss_bytes"] <= s["peak_rss_bytes"]
    assert s["run_peak_rss_bytes"] == max(s["peak_rss_bytes"] - (s["exit_rss_growth_bytes"] or 0),
                                          s["sampled_peak_rss_bytes"])
    assert s["fl_peak_rss_bytes"] <= s["run_peak_rss_bytes"] <= s["peak_rss_bytes"]
    assert s["working_rss_bytes"] == s["run_peak_rss_bytes"] - s["baseline_rss_bytes"] > 0
    # The launcher reaped the role with wait4: its ru_maxrss at the very end is on record. It speaks for the
    # role only above what the process inherited from the launcher through exec.
    assert isinstance(markers["final_max_rss_bytes"], int)
    if markers["final_max_rss_bytes"] > markers["inherited_max_rss_bytes"]:
        assert s["final_max_rss_bytes"] == markers["final_max_rss_bytes"] and s["final_max_rss_note"] is None
        assert s["peak_rss_bytes"] >= s["final_max_rss_bytes"]
    else:
        assert s["final_max_rss_bytes"] is None and "masked" in s["final_max_rss_note"]
    assert s["peak_rss_bytes"] >= markers["max_rss_bytes"]
    growth = s["rss_breakdown"]["growth"]
    assert growth["threads"] > 0  # gRPC's threads at least
    assert growth["rss_anon_bytes"] > 0 and growth["malloc_free_held_bytes"] >= 0
    assert "FL working MiB" in proc.stdout and "working RSS MiB" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_exact_phase_peaks_hold_the_high_water_mark(exact_job, role):
    job, _ = exact_job
    s = read(job, role, "summary.json")
    assert memray.FileReader(str(job / "roles" / role / "capture.bin")).metadata.file_format \
        == memray.FileFormat.ALL_ALLOCATIONS
    assert s["phase_peaks"] == "exact"
    # a phase is exact when a snapshot fell inside it, else its peak is its interval's: an upper bound
    assert all(p["exact"] != bool(p.get("upper_bound")) and (p["samples"] > 0 or not p["exact"])
               for p in s["phases"])
    assert any(p["exact"] for p in s["phases"] if p["stage"] == "fl")
    peaks = [p["peak_heap_bytes"] for p in s["phases"]]
    assert None not in peaks  # every phase overlaps at least one snapshot interval
    assert max(peaks) == s["peak_heap_bytes"]
    assert max(p["peak_heap_bytes"] for p in s["phases"] if p["stage"] == "fl") == s["fl_peak_heap_bytes"]
    assert max(p["peak_heap_bytes"] for p in s["phases"] if p["stage"] == "setup") == s["setup_peak_heap_bytes"]
    assert s["fl_working_heap_bytes"] == s["fl_peak_heap_bytes"] - s["fl_start_heap_bytes"] > 0


# ------------------------------------------------------------------------ the arithmetic alone
PHASES = [{"phase": "model", "stage": "setup", "round": None, "start_ms": 1000.2, "end_ms": 1004.5},
          {"phase": "fetch", "stage": "fl", "round": 0, "start_ms": 1004.6, "end_ms": 1010.0},
          {"phase": "train", "stage": "fl", "round": 0, "start_ms": 1010.0, "end_ms": 1010.4},
          {"phase": "fetch", "stage": "fl", "round": 1, "start_ms": 1010.4, "end_ms": 1030.0}]
# (time_ms, rss, tracked heap): memray stamps whole milliseconds, truncated.
SNAPSHOTS = [(1000, 10, 1), (1003, 11, 5), (1008, 12, 3), (1020, 13, 9), (1025, 14, 2)]


def test_sampled_peaks_take_the_largest_snapshot_inside_each_phase():
    out = summarize_phases(PHASES, SNAPSHOTS, offset=100, model_bytes=2, interval_ms=5)
    by = {p["phase"]: p for p in out["phases"]}
    assert [p["phase"] for p in out["phases"]] == ["model", "fetch", "train"]
    assert by["model"] == {"phase": "model", "stage": "setup", "count": 1, "seconds": pytest.approx(0.0043),
                           "peak_heap_bytes": 105, "peak_rss_bytes": 11, "samples": 2, "exact": False}
    assert by["fetch"]["count"] == 2 and by["fetch"]["peak_heap_bytes"] == 109 and by["fetch"]["samples"] == 3
    assert by["train"]["peak_heap_bytes"] is None and by["train"]["samples"] == 0  # shorter than the interval
    assert out["setup_peak_heap_bytes"] == 105 and out["fl_peak_heap_bytes"] == 109 and out["fl_peak_rss_bytes"] == 14
    assert out["fl_start_heap_bytes"] == 105  # the last snapshot before FL began
    assert out["fl_working_heap_bytes"] == 4 and out["fl_working_heap_in_M"] == 2.0
    assert out["phase_peaks"] == "sampled" and out["memory_interval_ms"] == 5


def test_exact_peaks_take_every_interval_that_overlaps_a_phase():
    # hwm[i]: the high-water mark between snapshot i-1 and snapshot i; the last runs to the capture's end.
    hwm = [4, 7, 6, 20, 9, 3]
    out = summarize_phases(PHASES, SNAPSHOTS, hwm=hwm, offset=100)
    by = {p["phase"]: p for p in out["phases"]}
    assert by["model"]["peak_heap_bytes"] == 107  # intervals 0-2: the one ending at 1008 straddles into fetch
    assert by["train"]["peak_heap_bytes"] == 120  # inside the interval 1008..1020, whose peak is 20
    assert not by["train"]["exact"] and by["train"]["upper_bound"]  # no snapshot inside: an upper bound
    assert by["fetch"]["peak_heap_bytes"] == 120 and by["fetch"]["exact"] and by["model"]["exact"]
    assert out["phase_peaks"] == "exact" and out["fl_peak_heap_bytes"] == 120


def test_summary_of_a_role_without_capture_or_with_torn_markers_has_none_values(tmp_path):
    (tmp_path / "markers.json").write_text(json.dumps({
        "start_ms": 1, "end_ms": 2, "max_rss_bytes": 5000, "baseline_rss_bytes": 4000,
        "inherited_max_rss_bytes": 9000, "final_max_rss_bytes": 8000,
        "phases": [{"phase": "x"}, "junk", {"phase": "model", "stage": "setup", "start_ms": 3, "end_ms": 1}]}))
    s = summarize_role(tmp_path, "client_0", model_bytes=10)
    assert s["phases"] == [] and s["fl_peak_heap_bytes"] is None and s["phase_peaks"] is None
    assert s["final_max_rss_bytes"] is None and "masked" in s["final_max_rss_note"]
    assert s["peak_rss_bytes"] == 5000 and s["working_rss_bytes"] == 1000 and s["rss_breakdown"] is None
    assert "no capture file" in s["capture_error"]
    assert valid_phases([{"phase": "a", "stage": "fl", "start_ms": "1", "end_ms": 2}])[0]["start_ms"] == 1.0
    (tmp_path / "markers.json").write_text("[1, 2")
    assert summarize_role(tmp_path, "server")["phases"] == []


def test_without_a_capture_phases_keep_their_counts_and_seconds_but_no_peaks(tmp_path):
    (tmp_path / "markers.json").write_text(json.dumps({"phases": PHASES, "baseline_rss_bytes": 100,
                                                       "max_rss_bytes": 300}))
    s = summarize_role(tmp_path, "client_0", model_bytes=10)
    assert [(p["phase"], p["count"], p["peak_heap_bytes"], p["samples"]) for p in s["phases"]] == [
        ("model", 1, None, 0), ("fetch", 2, None, 0), ("train", 1, None, 0)]
    assert s["phase_peaks"] is None and s["fl_peak_heap_bytes"] is None and s["fl_working_heap_bytes"] is None
    assert s["working_rss_bytes"] == 200 and s["final_max_rss_bytes"] is None
