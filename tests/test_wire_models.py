"""Models that used to break the wire: 1,200 tensors (a header longer than one gRPC message) and parameters that
are not contiguous (``channels_last``). Real RoundServer, real gRPC on 127.0.0.1, scripted clients that push known
updates, so the global model is checked bit for bit."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from flmem import serde, wire
from flmem.codec import ModelCodec
from flmem.strategies.base import acc_dtype, cast
from flmem.transport import TransportError
from tests.test_wire import PATHS, Job, shifted


class ManyTensors(nn.Module):
    """1,200 small tensors (300 blocks of two 2x2 linear layers): a raw header of about 77 KB, more than the
    64 KiB smallest transport.max_message_bytes."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"self_attention_output": nn.Linear(2, 2),
                                                   "feed_forward_output": nn.Linear(2, 2)}) for _ in range(300))


class ConvNet(nn.Module):
    """Convolutions and BatchNorm in channels_last: 4-d parameters and buffers that are not contiguous."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4, 2)


def channels_last() -> nn.Module:
    model = ConvNet().to(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    return model


def mean_of_two(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FedAvg of two updates of weight 1, and their median: (a + b) / 2 in the strategies' precision."""
    dtype = acc_dtype(a.dtype)
    return cast((a.to(dtype) + b.to(dtype)) / 2, a.dtype)


def federate_known(path: str, model_fn, num_clients: int, chunk: int = 4096) -> tuple[Job, list[dict], dict]:
    """One round in which client k pushes the round-0 global model + (k + 1); returns the job, the updates and
    the final model each client fetched (into a fresh ``model_fn()``)."""
    job = Job(path, model_fn=model_fn, num_clients=num_clients, chunk=chunk)
    updates, finals, errors = {}, {}, []

    def client(rank):
        try:
            conn = job.connect(rank)
            model = model_fn()
            job.fetch_into(conn, 0, rank, model)
            updates[rank] = shifted(model.state_dict(), rank + 1.0)
            result = conn.push(0, rank, 1, *job.codec.encode(updates[rank]))
            assert result.accepted, result.reason
            final = model_fn()
            job.fetch_into(conn, 1, rank, final)
            finals[rank] = final
            conn.close()
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(num_clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        job.thread.join(60)
    finally:
        job.close()
    assert not errors, errors
    assert "error" not in job.outcome, job.outcome.get("error")
    return job, [updates[k] for k in range(num_clients)], finals


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimized-fedavg", "original-fedavg"])
def test_a_model_with_1200_tensors_travels_with_a_64_kib_message_limit(path):
    state = ManyTensors().state_dict()
    assert len(state) == 1200
    header = serde.dumps_header(ModelCodec(True, True, 4096).encode(state)[0])
    assert len(header) > 65536  # the raw tensor table alone is larger than one message may be
    job, (update,), finals = federate_known(path, ManyTensors, num_clients=1)
    server, client = job.fl.model.state_dict(), finals[0].state_dict()
    for name, value in update.items():
        assert torch.equal(server[name], value) and torch.equal(client[name], value), name


@pytest.mark.parametrize("serde_opt, transport_opt", [(False, False), (False, True), (True, False), (True, True)])
def test_receive_into_a_channels_last_model_is_bit_exact(serde_opt, transport_opt):
    torch.manual_seed(1)
    source = {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v + 3
              for k, v in ConvNet().state_dict().items()}
    target = channels_last()
    state = target.state_dict()
    pointers = {k: v.data_ptr() for k, v in state.items()}
    codec = ModelCodec(serde_opt, transport_opt, 256)  # tensors span several chunks
    codec.receive_into(*codec.encode(source), state)
    for name, value in source.items():
        assert torch.equal(state[name], value), name
    assert target.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert pointers == {k: v.data_ptr() for k, v in target.state_dict().items()}  # received in place


def test_byte_view_refuses_a_tensor_it_cannot_view_in_place():
    with pytest.raises(ValueError, match="not contiguous"):
        serde.byte_view(channels_last().conv1.weight)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimized-fedavg", "optimized-fedmedian", "original-fedavg", "original-fedmedian"])
def test_a_channels_last_global_model_takes_a_real_round(path):
    job, (a, b), finals = federate_known(path, channels_last, num_clients=2, chunk=512)  # tensors span chunks
    state = job.fl.model.state_dict()
    assert job.fl.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for name in a:
        assert torch.equal(state[name], mean_of_two(a[name], b[name])), name
    for final in finals.values():
        assert all(torch.equal(value, state[name]) for name, value in final.state_dict().items())


def test_the_client_refuses_a_global_model_in_the_other_format():
    state = ConvNet().state_dict()
    header, chunks = ModelCodec(False, False, 4096).encode(state)
    with pytest.raises(ValueError, match=r"payload is in the 'torch' format, but this process sends and accepts "
                                         r"'raw' \(optimization.serde=true\); set the same optimization.serde"):
        ModelCodec(True, True, 4096).receive_into(header, chunks, ConvNet().state_dict())


@pytest.mark.slow
def test_the_client_refuses_a_global_model_header_longer_than_its_cap():
    job = Job("optimized-fedavg", num_clients=1)
    try:
        conn = job.connect(0)
        cap = wire.header_cap(job.fl.layout)
        with pytest.raises(TransportError, match=r"refused after \d+ bytes: the header is \d+ bytes long; this "
                                                 r"receiver reads at most 100"):
            conn.fetch(0, 0, header_cap=100)
        job.fetch_into(conn, 0, 0, job.model_fn())  # the honest fetch with its real cap still works
        assert conn.push(0, 0, 1, *job.codec.encode(shifted(job.fl.model.state_dict()))).accepted
        header, _, chunks = conn.fetch(1, 0, cap)
        list(chunks)
        conn.close()
        job.thread.join(60)
    finally:
        job.close()
    assert job.outcome["history"][0]["updates"] == 1


def test_a_server_optimizer_steps_a_channels_last_global_model_as_a_contiguous_one():
    from flmem.strategies import FedAdam

    torch.manual_seed(2)
    update = {k: torch.randn_like(v) if v.dtype.is_floating_point else v for k, v in ConvNet().state_dict().items()}
    results = []
    for make in (ConvNet, channels_last):
        torch.manual_seed(3)
        model = make()
        strategy = FedAdam(eta=0.01)
        state = model.state_dict()
        strategy.begin_round(0, state)
        strategy.accept(0, 1.0, update)
        strategy.end_round(0, state, streaming=False)
        results.append(state)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert not torch.equal(results[0]["conv1.weight"], update["conv1.weight"])


def test_comm_only_perturbs_a_channels_last_model_as_a_contiguous_one():
    from flmem.trainer import Perturber

    models = []
    for make in (ConvNet, channels_last):
        torch.manual_seed(4)
        model = make()
        Perturber(model, 10, seed=0, rank=1).train_round(0)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    torch.manual_seed(4)
    assert not torch.equal(ConvNet().conv1.weight, models[1]["conv1.weight"])
