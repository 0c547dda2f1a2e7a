"""Whole FedAvg rounds over real gRPC on 127.0.0.1, in one process (fast); both memory paths agree."""
import threading

import pytest
import torch
from omegaconf import OmegaConf

from flmem import data
from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.models import SmallCNN
from flmem.server import RoundServer
from flmem.strategies import FedAvg
from flmem.trainer import Trainer
from flmem.transport import ServerConnection, TransportError, serve

DS = OmegaConf.create({"name": "synthetic", "root": None, "download": False, "channels": 3, "image_size": 32,
                       "num_classes": 10, "train_size": 256, "test_size": 64, "samples_per_client": 40,
                       "test_samples": 64, "partition": "iid", "alpha": 0.5, "seed": 0})


def federate(optimized: bool, num_clients=2, rounds=2, chunk_size=64 * 1024, strategy=None, proximal_mu=0.0):
    """A whole job in this process: a RoundServer and ``num_clients`` client threads over real gRPC."""
    torch.manual_seed(0)
    codec = ModelCodec(optimized, optimized, chunk_size, release=optimized)
    fl = RoundServer(SmallCNN(), data.test_dataset(DS), strategy=strategy or FedAvg(), num_clients=num_clients,
                     rounds=rounds, codec=codec, streaming=optimized, round_timeout_s=60)
    server, port = serve(fl, "127.0.0.1", 0, 4 * 2**20, max_workers=3 * num_clients + 4)
    finals, histories, errors = {}, {}, []

    def client(rank):
        try:
            model = SmallCNN()
            trainer = Trainer(model, data.client_dataset(DS, rank, num_clients, release=optimized), batch_size=8,
                              local_steps=2, optimizer="sgd", lr=0.05, seed=0, rank=rank, optimized=optimized,
                              release=optimized, proximal_mu=proximal_mu)
            conn = ServerConnection(f"127.0.0.1:{port}", 4 * 2**20, 60)
            conn.wait_ready(10)
            histories[rank] = run_client(conn, trainer, codec, rank=rank, rounds=rounds)
            finals[rank] = {k: v.clone() for k, v in model.state_dict().items()}
            conn.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(num_clients)]
    for t in threads:
        t.start()
    try:
        history = fl.run()
    finally:
        for t in threads:
            t.join(60)
        server.stop(0)
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
