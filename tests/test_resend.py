"""A client that fails after part of its update was combined, over real gRPC on 127.0.0.1: on the optimized path the
round's aggregate restarts without it, the clients whose values were used send theirs again, and the new global
model equals the original path's, bit for bit."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import grpc
import pytest
import torch

from flmem import serde
from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.models import SmallCNN
from flmem.proto import flmem_pb2, flmem_pb2_grpc
from flmem.rounds import RoundState, UpdateRefused
from flmem.server import RoundServer
from flmem.strategies import FedAvg, FedMedian
from flmem.trainer import Trainer
from flmem.transport import ServerConnection, serve
from conftest import REPO, TINY, job_dirs, result, run_rounds
from test_transport import DS

CHUNK = 64 * 1024
HOSTILE = 1


def until(predicate, what: str, timeout_s: float = 60) -> None:
    """Wait (bounded) until the in-process server reaches a state."""
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"the server never reached: {what}"
        time.sleep(0.005)


def hostile(address: str, fl: RoundServer, codec: ModelCodec, attack: str, optimized: bool) -> list:
    """Client 1, speaking the protocol itself. Round 0: header and two chunks of an update, then ``attack``:
    ``cancel`` (its stream breaks once those two chunks were combined) or ``past_end`` (a chunk past the end of the
    payload). Round 1: a whole update of fixed weights. Returns the PushReply of round 1."""
    gen = torch.Generator().manual_seed(1)  # not the global generator: the honest clients' training uses it
    weights = {k: (torch.randn(v.shape, generator=gen) * 0.05).to(v.dtype) for k, v in fl.state.items()}
    header, chunks = codec.encode(weights)
    chunks = list(chunks)
    channel = grpc.insecure_channel(address)
    stub = flmem_pb2_grpc.FederatedLearningStub(channel)
    presence = stub.Join(flmem_pb2.JoinRequest(client_rank=HOSTILE))
    try:
        list(stub.FetchGlobalModel(flmem_pb2.FetchRequest(client_rank=HOSTILE, round=0), timeout=60))
        release = threading.Event()

        def messages():
            yield flmem_pb2.ModelChunk(header=serde.dumps_header(header), round=0, client_rank=HOSTILE,
                                       num_samples=40)
            for offset, data in chunks[:2]:
                yield flmem_pb2.ModelChunk(offset=offset, data=data)
            if attack == "past_end":
                yield flmem_pb2.ModelChunk(offset=header["total_bytes"], data=bytes(8))
            else:
                release.wait(60)

        call = stub.PushUpdate.future(messages(), timeout=60)
        if attack == "cancel":
            if not optimized:  # the original path keeps whole updates: any moment will do
                until(lambda: fl.current.status.get(HOSTILE) == "receiving", "client 1 sending")
            elif fl.strategy.combine == "sum":  # client 0's update and two chunks of this one are in the sum
                n = -(-header["total_bytes"] // CHUNK)
                until(lambda: fl.current.status.get(HOSTILE) == "combining" and fl.strategy.running.folds >= n + 2,
                      "two chunks of client 1 in the running sum")
            else:  # chunks 0 and 1 of the new global model hold this client's values
                until(lambda: fl.lockstep is not None and fl.lockstep.index >= 2, "two chunks reduced")
            call.cancel()
            release.set()
        else:  # a refused update gets an error status naming the client
            with pytest.raises(grpc.RpcError) as refused:
                call.result()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"client {HOSTILE}" in refused.value.details()
        list(stub.FetchGlobalModel(flmem_pb2.FetchRequest(client_rank=HOSTILE, round=1), timeout=60))

        def whole():
            yield flmem_pb2.ModelChunk(header=serde.dumps_header(header), round=1, client_rank=HOSTILE,
                                       num_samples=40)
            for offset, data in chunks:
                yield flmem_pb2.ModelChunk(offset=offset, data=data)

        reply = stub.PushUpdate(whole(), timeout=60)
        list(stub.FetchGlobalModel(flmem_pb2.FetchRequest(client_rank=HOSTILE, round=2), timeout=60))
        return [reply]
    finally:
        presence.cancel()
        channel.close()


def job(optimized: bool, strategy, attack: str):
    """A 2-round, 3-client job in this process: clients 0 and 2 honest (run_client), client 1 hostile."""
    torch.manual_seed(0)
    codec = ModelCodec(optimized, optimized, CHUNK, release=optimized)
    fl = RoundServer(SmallCNN(), DS.test_dataset(), strategy=strategy, num_clients=3, rounds=2, codec=codec,
                     streaming=optimized, round_timeout_s=60)
    server, port = serve(fl, "127.0.0.1", 0, 4 * 2**20, max_workers=16)
    histories, errors, replies = {}, [], []

    def honest(rank):
        try:
            trainer = Trainer(SmallCNN(), DS.client_dataset(rank, 3, release=optimized), batch_size=8, local_steps=2,
                              optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), seed=0, rank=rank,
                              optimized=optimized, release=optimized)
            conn = ServerConnection(f"127.0.0.1:{port}", 4 * 2**20, 60)
            conn.wait_ready(10)
            try:
                histories[rank] = run_client(conn, trainer, codec, rank=rank, rounds=2)
            finally:
                conn.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def bad():
        try:
            replies.extend(hostile(f"127.0.0.1:{port}", fl, codec, attack, optimized))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=honest, args=(0,)), threading.Thread(target=bad),
               threading.Thread(target=honest, args=(2,))]
    history = run_rounds(fl, threads, server)
    assert not errors, errors
    assert replies[0].accepted, replies
    return fl.model.state_dict(), history, histories


@pytest.mark.parametrize("attack", ["cancel", "past_end"])
@pytest.mark.parametrize("strategy", [FedAvg, FedMedian])
def test_a_client_failing_mid_update_is_dropped_alone_and_the_round_restarts(strategy, attack):
    original, hist_o, _ = job(False, strategy(), attack)
    optimized, hist_p, clients = job(True, strategy(), attack)
    for key in original:  # the aggregate of clients 0 and 2 (round 0), then of all three (round 1)
        assert torch.equal(original[key], optimized[key]), key
    assert [h["updates"] for h in hist_o] == [h["updates"] for h in hist_p] == [2, 3]
    for history in (hist_o, hist_p):
        (failure,) = history[0]["failures"]
        assert failure["rank"] == HOSTILE and failure["reason"], failure
        assert history[1]["failures"] == [] and history[1]["sampled"] == [0, 1, 2]
    assert hist_o[0]["restarts"] == hist_o[0]["resends"] == 0
    # sum: client 0 was already in the running sum and sends again; coordinate: clients 0 and 2 were both in flight
    asked = [0] if strategy is FedAvg else [0, 2]
    assert hist_p[0]["restarts"] == 1 and hist_p[0]["resends"] == len(asked)
    assert hist_p[1]["restarts"] == hist_p[1]["resends"] == 0
    for rank in (0, 2):
        round0 = clients[rank][0]
        assert round0["accepted"] is True and round0.get("resends", 0) == (1 if rank in asked else 0), round0
    assert hist_o[-1]["test_accuracy"] == hist_p[-1]["test_accuracy"]


def test_a_restart_asks_the_combined_clients_again_and_fails_those_gone():
    state = RoundState(3, [0, 1, 2, 3])
    for rank in (0, 1, 2):
        state.claim(rank)
    state.set(0, "done")
    state.set(1, "done")
    state.set(2, "combining")
    assert state.fail(2, "update refused: ValueError: chunk past the end") == "combining"
    assert state.restart({1: "its connection closed"}) == [0]
    assert state.status == {0: "resend", 1: "failed", 2: "failed", 3: "pending"}
    assert [f["rank"] for f in state.failures] == [2, 1] and "left the job" in state.failures[1]["reason"]
    assert state.pending() == [0, 3] and state.turn() == 0 and not state.settled()
    state.claim(0)  # the same update again
    with pytest.raises(UpdateRefused, match="already sent"):
        state.claim(0)
    state.set(0, "done")
    state.claim(3)
    state.resend(3)  # a chunk-aligned restart: the stream in flight is sent again
    assert state.status[3] == "resend" and state.pending() == [3]
    state.claim(3)
    state.set(3, "done")
    assert state.settled() and state.arrived() == [0, 3]
    assert state.record() == {"sampled": [0, 1, 2, 3], "updates": 2, "failures": state.failures, "refused": [], "restarts": 1,
                              "resends": 2}


def bytes_sent(pid: int) -> int:
    """TCP payload bytes process ``pid`` has sent so far on its open connections (the kernel's count, ``ss``)."""
    lines = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    return sum(int(m.group(1)) for line, info in zip(lines, lines[1:]) if f"pid={pid}," in line
               for m in [re.search(r"bytes_sent:(\d+)", info)] if m)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss to see a client's upload progress")
@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
def test_a_client_killed_while_its_update_is_combined_is_dropped_and_the_job_completes(tmp_path, strategy):
    # A 173 MB model, so that an upload lasts long enough to be caught half sent. Client 1's bytes leave only as
    # fast as the server combines them (flow control holds the rest): into the running sum after client 0's update
    # (fedavg), or chunk by chunk with the others' (fedmedian). Once a quarter of them has left, part of its update
    # is combined, and SIGKILL ends it there.
    model = ["model=transformer", "dataset=tokens", "model.d_model=768", "model.n_layers=6"]
    from flmem.models import DecoderLM
    size = serde.model_bytes(DecoderLM(vocab_size=512, seq_len=64, d_model=768, n_layers=6).state_dict())
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *TINY, *model, "num_clients=3", "rounds=3",
                             f"strategy={strategy}", "client.mode=comm_only", "strategy.min_fit_clients=2", "evaluate=false",
                             "save_global_model=false"], cwd=tmp_path, env=dict(os.environ, COLUMNS="200"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, pid, killed_in = time.time() + 600, None, None
    while time.time() < deadline and proc.poll() is None and killed_in is None:
        if pid is None:
            status = next(tmp_path.glob("outputs/runs/*/roles/client_1/status.json"), None)
            try:
                pid = json.loads(status.read_text()).get("pid") if status else None
            except ValueError:
                pass
            continue
        sent = bytes_sent(pid)
        if size // 4 < sent % size < 3 * size // 4:  # round k's upload half sent (fetch requests are bytes)
            os.kill(pid, signal.SIGKILL)
            killed_in = sent // size
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=600)
    assert killed_in is not None, f"client 1 was never caught half way through an upload:\n{out}"
    res = result(job_dirs(tmp_path)[0])
    assert proc.returncode == 0 and res["status"] == "completed", out
    assert [f["role"] for f in res["client_failures"]] == ["client_1"] and res["exit_codes"]["client_1"] == -9
    rounds = res["rounds"]
    hit = rounds[killed_in]
    assert [f["rank"] for f in hit["failures"]] == [1] and hit["updates"] == 2, hit
    # fedavg: client 0's update was in the sum, it is sent again; fedmedian: clients 0 and 2 were sending
    assert hit["restarts"] == 1 and hit["resends"] == (1 if strategy == "fedavg" else 2), hit
    assert all(r["updates"] == 3 and r["restarts"] == 0 for r in rounds[:killed_in])
    assert all(r["sampled"] == [0, 2] and r["updates"] == 2 for r in rounds[killed_in + 1:])
    # a restart allocates nothing (the sum is zeroed in its own storage): the strategies' targets hold (exact peak)
    chunks = 0 if strategy == "fedavg" else 3 * 262144 / size  # N chunks of transport.chunk_size
    assert res["roles"]["server"]["working_heap_in_M"] <= 2.5 + chunks, res["roles"]["server"]
