"""Memory bounds that a regression (an N-fold or whole-model copy coming back) would break.

Measured in this process with memray: only allocations made inside the Tracker count, so the
inputs (client models, encoded streams) are built before it starts.
"""
import memray
import pytest
import torch

from flmem import serde
from flmem.codec import ModelCodec
from flmem.strategies import RunningSum, aggregate

M = 8_000_000  # model bytes: 2 M float32 values
CHUNK = 256 * 1024


def tracked_peak(path, fn) -> int:
    with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        fn()
    return memray.FileReader(str(path)).metadata.peak_memory


def client_models(n):
    return [({"w": torch.full((M // 8,), float(k)), "b": torch.full((M // 8,), -float(k))}, 10.0 + k)
            for k in range(n)]


def streams(clients, codec):
    return [(codec.encode(state), weight) for state, weight in clients]


def server_round(codec, streaming, encoded, target):
    if streaming:
        agg = RunningSum(target)
        for (header, chunks), weight in encoded:
            codec.fold(header, chunks, agg, weight)
        for name, mean in agg.mean().items():
            target[name].copy_(mean)
    else:
        updates = [(codec.receive(header, chunks), weight) for (header, chunks), weight in encoded]
        averaged = aggregate(updates)
        for name, t in target.items():
            t.copy_(averaged[name])


@pytest.mark.parametrize("n", [2, 8])
def test_streaming_server_holds_one_accumulator_whatever_n(tmp_path, n):
    clients = client_models(n)
    opt = ModelCodec(True, True, CHUNK, release=True)
    target = {k: torch.zeros_like(v) for k, v in clients[0][0].items()}
    peak = tracked_peak(tmp_path / "opt.bin", lambda: server_round(opt, True, streams(clients, opt), target))
    expected = sum(k * (10.0 + k) for k in range(n)) / sum(10.0 + k for k in range(n))
    assert torch.allclose(target["w"][:3], torch.full((3,), expected))
    assert peak < 1.25 * M, f"streaming FedAvg of {n} updates peaked at {peak / M:.2f} M (bound 1.25 M)"


def test_original_server_holds_every_client_model(tmp_path):
    clients = client_models(4)
    org = ModelCodec(False, False, CHUNK)
    encoded = streams(clients, org)  # torch.save + protobuf blobs, before tracking
    target = {k: torch.zeros_like(v) for k, v in clients[0][0].items()}
    peak = tracked_peak(tmp_path / "org.bin", lambda: server_round(org, False, encoded, target))
    assert peak > 4 * M  # the baseline keeps N = 4 models: the bound above would catch this path


def test_optimized_client_receives_without_a_model_sized_buffer(tmp_path):
    state = client_models(1)[0][0]
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    opt = ModelCodec(True, True, CHUNK)
    header, chunks = opt.encode(state)
    chunks = list(chunks)  # the bytes arrive from the network: not this client's allocation
    peak = tracked_peak(tmp_path / "recv.bin", lambda: opt.receive_into(header, iter(chunks), target))
    assert torch.equal(target["b"], state["b"])
    assert peak < 0.05 * M, f"receiving into the model allocated {peak / M:.3f} M"


def test_optimized_client_sends_without_a_serialized_model(tmp_path):
    state = client_models(1)[0][0]
    opt = ModelCodec(True, True, CHUNK)

    def send():
        header, chunks = opt.encode(state)
        total = sum(len(data) for _, data in chunks)  # each chunk is dropped once "sent"
        assert total == serde.Layout.of(state).total_bytes

    assert tracked_peak(tmp_path / "send.bin", send) < 0.1 * M
