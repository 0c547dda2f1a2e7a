"""Whole FedAvg rounds over real gRPC on 127.0.0.1, in one process (fast); both memory paths agree."""
import threading
from functools import partial

import pytest
import torch

from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.datasets.synthetic import SyntheticImages
from flmem.models import SmallCNN
from flmem.server import FedAvgServer
from flmem.trainer import Trainer
from flmem.transport import ServerConnection, TransportError, serve

DS = SyntheticImages(name="synthetic", channels=3, image_size=32, num_classes=10, train_size=256, test_size=64,
                     samples_per_client=40, test_samples=64, partition="iid", alpha=0.5, seed=0)


def federate(optimized: bool, num_clients=2, rounds=2, chunk_size=64 * 1024):
    torch.manual_seed(0)
    codec = ModelCodec(optimized, optimized, chunk_size, release=optimized)
    fl = FedAvgServer(SmallCNN(), DS.test_dataset(), num_clients=num_clients, rounds=rounds, codec=codec,
                      streaming=optimized, round_timeout_s=60)
    server, port = serve(fl, "127.0.0.1", 0, 4 * 2**20, max_workers=num_clients + 4)
    finals, errors = {}, []

    def client(rank):
        try:
            model = SmallCNN()
            trainer = Trainer(model, DS.client_dataset(rank, num_clients, release=optimized), batch_size=8,
                              local_steps=2, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), seed=0,
                              rank=rank, optimized=optimized, release=optimized)
            conn = ServerConnection(f"127.0.0.1:{port}", 4 * 2**20, 60)
            conn.wait_ready(10)
            run_client(conn, trainer, codec, rank=rank, rounds=rounds)
            finals[rank] = {k: v.clone() for k, v in model.state_dict().items()}
            conn.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(num_clients)]
    for t in threads:
        t.start()
    history = fl.run()
    for t in threads:
        t.join(60)
    server.stop(0)
    assert not errors, errors
    return fl.model.state_dict(), finals, history


def test_original_and_optimized_give_the_same_global_model():
    original, finals_o, hist_o = federate(optimized=False)
    optimized, finals_p, hist_p = federate(optimized=True)
    assert [h["round"] for h in hist_o] == [0, 1] and len(hist_p) == 2
    for name in original:  # two clients: the same sums in the same order on both paths
        assert torch.equal(original[name], optimized[name]), name
        for finals in (finals_o, finals_p):  # every client ends holding the server's final global model
            assert torch.equal(finals[0][name], finals[1][name])
    assert hist_o[-1]["test_accuracy"] == pytest.approx(hist_p[-1]["test_accuracy"], abs=1 / 64)


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
