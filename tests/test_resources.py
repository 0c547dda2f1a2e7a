"""Bounded server resources against a hostile client over real gRPC on 127.0.0.1: calls beyond the job's cap are
refused at once, fetches for rounds out of reach and second fetches of one client are refused at once, idle
streams end after ``timeouts.idle_s`` and free the fold slot, waiting handlers return when the run ends (the
server process exits), and a round that fails says who arrived, who was late and who held it up."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from hostile import Hostile, Job, wait_until

from flmem.channel import SPARE_RPCS, max_rpcs
from flmem.transport import ServerConnection, TransportError

HERE = Path(__file__).resolve().parent


def rpc_error(call, stream: bool = False, timeout_s: float = 10) -> grpc.RpcError:
    """The error a call ended with: a push's future, or (``stream``) a fetch stream read to its end."""
    if not stream:
        exc = call.exception(timeout=timeout_s)
    else:
        try:
            for _ in call:
                pass
            exc = None
        except grpc.RpcError as err:
            exc = err
    assert isinstance(exc, grpc.RpcError), f"the call ended without an error: {exc!r}"
    return exc


def test_calls_beyond_the_cap_are_refused_at_once_and_the_spare_leaves_a_job_room():
    job = Job(num_clients=1)
    hostile = Hostile(job.port)
    try:
        cap = max_rpcs(1)
        calls = [hostile.push() for _ in range(cap + 2)]  # streams that send nothing: each holds a handler thread
        # gRPC may take concurrent calls in any order: whichever two come last are refused, at once
        wait_until(lambda: sum(call.done() for call in calls) >= 2, what="two refusals")
        refused = [call for call in calls if call.done()]
        assert len(refused) == 2
        for call in refused:  # refused by gRPC itself, before any handler: nothing queues for a thread
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "Concurrent RPC limit exceeded" in err.details()
    finally:
        hostile.close()
        job.finish()

    # A stranger holding the spare calls leaves the clients their own three calls each: the job completes.
    job = Job(num_clients=1)
    hostile = Hostile(job.port)
    try:
        held = [hostile.push() for _ in range(SPARE_RPCS)]
        job.honest(0)
        job.start()
        job.finish()
        assert job.error is None and not job.client_errors, (job.error, job.client_errors)
        assert job.history[0]["updates"] == 1 and job.histories[0][0]["accepted"] is True
        assert not any(call.done() for call in held)
    finally:
        hostile.close()


def test_a_fetch_for_a_far_round_is_refused_at_once_and_the_job_goes_on():
    job = Job(num_clients=2, rounds=2)
    hostile = Hostile(job.port)
    try:
        err = rpc_error(hostile.fetch(0, 1), stream=True)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == ("FetchRefused: client 0 asked for the round-1 global model; the server serves round "
                                 "0 (the rounds have not begun) now, or the final model (round 2) after the last "
                                 "round")
        gate = threading.Event()
        job.honest(0, gate)  # holds round 0 open until the far fetches are answered
        job.honest(1)
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        # eight far fetches (more than the spare calls) used to hold every handler thread until the job ended
        for err in [rpc_error(hostile.fetch(1, 2), stream=True) for _ in range(8)]:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.details() == ("FetchRefused: client 1 asked for the round-2 global model; the server serves "
                                     "round 0 (being collected) or 1 (the next one) now, or the final model (round "
                                     "2) after the last round")
        gate.set()
        job.finish()
        assert job.error is None and not job.client_errors, (job.error, job.client_errors)
        assert [h["updates"] for h in job.history] == [2, 2] and job.fl.fetching == set()
    finally:
        hostile.close()
        job.finish()


def test_a_second_fetch_of_one_client_is_refused_and_a_cancelled_fetch_frees_its_place():
    job = Job(num_clients=2)
    hostile = Hostile(job.port)
    try:
        first = hostile.fetch(0, 0)  # round 0 is not published yet: it waits
        wait_until(lambda: 0 in job.fl.fetching, what="the first fetch")
        err = rpc_error(hostile.fetch(0, 0), stream=True)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == ("FetchRefused: client 0 asked for the round-0 global model while its previous fetch "
                                 "is still under way: one fetch at a time per client")
        first.cancel()  # its handler wakes at once (no round is published): the place is free again
        wait_until(lambda: 0 not in job.fl.fetching, what="the cancelled fetch's release")
        again = hostile.fetch(0, 0)
        wait_until(lambda: 0 in job.fl.fetching, what="the next fetch")
        again.cancel()
        wait_until(lambda: not job.fl.fetching, what="the release")
    finally:
        hostile.close()
        job.finish()


def test_a_stalled_update_is_refused_after_idle_s_and_frees_the_fold_slot():
    # Updates are added one at a time in rank order: client 0 stalls with the fold slot, client 1 sends steadily
    # but slowly, the honest client 2 waits for its turn behind both for longer than idle_s (not its doing).
    job = Job(num_clients=3, idle_s=1)
    hostile = Hostile(job.port)
    try:
        presence = [hostile.join(0), hostile.join(1)]
        job.honest(2)
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        header = job.header()
        stalled = hostile.push(Hostile.first(header, 0), stall=True)
        steady = hostile.push(Hostile.first(header, 1), job.chunks(), pace_s=0.3)
        assert steady.result(timeout=60).accepted is True
        err = rpc_error(stalled)
        assert err.code() == grpc.StatusCode.CANCELLED
        for call in presence:  # the hostile ranks leave; the server waits for the honest client's final fetch
            call.cancel()
        job.finish()
        assert job.error is None and not job.client_errors, (job.error, job.client_errors)
        (record,) = job.history
        assert record["sampled"] == [0, 1, 2] and record["updates"] == 2
        (failure,) = record["failures"]
        assert failure["rank"] == 0
        assert failure["reason"].endswith(f"ClientStreamError: client 0 sent nothing for 1 s after {len(header)} "
                                          "bytes (timeouts.idle_s)"), failure
        assert job.histories[2][0]["accepted"] is True
    finally:
        hostile.close()
        job.finish()


def test_a_steady_but_too_slow_update_is_ended_by_the_rate_floor_and_frees_the_fold_slot():
    # Client 0 sends a whole chunk every 0.5 s, never idle for idle_s = 1 s, but at 0.5 MiB/s: under a 1 MiB/s floor
    # it is ended once its waits exceed idle_s + bytes / rate; the honest client 1 waits behind it, then folds.
    job = Job(num_clients=2, idle_s=1, min_rate_bytes_s=2**20)
    hostile = Hostile(job.port)
    try:
        presence = hostile.join(0)
        job.honest(1)
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        header, chunks = job.header(), job.chunks()
        assert len(chunks) >= 8  # long enough to fall under the floor before it ends
        slow = hostile.push(Hostile.first(header, 0), chunks, pace_s=0.5)
        err = rpc_error(slow, timeout_s=60)
        assert err.code() == grpc.StatusCode.CANCELLED
        presence.cancel()
        job.finish()
        assert job.error is None and not job.client_errors, (job.error, job.client_errors)
        (record,) = job.history
        assert record["updates"] == 1 and job.histories[1][0]["accepted"] is True
        (failure,) = record["failures"]
        assert failure["rank"] == 0 and "less than 1 MiB/s after the first 1 s (transport.min_upload_mib_s, " \
            "timeouts.idle_s)" in failure["reason"], failure
        assert 0 < failure["bytes_received"] < len(header) + sum(len(c[1]) for c in chunks)
    finally:
        hostile.close()
        job.finish()


def test_a_client_whose_upload_the_server_ended_is_told_why_it_may_have_been():
    job = Job(num_clients=2, idle_s=1)
    conn = ServerConnection(f"127.0.0.1:{job.port}", 4 * 2**20, 60)
    try:
        conn.wait_ready(10)
        conn.join(0)
        job.honest(1)
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        header, chunks = job.codec.encode(job.fl.state)[0], job.chunks()

        def stalling():
            yield chunks[0]
            time.sleep(4)  # past idle_s: the server cancels the stream
            yield from chunks[1:]

        with pytest.raises(TransportError) as ended:
            conn.push(0, 0, 40, header, stalling())
        assert "CANCELLED" in str(ended.value) and "timeouts.idle_s" in str(ended.value)
        assert "transport.min_upload_mib_s" in str(ended.value)
    finally:
        conn.close()
        job.finish()


def test_an_upload_cut_off_by_its_client_is_refused_naming_the_client_and_the_bytes():
    job = Job(num_clients=2, optimized=False)  # the original path reads each stream as it arrives
    hostile, uploader = Hostile(job.port), Hostile(job.port)
    try:
        presence = hostile.join(0)
        job.honest(1)
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        header, chunks = job.header(), job.chunks()
        stalled = threading.Event()
        upload = uploader.push(Hostile.first(header, 0), chunks[:2], stall=True, stalled=stalled)  # noqa: F841
        wait_until(lambda: job.fl.current.status[0] == "receiving" and stalled.is_set(), what="client 0's upload")
        uploader.channel.close()  # its connection drops mid-upload, as when its process is killed
        wait_until(lambda: job.fl.current is None or job.fl.current.status[0] == "failed", what="the refusal")
        presence.cancel()
        job.finish()
        assert job.error is None and not job.client_errors, (job.error, job.client_errors)
        (record,) = job.history
        assert record["updates"] == 1
        (failure,) = record["failures"]
        # what the server had received when the connection dropped: the header and 0, 1 or 2 whole chunks
        received = [len(header) + sum(len(data) for _, data in chunks[:k]) for k in range(3)]
        reasons = [f"ClientStreamError: client 0's stream was cancelled after {n} bytes (the client process exited "
                   "or its network failed)" for n in received]
        assert failure["rank"] == 0 and any(failure["reason"].endswith(r) for r in reasons), failure
    finally:
        hostile.close()
        uploader.close()
        job.finish()


def test_a_fetch_the_client_stops_reading_ends_after_idle_s():
    job = Job(num_clients=1, chunk_size=16 * 1024, idle_s=1)
    hostile = Hostile(job.port)
    try:
        presence = hostile.join(0)
        job.start()
        stream = hostile.fetch(0, 0)
        assert next(stream).header  # then it reads nothing: gRPC's flow control blocks the server's sends
        wait_until(lambda: 0 not in job.fl.fetching, what="the unread fetch's end")
        assert rpc_error(stream, stream=True).code() == grpc.StatusCode.CANCELLED
        assert job.fl.transfers == []  # the model was not sent whole
        presence.cancel()  # then it leaves: the round has no update at all
        job.finish()
        assert str(job.error) == ("round 0: only 0 of 1 client updates arrived (arrived: none), "
                                  "strategy.min_fit_clients=1; late: none. Failed: client 0: left the job: its "
                                  "connection closed (the client process exited or its network failed)")
    finally:
        hostile.close()
        job.finish()


def test_a_round_that_does_not_settle_names_who_arrived_who_was_late_and_who_held_it_up():
    job = Job(num_clients=3, round_timeout_s=2)
    hostile = Hostile(job.port)
    try:
        presence = [hostile.join(k) for k in range(3)]
        job.start()
        wait_until(lambda: job.fl.published == 0, what="round 0")
        header = job.header()
        pushes = [hostile.push(Hostile.first(header, 0), stall=True),  # holds the fold slot (idle_s is 60 s here)
                  hostile.push(Hostile.first(header, 1), job.chunks())]  # whole, waiting for its turn
        # client 2 sends nothing: late after timeouts.round_s
        wait_until(lambda: [job.fl.current.status[k] for k in (0, 1)] == ["combining", "receiving"],
                   what="both pushes under way")
        job.threads[0].join(60)
        assert str(job.error) == ("round 0: 0 of 3 client updates arrived within 2 x timeouts.round_s = 4 s "
                                  "(arrived: none); client 0 was still sending its update; client(s) [1] waited "
                                  "for their turn behind it; late: client 2 (no update within 2 s "
                                  "(timeouts.round_s)). Failed: none")
        # the update waiting for its turn is refused at once when the run ends (the stalled one ends with the server)
        refused = rpc_error(pushes[1])
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "client 1" in refused.details() and refused.details().endswith("bytes: RuntimeError: the server stopped")
        for call in presence:
            call.cancel()
    finally:
        hostile.close()
        job.finish()


def test_a_fetch_waiting_when_the_run_fails_returns_at_once():
    job = Job(num_clients=1, round_timeout_s=1)  # no client joins: round 0 cannot begin
    hostile = Hostile(job.port)
    try:
        waiting = hostile.fetch(0, 0, timeout_s=60)
        wait_until(lambda: 0 in job.fl.fetching, what="the fetch")
        job.start()
        job.threads[0].join(60)
        assert "round 0: 0 client(s) available" in str(job.error)
        # nothing else wakes it (the worker's record_error is not called here): run() itself does
        err = rpc_error(waiting, stream=True)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == ("RuntimeError: client 0's fetch of round 0 ended before that round: the server "
                                 "stopped")
        assert job.fl.fetching == set()
    finally:
        hostile.close()
        job.finish()


@pytest.mark.slow
def test_the_server_process_exits_right_after_the_run_with_handlers_pending():
    proc = subprocess.Popen([sys.executable, str(HERE / "pending_handlers.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()  # the script prints its outcomes once run() has returned
        returned = time.monotonic()
        code = proc.wait(timeout=60)  # before: a handler waiting forever kept the process alive
        exited_after_s = time.monotonic() - returned
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, proc.stderr.read()
    outcome = json.loads(line)
    assert outcome["far_fetches"] == ["FAILED_PRECONDITION"] * 8
    assert outcome["error"] is None and outcome["updates"] == 1
    assert outcome["failures"] == [{"rank": 1, "reason": "left the job: its connection closed (the client "
                                                         "process exited or its network failed)"}]
    # the update that waited for its turn was refused when its client left (it used to wait for ever)
    assert outcome["push"].endswith("left the job: its connection closed (the client process exited or its network "
                                    "failed)"), outcome["push"]
    assert exited_after_s < 30, exited_after_s  # gRPC's grace for the stop is 2 s
