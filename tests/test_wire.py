"""Hostile clients against a real RoundServer behind real gRPC on 127.0.0.1.

Each case is one update that a client written here sends with the generated stubs: the update is refused with an
error status naming the client and the reason, its refusal is recorded in the round, the server goes on, and the
honest client's round completes (the global model then equals the honest update, bit for bit). What the server
allocates while it refuses is measured in this process with memray (every thread, gRPC's included).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

import grpc
import memray
import pytest
import torch
from torch import nn

from flmem import serde, wire
from flmem.codec import ModelCodec
from flmem.proto import flmem_pb2, flmem_pb2_grpc
from flmem.server import RoundServer
from flmem.strategies import FedAvg, FedMedian
from flmem.channel import channel_options
from flmem.transport import ServerConnection, serve

CHUNK = 4096  # the tiny model's update is one chunk
MAX_MESSAGE = 65536  # the smallest transport.max_message_bytes the config allows
BOUND = 2**20 + 4 * CHUNK  # bytes the server may allocate while refusing an update (and the test client sending it)
HOSTILE, HONEST = 0, 1  # the hostile client takes the first turn of the rank-ordered sum

# name: (optimization.serde, optimization.transport, optimization.aggregation, strategy)
PATHS = {"optimized-fedavg": (True, True, True, FedAvg), "optimized-fedmedian": (True, True, True, FedMedian),
         "original-fedavg": (False, False, False, FedAvg), "original-fedmedian": (False, False, False, FedMedian),
         "torch-fold-fedavg": (False, True, True, FedAvg), "torch-aligned-fedmedian": (False, True, True, FedMedian)}


class Tiny(nn.Module):
    """Float and integer tensors (BatchNorm's num_batches_tracked), a (32,) bias; about 1.5 KB."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(8, 32)
        self.norm = nn.BatchNorm1d(4)


class Job:
    """A RoundServer (one round, clients 0 and 1) behind real gRPC on 127.0.0.1, its run() in a thread."""

    def __init__(self, path: str, model_fn=Tiny, non_finite="reject", chunk=CHUNK, max_message=MAX_MESSAGE,
                 num_clients=2):
        serde_opt, transport_opt, streaming, strategy = PATHS[path]
        self.model_fn, self.chunk, self.max_message = model_fn, chunk, max_message
        self.codec = ModelCodec(serde_opt, transport_opt, chunk)
        torch.manual_seed(0)
        self.fl = RoundServer(model_fn(), None, strategy=strategy(), num_clients=num_clients, rounds=1,
                              codec=self.codec, streaming=streaming, round_timeout_s=60, non_finite=non_finite)
        self.server, port = serve(self.fl, "127.0.0.1", 0, max_message, max_workers=16, lean=transport_opt)
        self.address = f"127.0.0.1:{port}"
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.channel = grpc.insecure_channel(self.address, options=channel_options(max_message))
        self.stub = flmem_pb2_grpc.FederatedLearningStub(self.channel)

    def _run(self):
        try:
            self.outcome["history"] = self.fl.run()
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            self.outcome["error"] = exc
            self.fl.record_error(exc)

    def connect(self, rank: int) -> ServerConnection:
        conn = ServerConnection(self.address, self.max_message, 60, chunk_size=self.chunk)
        conn.wait_ready(10)
        conn.join(rank)
        return conn

    def fetch_into(self, conn: ServerConnection, round_idx: int, rank: int, model: nn.Module) -> None:
        state = model.state_dict()
        header, _, chunks = conn.fetch(round_idx, rank, wire.header_cap(serde.Layout.of(state)))
        self.codec.receive_into(header, chunks, state)

    def honest_round(self) -> dict:
        """Client 0 takes the one round as an honest client does (its update: the global model + 1) and fetches
        the final model; returns once the run has ended. Returns its update."""
        honest = self.connect(0)
        self.fetch_into(honest, 0, 0, self.model_fn())
        update = shifted(self.fl.model.state_dict())
        assert honest.push(0, 0, 1, *self.codec.encode(update)).accepted
        self.fetch_into(honest, 1, 0, self.model_fn())
        self.thread.join(60)
        return update

    def push(self, messages) -> grpc.RpcError | None:
        try:
            self.stub.PushUpdate(iter(messages), timeout=60)
        except grpc.RpcError as exc:
            return exc
        return None

    def close(self):
        self.server.stop(0)
        self.thread.join(30)
        self.channel.close()


def shifted(state, by=1.0):
    return {k: (v + by).to(v.dtype) for k, v in state.items()}


def stream(header, chunks, rank=HOSTILE, round_idx=0, num_samples=1, header_bytes=None) -> list:
    """The ModelChunk messages of an update: the header (dict, or raw bytes) in one piece, then ``chunks``."""
    raw = header if isinstance(header, bytes) else serde.dumps_header(header)
    first = flmem_pb2.ModelChunk(header=raw, header_bytes=len(raw) if header_bytes is None else header_bytes,
                                 round=round_idx, client_rank=rank, num_samples=num_samples)
    return [first] + [flmem_pb2.ModelChunk(offset=o, data=d) for o, d in chunks]


def encoded(fmt: str, state) -> tuple[dict, list]:
    header, chunks = ModelCodec(fmt == "raw", True, CHUNK).encode(state)
    return header, list(chunks)


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    build: Callable  # (server format, global state) -> messages
    reason: str | Callable  # regex the refusal must match (or server format -> regex)
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    raw_only: bool = False  # a raw tensor-table case (a torch-format server refuses the format first)

    def regex(self, fmt: str) -> str:
        return self.reason(fmt) if callable(self.reason) else self.reason


def _table(fmt, g, edit):
    header, chunks = encoded(fmt, g)
    table = header["tensors"]
    edit(table)
    return stream(header, chunks)


def _with(fmt, g, **tensors):
    state = dict(g)
    for name, value in tensors.items():
        state[name] = value
    return stream(*encoded(fmt, state))


def _chunk_at(fmt, g, offset):
    header, chunks = encoded(fmt, g)
    return stream(header, [(offset, chunks[0][1])] + chunks[1:])


def _renamed(fmt, g):
    state = {("fc.weight_renamed" if k == "fc.weight" else k): v for k, v in g.items()}
    return stream(*encoded(fmt, state))


def _nan(fmt, g):
    weight = g["fc.weight"].clone()
    weight[3, 5] = float("nan")
    return _with(fmt, g, **{"fc.weight": weight})


def _other_format(fmt, g):
    return stream(*encoded("torch" if fmt == "raw" else "raw", g))


def _huge_total(fmt, g):
    header, chunks = encoded(fmt, g)
    return stream({**header, "total_bytes": 3 * 2**30}, chunks)


CASES = {
    "wrong format": Case(_other_format, r"payload is in the '(torch|raw)' format, but this process sends and "
                                        r"accepts '(raw|torch)'.*same optimization.serde"),
    "oversize header": Case(lambda fmt, g: stream(b"{" + b" " * 32767, [], header_bytes=5 * 2**20) + [
        flmem_pb2.ModelChunk(header=b" " * 32768) for _ in range(5 * 2**20 // 32768 - 1)],
        r"the header is 5242880 bytes long; this receiver reads at most \d+"),
    "header longer than announced": Case(lambda fmt, g: stream(b"{" + b" " * 40000 + b"}", [], header_bytes=100),
                                         r"the header is 40002 bytes long"),
    "empty header pieces": Case(lambda fmt, g: stream(b"{", [], header_bytes=1000) + [
        flmem_pb2.ModelChunk() for _ in range(50)], r"an empty message after 1 of the header's 1000 bytes"),
    "broken JSON header": Case(lambda fmt, g: stream(b'{"format": "raw", "total_bytes": 1', []), r"not JSON"),
    "JSON that is no header": Case(lambda fmt, g: stream(b'[1, 2, 3]', []), r"malformed model header"),
    "empty stream": Case(lambda fmt, g: stream(b"", []), r"no header \(an empty first message\)"),
    "unknown dtype": Case(lambda fmt, g: _table(fmt, g, lambda t: t[0].__setitem__(1, "nosuchdtype")),
                          r"entry 0 \(tensor 'conv.weight'\): received \[.*nosuchdtype", raw_only=True),
    "shape (1,) for (32,)": Case(lambda fmt, g: _with(fmt, g, **{"fc.bias": torch.zeros(1)}),
                                 lambda fmt: r"entry 3 \(tensor 'fc.bias'\)" if fmt == "raw" else
                                 r"tensor 'fc.bias': received float32 \[1\], the global model has float32 \[32\]"),
    "float64 tensor": Case(lambda fmt, g: _with(fmt, g, **{"fc.weight": g["fc.weight"].double()}),
                           lambda fmt: r"entry 2 \(tensor 'fc.weight'\).*float64" if fmt == "raw" else
                           r"tensor 'fc.weight': received float64 \[32, 8\], the global model has float32"),
    "wrong keys": Case(_renamed, lambda fmt: r"entry 2 \(tensor 'fc.weight'\)" if fmt == "raw" else
                       r"missing \['fc.weight'\], unknown \['fc.weight_renamed'\]"),
    "zero offsets": Case(lambda fmt, g: _table(fmt, g, lambda t: [e.__setitem__(3, 0) for e in t]),
                         r"entry 1 \(tensor 'conv.bias'\)", raw_only=True),
    "overlapping offsets": Case(lambda fmt, g: _table(fmt, g, lambda t: t[1].__setitem__(3, 8)),
                                r"entry 1 \(tensor 'conv.bias'\)", raw_only=True),
    "reordered table": Case(lambda fmt, g: stream(*encoded(fmt, dict(reversed(list(g.items()))))),
                            r"entry 0 \(tensor 'conv.weight'\)", raw_only=True),
    "total_bytes of 3 GiB": Case(_huge_total, lambda fmt: r"claims 3221225472 payload bytes" + (
        r"; the global model's raw payload is" if fmt == "raw" else r"; a \d+-byte model serializes to at most")),
    "negative offset": Case(lambda fmt, g: _chunk_at(fmt, g, -8), r"chunk 0 is \[-8, \d+\); the cut .* puts it at "
                                                                  r"\[0, \d+\)"),
    "past-the-end offset": Case(lambda fmt, g: _chunk_at(fmt, g, 2**40), r"chunk 0 is \[1099511627776, "),
    "non-aligned offset": Case(lambda fmt, g: _chunk_at(fmt, g, 4), r"chunk 0 is \[4, "),
    "a byte too many": Case(lambda fmt, g: (lambda h, c: stream(h, c + [(h["total_bytes"], b"\0")]))(
        *encoded(fmt, g)), r"chunk \d \[\d+, \d+\) lies past the end of the \d+-byte payload \(a byte too many\)"),
    "NaN": Case(_nan, r"tensor 'fc.weight' holds a non-finite value.*server.non_finite=reject"),
    "wrong round": Case(lambda fmt, g: (lambda h, c: stream(h, c, round_idx=5))(*encoded(fmt, g)),
                        r"sent an update for round 5, but the server collects round 0",
                        code=grpc.StatusCode.FAILED_PRECONDITION),
}


def params():
    for path, (serde_opt, *_) in PATHS.items():
        for name, case in CASES.items():
            if not (case.raw_only and not serde_opt):
                yield pytest.param(path, name, id=f"{path}-{name.replace(' ', '_')}")


def tracked_peak(path, fn):
    with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        result = fn()
    return result, memray.FileReader(str(path)).metadata.peak_memory


def run_honest(job: Job, honest: ServerConnection) -> dict:
    """The honest client's round: push its update, fetch the final model; returns its update."""
    update = shifted(job.fl.model.state_dict())
    result = honest.push(0, HONEST, 1, *job.codec.encode(update))
    assert result.accepted, result.reason
    final = job.model_fn()
    job.fetch_into(honest, 1, HONEST, final)
    job.thread.join(60)
    assert "error" not in job.outcome, job.outcome.get("error")
    server = job.fl.model.state_dict()
    for name, value in final.state_dict().items():  # the honest client holds the server's final model
        torch.testing.assert_close(value, server[name], rtol=0, atol=0, equal_nan=True)
    return update


@pytest.mark.slow
@pytest.mark.parametrize("path, name", list(params()))
def test_a_hostile_update_is_refused_alone(path, name, tmp_path, capfd):
    case = CASES[name]
    job = Job(path)
    try:
        fmt = job.codec.format
        honest = job.connect(HONEST)
        presence = job.stub.Join(flmem_pb2.JoinRequest(client_rank=HOSTILE))
        job.fetch_into(honest, 0, HONEST, job.model_fn())  # round 0 is open
        messages = case.build(fmt, {k: v.clone() for k, v in job.fl.model.state_dict().items()})
        refusal, peak = tracked_peak(tmp_path / "refuse.bin", lambda: job.push(messages))
        assert refusal is not None, "the hostile update was accepted"
        assert refusal.code() == case.code, refusal.details()
        message = refusal.details()
        assert re.search(case.regex(fmt), message), message
        assert re.search(rf"update of client {HOSTILE} \(ipv[46]:[^)]+\) for round \d+ refused after \d+ bytes",
                         message), message
        assert peak < BOUND, f"{peak} bytes allocated while refusing"
        presence.cancel()  # the hostile client leaves; the round goes on with the honest one
        update = run_honest(job, honest)
        honest.close()
    finally:
        job.close()
    state = job.fl.model.state_dict()
    for key, value in update.items():
        assert torch.equal(state[key], value), key
    (record,) = job.outcome["history"]
    assert record["updates"] == 1
    listed = record["failures"] if case.code == grpc.StatusCode.INVALID_ARGUMENT else record["refused"]
    noted = next(f for f in listed if f["rank"] == HOSTILE)
    assert noted["peer"].startswith(("ipv4:127.0.0.1", "ipv6:")) and isinstance(noted["bytes_received"], int)
    assert re.search(case.regex(fmt), noted["reason"]), noted
    assert capfd.readouterr().err.count(f"update of client {HOSTILE} (") == 1  # printed once
    print(f"peak while refusing: {peak} bytes")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimized-fedavg", "original-fedavg"])
def test_a_stream_with_no_message_at_all_is_refused_and_the_server_goes_on(path):
    job = Job(path, num_clients=1)
    try:
        refusal = job.push([])
        assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(r"from ipv[46]:.* \(client rank unknown\) ended before its first message", refusal.details())
        update = job.honest_round()
    finally:
        job.close()
    assert all(torch.equal(job.fl.model.state_dict()[k], v) for k, v in update.items())


@pytest.mark.slow
def test_a_first_message_over_the_receive_limit_is_refused_naming_the_peer_and_the_limit(capfd):
    # gRPC itself refuses a message over transport.max_message_bytes: the handler sees a call that ended before
    # its first message, and says which peer and the likely cause
    job = Job("optimized-fedavg", num_clients=1)
    big = grpc.insecure_channel(job.address, options=channel_options(4 * MAX_MESSAGE))
    try:
        raw = b" " * (2 * MAX_MESSAGE)
        first = flmem_pb2.ModelChunk(header=raw, header_bytes=len(raw), client_rank=HOSTILE)
        with pytest.raises(grpc.RpcError) as refused:
            flmem_pb2_grpc.FederatedLearningStub(big).PushUpdate(iter([first]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        update = job.honest_round()
    finally:
        big.close()
        job.close()
    assert all(torch.equal(job.fl.model.state_dict()[k], v) for k, v in update.items())
    err = capfd.readouterr().err
    assert re.search(r"a client at ipv[46]:\S+'s update stream ended before its first message arrived: .*larger "
                     r"than transport.max_message_bytes", err), err


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimized-fedavg", "optimized-fedmedian", "original-fedavg"])
def test_non_finite_accept_lets_a_nan_update_into_the_round(path):
    job = Job(path, non_finite="accept")
    try:
        fmt = job.codec.format
        honest = job.connect(HONEST)
        presence = job.stub.Join(flmem_pb2.JoinRequest(client_rank=HOSTILE))
        job.fetch_into(honest, 0, HONEST, job.model_fn())
        messages = _nan(fmt, {k: v.clone() for k, v in job.fl.model.state_dict().items()})
        outcome = {}
        # the coordinate-wise path reduces both updates' chunks together: the hostile stream waits for the honest one
        pusher = threading.Thread(target=lambda: outcome.setdefault("refusal", job.push(messages)))
        pusher.start()
        run_honest_thread = threading.Thread(target=lambda: outcome.setdefault("update", run_honest(job, honest)))
        run_honest_thread.start()
        pusher.join(60)
        presence.cancel()
        run_honest_thread.join(60)
        honest.close()
    finally:
        job.close()
    assert outcome["refusal"] is None
    (record,) = job.outcome["history"]
    assert record["updates"] == 2 and record["failures"] == []
    weight = job.fl.model.state_dict()["fc.weight"]
    assert torch.isnan(weight[3, 5]) and int(torch.isnan(weight).sum()) == 1  # mean and median of NaN and x


def test_the_non_finite_policy_is_checked():
    with pytest.raises(ValueError, match="server.non_finite=maybe: must be reject or accept"):
        RoundServer(Tiny(), None, strategy=FedAvg(), num_clients=1, rounds=1, codec=ModelCodec(True, True, CHUNK),
                    streaming=True, non_finite="maybe")


def test_chunks_must_follow_the_cut_on_every_receive_path():
    state = Tiny().state_dict()
    layout = serde.Layout.of(state)
    for serde_opt, transport_opt in [(False, False), (False, True), (True, False), (True, True)]:
        codec = ModelCodec(serde_opt, transport_opt, 512)
        header, chunks = codec.encode(state)
        chunks = list(chunks)
        assert len(chunks) > 2
        swapped = [chunks[1], chunks[0]] + chunks[2:]
        with pytest.raises(ValueError, match=r"chunk 0 is \[512, 1024\); the cut .* puts it at \[0, 512\)"):
            codec.receive(header, swapped, layout)
        split = [(0, chunks[0][1][:256]), (256, chunks[0][1][256:])] + chunks[1:]
        with pytest.raises(ValueError, match=r"chunk 0 is \[0, 256\)"):
            codec.receive_into(header, split, Tiny().state_dict())
        with pytest.raises(ValueError, match="a byte too many"):
            codec.receive(header, chunks + [(header["total_bytes"], b"\0" * 8)], layout)
