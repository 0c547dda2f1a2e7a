"""Strategy arithmetic: a hand-computed case each, and the optimized path against the original, bit for bit."""
import math
import threading

import pytest
import torch

from flmem import serde
from flmem.codec import ModelCodec
from flmem.lockstep import AlignedChunks
from flmem.restart import ResendRequested
from flmem.strategies import (FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedYogi, RoundFailedError,
                              RunningSum, TrimmedMean, aggregate)
from flmem.strategies.fedavg import SumDiscardedError

TAU, B1, B2, ETA = 1e-3, 0.9, 0.99, 0.1


def test_fedavg_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(8)}
    # weights 1 and 3: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; (1*4 + 3*8) / 4 = 7
    out = {k: torch.zeros_like(v) for k, v in a.items()}
    strategy = FedAvg()
    strategy.begin_round(0, out)
    strategy.accept(1, 3.0, b)
    strategy.accept(0, 1.0, a)
    strategy.end_round(0, out, streaming=False)
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    assert torch.equal(aggregate([(a, 1), (b, 1)])["w"], torch.tensor([3.0, 4.0]))
    assert FedAvg(weighted=False).weight(500) == 1.0 and FedAvg().weight(500) == 500.0


def test_fedavg_refuses_nothing_to_average():
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    with pytest.raises(ValueError, match="no client update"):
        RunningSum({"w": torch.zeros(2)}).mean()


def one_step(strategy, x0=0.0, mean=1.0):
    state = {"w": torch.tensor([x0])}
    strategy.begin_round(0, state)
    strategy.accept(0, 1.0, {"w": torch.tensor([mean])})
    metrics = strategy.end_round(0, state, streaming=False)
    return float(state["w"]), metrics


def test_server_optimizers_hand_computed():
    # Delta = 1; m = 0.1; v from v0 = tau^2; x = eta * m / (sqrt(v) + tau)  (Reddi et al., Algorithm 2)
    v_adam = B2 * TAU ** 2 + (1 - B2)
    v_yogi = TAU ** 2 + (1 - B2)  # sign(tau^2 - 1) = -1
    v_adagrad = TAU ** 2 + 1
    x, metrics = one_step(FedAdam(eta=ETA, beta_1=B1, beta_2=B2, tau=TAU))
    assert x == pytest.approx(ETA * (1 - B1) / (math.sqrt(v_adam) + TAU), rel=1e-6)
    assert metrics["pseudo_gradient_norm"] == pytest.approx(1.0)
    assert one_step(FedYogi(eta=ETA, beta_1=B1, beta_2=B2, tau=TAU))[0] == pytest.approx(
        ETA * (1 - B1) / (math.sqrt(v_yogi) + TAU), rel=1e-6)
    assert one_step(FedAdagrad(eta=ETA, tau=TAU))[0] == pytest.approx(ETA / (math.sqrt(v_adagrad) + TAU), rel=1e-6)


def test_robust_reductions_hand_computed():
    rows = torch.tensor([[1.0, 5.0], [5.0, -1.0], [3.0, 2.0], [10.0, 4.0]])
    assert torch.equal(FedMedian().reduce(rows[:3]), torch.tensor([3.0, 2.0]))
    assert torch.equal(FedMedian().reduce(rows), torch.tensor([4.0, 3.0]))  # even N: mean of the middle two
    # beta = 0.25 of 4: drop one value at each end per coordinate: mean([3, 5]) = 4, mean([2, 4]) = 3
    assert torch.equal(TrimmedMean(beta=0.25).reduce(rows), torch.tensor([4.0, 3.0]))
    assert torch.equal(TrimmedMean(beta=0.0).reduce(rows), rows.mean(0))
    with pytest.raises(ValueError, match="strategy.beta=0.5"):
        TrimmedMean(beta=0.5)


def test_policy_values_are_checked():
    with pytest.raises(ValueError, match="fraction_fit=0"):
        FedAvg(fraction_fit=0)
    with pytest.raises(ValueError, match="proximal_mu=-1"):
        FedProx(proximal_mu=-1)
    with pytest.raises(ValueError, match="strategy.tau=0"):
        FedAdam(tau=0)


def test_sampling_is_seeded_and_honours_the_floor():
    s = FedAvg(fraction_fit=0.5, min_fit_clients=1)
    picks = [s.sample(r, range(8), seed=3) for r in range(4)]
    assert all(len(p) == 4 and p == sorted(p) for p in picks)
    assert picks == [s.sample(r, range(8), seed=3) for r in range(4)]  # the same seed, the same samples
    assert len({tuple(p) for p in picks}) > 1  # rounds differ
    assert FedAvg(fraction_fit=0.1, min_fit_clients=3).sample(0, range(8), 0).__len__() == 3
    assert FedAvg().sample(0, [2, 0, 1], 0) == [0, 1, 2]
    with pytest.raises(ValueError, match="2 client\\(s\\) available"):
        FedAvg(min_fit_clients=3).sample(0, [0, 1], 0)


def test_failure_policy():
    failures = [{"rank": 2, "reason": "late: no update within 4 s (timeouts.round_s)"}]
    FedAvg(min_fit_clients=2).check_round(0, [0, 1], failures)
    with pytest.raises(RoundFailedError) as err:
        FedAvg(min_fit_clients=2).check_round(0, [0], failures)
    assert str(err.value) == ("round 0: only 1 of 2 client updates arrived (arrived: [0]), strategy.min_fit_clients=2; "
                              "late: client 2 (no update within 4 s (timeouts.round_s)). Failed: none")
    failures.append({"rank": 1, "reason": "left the job: its connection closed"})
    with pytest.raises(RoundFailedError) as err:
        FedAvg(accept_failures=False).check_round(0, [0], failures)
    assert str(err.value) == ("round 0: 2 of 3 client updates failed and strategy.accept_failures=false; late: "
                              "client 2 (no update within 4 s (timeouts.round_s)). Failed: client 1: left the job: "
                              "its connection closed")


def make_clients(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [({"conv": torch.randn(16, 3, 3, 3, generator=gen), "bias": torch.randn(700, generator=gen),
              "bn.num_batches_tracked": torch.tensor(10 + k, dtype=torch.int64),
              "half": torch.randn(33, generator=gen).half()}, float(100 + 37 * k)) for k in range(n)]


def run_original(strategy, clients, global_state):
    strategy.begin_round(0, global_state)
    for rank in reversed(range(len(clients))):  # arrival order is not rank order
        strategy.accept(rank, *reversed(clients[rank]))
    return strategy.end_round(0, global_state, streaming=False)


def run_optimized(strategy, clients, global_state, codec):
    strategy.begin_round(0, global_state)
    layout = serde.Layout.of(global_state)
    if strategy.combine == "sum":
        for state, weight in clients:  # the server folds in rank order
            header, chunks = codec.encode(state)
            codec.fold(header, chunks, strategy.running, weight)
    else:  # chunk k of every client together, each client's stream in its own thread, as the server does
        lockstep = AlignedChunks(layout, codec.chunk_size, range(len(clients)),
                                 lambda off, datas: strategy.reduce_chunk(layout, off, datas, global_state), 30)
        streams = [codec.aligned_chunks(*codec.encode(state), layout) for state, _ in clients]
        threads = [threading.Thread(target=lockstep.feed, args=(k, s)) for k, s in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    return strategy.end_round(0, global_state, streaming=True)


STRATEGIES = [FedAvg, lambda: FedAvg(weighted=False), lambda: FedAdam(eta=ETA), FedYogi, FedAdagrad, FedMedian,
              TrimmedMean]


@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize("serde_opt", [True, False])
def test_optimized_path_equals_original_bit_for_bit(make, serde_opt):
    clients = make_clients(5)
    start = {k: (v * 0.5).to(v.dtype) for k, v in clients[0][0].items()}
    expected, got = ({k: v.clone() for k, v in start.items()} for _ in range(2))
    codec = ModelCodec(serde_opt, serde_opt, chunk_size=1024)  # many chunks per tensor
    original, optimized = make(), make()
    for _ in range(2):  # two rounds: the server optimizers' moments carry over
        m_org = run_original(original, clients, expected)
        m_opt = run_optimized(optimized, clients, got, codec)
        assert m_org == m_opt
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert not torch.equal(expected["conv"], start["conv"])


def test_lockstep_drops_a_client_that_never_sent_and_restarts_without_one_that_stopped():
    clients = make_clients(3)
    layout = serde.Layout.of(clients[0][0])
    codec = ModelCodec(True, True, chunk_size=1024)
    target = {k: torch.zeros_like(v) for k, v in clients[0][0].items()}
    median = FedMedian()
    lockstep = AlignedChunks(layout, 1024, [0, 1, 2], lambda o, d: median.reduce_chunk(layout, o, d, target), 30)
    feeders = [threading.Thread(target=lockstep.feed, args=(k, codec.encode(clients[k][0])[1])) for k in (0, 1)]
    for t in feeders:
        t.start()
    assert lockstep.drop(2, "left") is False  # before it sent anything: the others go on without it
    for t in feeders:
        t.join(30)
    assert lockstep.index == lockstep.num_chunks and lockstep.restarts == 0
    expected = {k: torch.zeros_like(v) for k, v in target.items()}
    median.updates = {0: clients[0], 1: clients[1]}
    median.end_round(0, expected, streaming=False)
    assert all(torch.equal(target[k], expected[k]) for k in target)

    # Client 1 stops after 2 chunks, once those were reduced: the reduction starts again at chunk 0 without it,
    # the others are asked to send again, and the result is the median of clients 0 and 2 alone.
    target = {k: torch.full_like(v, 7) for k, v in target.items()}  # not read: every chunk is written again
    lockstep = AlignedChunks(layout, 1024, [0, 1, 2], lambda o, d: median.reduce_chunk(layout, o, d, target), 30)
    outcome = {}

    def feed(rank, stop=None):
        while True:
            chunks = codec.encode(clients[rank][0])[1]
            try:
                lockstep.feed(rank, (c for i, c in enumerate(chunks) if stop is None or i < stop))
                outcome.setdefault(rank, []).append("done")
                return
            except ResendRequested as exc:
                outcome.setdefault(rank, []).append(str(exc))
            except ValueError as exc:
                outcome.setdefault(rank, []).append(str(exc))
                restarted.append(lockstep.drop(rank, str(exc)))
                return

    restarted = []
    threads = [threading.Thread(target=feed, args=(0,)), threading.Thread(target=feed, args=(1, 2)),
               threading.Thread(target=feed, args=(2,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert restarted == [True] and lockstep.restarts == 1 and lockstep.index == lockstep.num_chunks
    assert outcome[1] == [f"client 1's update ended after 2 of {lockstep.num_chunks} chunks"]
    for rank in (0, 2):
        assert len(outcome[rank]) == 2 and outcome[rank][1] == "done", outcome
        assert "restarted at chunk 0 without client(s) [1], which failed after 2 of" in outcome[rank][0]
    expected = {k: torch.zeros_like(v) for k, v in target.items()}
    median.updates = {0: clients[0], 2: clients[2]}
    median.end_round(0, expected, streaming=False)
    assert all(torch.equal(target[k], expected[k]) for k in target)


def test_lockstep_drops_a_stalled_participant_and_restarts():
    clients = make_clients(3)
    layout = serde.Layout.of(clients[0][0])
    codec = ModelCodec(True, True, chunk_size=1024)
    target = {k: torch.zeros_like(v) for k, v in clients[0][0].items()}
    median, dropped = FedMedian(), []
    lockstep = AlignedChunks(layout, 1024, [0, 1, 2], lambda o, d: median.reduce_chunk(layout, o, d, target), 3,
                             on_drop=lambda late, restarted: dropped.append((dict(late), restarted)))
    release = threading.Event()

    def stalling():  # two chunks, then nothing until the test lets it go
        for i, chunk in enumerate(codec.encode(clients[1][0])[1]):
            if i == 2:
                release.wait(30)
            yield chunk

    outcome = {}

    def feed(rank, chunks_of):
        for _ in range(3):
            try:
                lockstep.feed(rank, chunks_of())
                outcome.setdefault(rank, []).append("done")
                return
            except (ResendRequested, ValueError) as exc:
                outcome.setdefault(rank, []).append(type(exc).__name__)

    honest = lambda k: (lambda: codec.encode(clients[k][0])[1])  # noqa: E731
    threads = [threading.Thread(target=feed, args=(0, honest(0))), threading.Thread(target=feed, args=(2, honest(2)))]
    stalled = threading.Thread(target=feed, args=(1, stalling))
    for t in (*threads, stalled):
        t.start()
    for t in threads:
        t.join(30)
    release.set()
    stalled.join(30)
    ((late, restarted),) = dropped
    assert restarted and list(late) == [1] and late[1].startswith("stalled: sent nothing for 3 s at chunk 2 of")
    assert outcome[0] == outcome[2] == ["ResendRequested", "done"] and outcome[1][0] == "ValueError"
    expected = {k: torch.zeros_like(v) for k, v in target.items()}
    median.updates = {0: clients[0], 2: clients[2]}
    median.end_round(0, expected, streaming=False)
    assert all(torch.equal(target[k], expected[k]) for k in target)


def test_running_sum_discarded_mid_update_restarts_to_the_same_floats():
    clients = make_clients(3)
    codec = ModelCodec(True, True, chunk_size=1024)
    running = RunningSum(clients[0][0])
    turn = running.turn()
    codec.fold(*codec.encode(clients[0][0]), turn, clients[0][1])
    turn = running.turn()
    header, chunks = codec.encode(clients[1][0])
    for _, chunk in zip(range(2), chunks):  # client 1 fails after two chunks were added
        turn.fold_chunk(serde.header_layout(header), *chunk, clients[1][1])
    assert running.abandon(turn.number - 1) is False  # an older turn: nothing to discard
    assert running.abandon(turn.number) is True and running.total_weight == 0 and running.num_updates == 0
    with pytest.raises(SumDiscardedError):
        turn.fold_chunk(serde.header_layout(header), *next(chunks), clients[1][1])
    assert running.abandon(turn.number) is False
    for k in (0, 2):  # the round folds again from zero, in rank order
        codec.fold(*codec.encode(clients[k][0]), running.turn(), clients[k][1])
    empty = running.turn()
    assert running.abandon(empty.number) is False  # a turn that added nothing keeps the sum
    mean, expected = running.mean(), aggregate([clients[0], clients[2]])
    assert all(torch.equal(mean[k], expected[k]) for k in expected)