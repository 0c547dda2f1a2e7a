"""FedAvg arithmetic: a hand-computed case, and the streaming fold against the original."""
import pytest
import torch

from flmem.codec import ModelCodec
from flmem.strategy import StreamingFedAvg, aggregate


def test_fedavg_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(8)}
    # weights 1 and 3: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; (1*4 + 3*8) / 4 = 7
    out = aggregate([(a, 1), (b, 3)])
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    assert torch.equal(aggregate([(a, 1), (b, 1)])["w"], torch.tensor([3.0, 4.0]))


def test_fedavg_refuses_nothing_to_average():
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def make_clients(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for k in range(n):
        clients.append(({"conv": torch.randn(16, 3, 3, 3, generator=gen), "bias": torch.randn(700, generator=gen),
                         "bn.running_mean": torch.randn(16, generator=gen),
                         "bn.num_batches_tracked": torch.tensor(10 + k, dtype=torch.int64),
                         "half": torch.randn(33, generator=gen).half()}, float(100 + 37 * k)))
    return clients


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("serde_opt, transport_opt", [(True, True), (True, False), (False, False)])
def test_streaming_fold_equals_original(weighted, serde_opt, transport_opt):
    clients = make_clients(4)
    if not weighted:
        clients = [(s, 1.0) for s, _ in clients]
    expected = aggregate(clients)
    agg = StreamingFedAvg(clients[0][0])
    codec = ModelCodec(serde_opt, transport_opt, chunk_size=1024)  # many chunks per tensor
    for state, weight in reversed(clients):  # arrival order differs from rank order
        header, chunks = codec.encode(state)
        codec.fold(header, chunks, agg, weight)
    target = {k: torch.zeros_like(v) for k, v in clients[0][0].items()}
    agg.finalize_into(target)
    for k in expected:
        assert target[k].dtype == expected[k].dtype
        assert torch.allclose(target[k].float(), expected[k].float(), rtol=1e-5, atol=1e-6), k
    assert int(target["bn.num_batches_tracked"]) == int(expected["bn.num_batches_tracked"])
    assert agg.num_updates == 0 and agg.total_weight == 0  # reset for the next round


def test_finalize_without_updates_is_an_error():
    agg = StreamingFedAvg({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="no client update"):
        agg.finalize_into({"w": torch.zeros(2)})
