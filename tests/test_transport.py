"""Whole FedAvg rounds over real gRPC on 127.0.0.1, in one process (fast); both memory paths agree."""
import threading
import time
from functools import partial

import pytest
import torch

from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.datasets.synthetic import SyntheticImages
from flmem.models import SmallCNN
from flmem.server import RoundServer
from flmem.strategies import FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedYogi, RoundFailedError, TrimmedMean
from flmem.trainer import Trainer
from flmem.transport import ServerConnection, TransportError, serve
from conftest import run_rounds

DS = SyntheticImages(name="synthetic", channels=3, image_size=32, num_classes=10, train_size=256, test_size=64,
                     samples_per_client=40, test_samples=64, partition="iid", alpha=0.5, seed=0)


class Quit(Exception):
    """A client stops in the middle of a round (its connection closes, as when its process dies)."""


def federate(optimized: bool, num_clients=2, rounds=2, chunk_size=64 * 1024, strategy=None, proximal_mu=0.0,
             quit=None, slow=None, round_timeout_s=60):
    """A whole job in this process: a RoundServer and ``num_clients`` client threads over real gRPC.
    ``quit``: {rank: round} clients that leave while training that round; ``slow``: {rank: (round, seconds)}
    clients that train that round that much longer."""
    quit, slow = quit or {}, slow or {}
    torch.manual_seed(0)
    codec = ModelCodec(optimized, optimized, chunk_size, release=optimized)
    fl = RoundServer(SmallCNN(), DS.test_dataset(), strategy=strategy or FedAvg(), num_clients=num_clients,
                     rounds=rounds, codec=codec, streaming=optimized,
                     round_timeout_s=round_timeout_s)
    server, port = serve(fl, "127.0.0.1", 0, 4 * 2**20, max_workers=3 * num_clients + 4)
    finals, histories, errors = {}, {}, []

    def client(rank):
        try:
            model = SmallCNN()
            trainer = Trainer(model, DS.client_dataset(rank, num_clients, release=optimized), batch_size=8,
                              local_steps=2, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), seed=0,
                              rank=rank, optimized=optimized, release=optimized, proximal_mu=proximal_mu)
            if rank in quit:
                train = trainer.train_round
                trainer.train_round = lambda r: (_ for _ in ()).throw(Quit()) if r == quit[rank] else train(r)
            if rank in slow:
                train_slow = trainer.train_round
                trainer.train_round = lambda r: (time.sleep(slow[rank][1]) if r == slow[rank][0] else None,
                                                 train_slow(r))[1]
            conn = ServerConnection(f"127.0.0.1:{port}", 4 * 2**20, 60)
            conn.wait_ready(10)
            try:
                histories[rank] = run_client(conn, trainer, codec, rank=rank, rounds=rounds)
                finals[rank] = {k: v.clone() for k, v in model.state_dict().items()}
            finally:
                conn.close()
        except Quit:
            pass
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(num_clients)]
    history = run_rounds(fl, threads, server)
    assert not errors, errors
    return fl.model.state_dict(), finals, history, histories


def test_original_and_optimized_give_the_same_global_model():
    original, finals_o, hist_o, _ = federate(optimized=False)
    optimized, finals_p, hist_p, _ = federate(optimized=True)
    assert [h["round"] for h in hist_o] == [0, 1] and len(hist_p) == 2
    for name in original:
        assert torch.equal(original[name], optimized[name]), name
        for finals in (finals_o, finals_p):  # every client ends holding the server's final global model
            assert torch.equal(finals[0][name], finals[1][name])
    assert hist_o[-1]["test_accuracy"] == hist_p[-1]["test_accuracy"]
    assert hist_p[0]["sampled"] == [0, 1] and hist_p[0]["updates"] == 2 and hist_p[0]["failures"] == []


def test_unknown_server_address_is_a_clear_timeout(free_port):
    conn = ServerConnection(f"127.0.0.1:{free_port}", 4 * 2**20, 5)
    with pytest.raises(TransportError, match=f"no FL server answered at 127.0.0.1:{free_port}"):
        conn.wait_ready(0.5)


def test_busy_port_is_refused(free_port):
    fl = object()
    first, port = serve(fl, "127.0.0.1", free_port, 2**20, 2)
    try:
        with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(fl, "127.0.0.1", port, 2**20, 2)
    finally:
        first.stop(0)


STRATEGIES = {"fedavg": FedAvg, "fedadam": lambda: FedAdam(eta=0.01), "fedyogi": lambda: FedYogi(eta=0.01),
              "fedadagrad": lambda: FedAdagrad(eta=0.01), "fedmedian": FedMedian, "trimmed_mean": TrimmedMean}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_gives_the_same_global_model_on_both_paths(name):
    # Three clients: their updates arrive in any order, and both paths still add them in rank order.
    runs = [federate(optimized=opt, num_clients=3, strategy=STRATEGIES[name](), chunk_size=16 * 1024)
            for opt in (False, True)]
    (original, _, hist_o, _), (optimized, finals, hist_p, _) = runs
    for key in original:
        assert torch.equal(original[key], optimized[key]), key
        assert torch.equal(finals[2][key], optimized[key])
    assert [h["test_accuracy"] for h in hist_o] == [h["test_accuracy"] for h in hist_p]
    assert hist_p[-1]["strategy"] == type(STRATEGIES[name]()).__name__


def test_fedprox_paths_agree_within_float_rounding():
    # The original path differentiates (mu/2)||w - w_g||^2 through autograd (a norm, squared); the optimized one
    # adds mu (w - w_g) to the gradient in place: the same gradient, rounded differently.
    (original, *_), (optimized, *_) = [federate(optimized=opt, strategy=FedProx(proximal_mu=0.5), proximal_mu=0.5)
                                       for opt in (False, True)]
    (plain, *_) = federate(optimized=True)
    for key in original:
        assert torch.allclose(original[key].float(), optimized[key].float(), rtol=1e-4, atol=1e-6), key
    assert any(not torch.allclose(plain[k].float(), optimized[k].float(), atol=1e-6) for k in plain)  # mu matters


def test_sampled_clients_train_and_the_others_wait():
    strategy = FedAvg(fraction_fit=0.5)
    state, finals, history, histories = federate(optimized=True, num_clients=4, rounds=3, strategy=strategy)
    for record in history:
        assert record["sampled"] == strategy.sample(record["round"], range(4), 0) and record["updates"] == 2
    for rank, records in histories.items():
        trained = [h["round"] for h in records if h.get("sampled", True)]
        assert trained == [h["round"] for h in history if rank in h["sampled"]]
        assert all(set(h) == {"round", "sampled"} for h in records if not h.get("sampled", True))
        assert all(torch.equal(finals[rank][k], state[k]) for k in state)  # every client fetched the final model


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("strategy", [FedAvg, FedMedian])
def test_a_client_that_leaves_mid_round_is_dropped_and_the_job_goes_on(optimized, strategy):
    state, finals, history, histories = federate(optimized=optimized, num_clients=3, rounds=3,
                                                 strategy=strategy(), quit={1: 1})
    assert [h["updates"] for h in history] == [3, 2, 2]
    assert history[1]["failures"][0]["rank"] == 1 and "connection closed" in history[1]["failures"][0]["reason"]
    assert history[2]["sampled"] == [0, 2]  # gone clients are not sampled again
    assert set(finals) == {0, 2} and all(torch.equal(finals[0][k], state[k]) for k in state)


def test_too_few_updates_end_the_job_with_the_count_and_reasons():
    with pytest.raises(RoundFailedError, match=r"round 1: only 2 of 3 client updates arrived \(arrived: \[0, 2\]\), "
                                               r"strategy.min_fit_clients=3; late: none. Failed: client 1: left "
                                               r"the job"):
        federate(optimized=True, num_clients=3, rounds=2, strategy=FedAvg(min_fit_clients=3), quit={1: 1})


@pytest.mark.parametrize("optimized", [False, True])
def test_a_late_update_is_refused_and_the_client_takes_part_again(optimized):
    state, finals, history, histories = federate(optimized=optimized, num_clients=3, rounds=3, quit=None,
                                                 slow={2: (1, 5.0)}, round_timeout_s=4)
    assert [h["updates"] for h in history][:2] == [3, 2]
    (failure,) = history[1]["failures"]
    assert failure["rank"] == 2 and failure["reason"].startswith("late: no update within 4 s")
    late = next(h for h in histories[2] if h["round"] == 1)
    assert late["accepted"] is False and "round 1" in late["refused"]
    # it is sampled again in round 2 (on a loaded machine it may be late there too, never refused otherwise)
    assert 2 in history[2]["sampled"]
    again = next(h for h in histories[2] if h["round"] == 2)
    assert again["accepted"] is True or "late" in history[2]["failures"][0]["reason"]
    assert all(torch.equal(finals[2][k], state[k]) for k in state)
