"""A real RoundServer on 127.0.0.1 and the clients that test it: honest ones (``run_client`` with a
:class:`~flmem.trainer.Perturber`, no data to load) and a hostile one that speaks the protocol through the
generated stubs and does what an honest client never would (stall, stop reading, ask for far rounds)."""
from __future__ import annotations

import threading
import time

import grpc
import torch

from flmem import serde
from flmem.client import run_client
from flmem.codec import ModelCodec
from flmem.models import SmallCNN
from flmem.proto import flmem_pb2, flmem_pb2_grpc
from flmem.server import RoundServer
from flmem.strategies import FedAvg
from flmem.trainer import Perturber
from flmem.channel import channel_options, max_rpcs
from flmem.transport import ServerConnection, serve

MAX_MESSAGE = 4 * 2**20


class Job:
    """A RoundServer for ``num_clients`` clients over real gRPC (``max_rpcs(num_clients)`` handler threads), its
    run in a thread (:meth:`start`), and honest clients in threads (:meth:`honest`)."""

    def __init__(self, num_clients=2, rounds=1, optimized=True, chunk_size=256 * 1024, idle_s=60.0,
                 round_timeout_s=60.0, strategy=None, min_rate_bytes_s=None):
        torch.manual_seed(0)
        self.codec = ModelCodec(optimized, optimized, chunk_size, release=optimized)
        self.num_clients, self.rounds = num_clients, rounds
        self.fl = RoundServer(SmallCNN(), None, strategy=strategy or FedAvg(), num_clients=num_clients,
                              rounds=rounds, codec=self.codec, streaming=optimized, round_timeout_s=round_timeout_s)
        self.server, self.port = serve(self.fl, "127.0.0.1", 0, MAX_MESSAGE, max_workers=max_rpcs(num_clients),
                                       lean=True, idle_s=idle_s, min_rate_bytes_s=min_rate_bytes_s)
        self.history, self.error, self.histories, self.client_errors = None, None, {}, {}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Run the rounds in a thread; :meth:`finish` joins it."""
        def run():
            try:
                self.history = self.fl.run()
            except BaseException as exc:  # noqa: BLE001 - the test asserts it
                self.error = exc
        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()

    def honest(self, rank: int, gate: threading.Event | None = None) -> None:
        """An honest client ``rank`` in a thread; ``gate``: it trains round 0 only once the gate is set."""
        def client():
            model = SmallCNN()
            trainer = Perturber(model, 40, seed=0, rank=rank)
            if gate is not None:
                train = trainer.train_round
                trainer.train_round = lambda r: (gate.wait(60), train(r))[1]
            conn = ServerConnection(f"127.0.0.1:{self.port}", MAX_MESSAGE, 60, lean=True)
            try:
                conn.wait_ready(10)
                self.histories[rank] = run_client(conn, trainer, self.codec, rank=rank, rounds=self.rounds)
            except Exception as exc:  # noqa: BLE001 - the test asserts it
                self.client_errors[rank] = exc
            finally:
                conn.close()
        self.threads.append(threading.Thread(target=client, daemon=True))
        self.threads[-1].start()

    def finish(self, timeout_s: float = 60) -> None:
        for t in self.threads:
            t.join(timeout_s)
        self.server.stop(0)

    def header(self) -> bytes:
        """The header an honest client would send with its update (the global model's own)."""
        header, _ = self.codec.encode(self.fl.state)
        return serde.dumps_header(header)

    def chunks(self) -> list[tuple[int, bytes]]:
        return [(offset, bytes(data)) for offset, data in self.codec.encode(self.fl.state)[1]]


def wait_until(predicate, timeout_s: float = 30, what: str = "the condition") -> None:
    """Poll ``predicate`` (the server's state moves in other threads); AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.01)


class Hostile:
    """A client that speaks the protocol through the generated stubs, with no flmem client code."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(MAX_MESSAGE, lean=True))
        self.stub = flmem_pb2_grpc.FederatedLearningStub(self.channel)
        self.releases: list[threading.Event] = []

    def join(self, rank: int):
        """Open a presence stream for ``rank``; ``.cancel()`` it to leave."""
        return self.stub.Join(flmem_pb2.JoinRequest(client_rank=rank))

    def fetch(self, rank: int, round_idx: int, timeout_s: float = 30):
        """A fetch stream (an iterator of ModelChunk; ``next`` reads one message)."""
        return self.stub.FetchGlobalModel(flmem_pb2.FetchRequest(client_rank=rank, round=round_idx),
                                          timeout=timeout_s)

    def push(self, first: flmem_pb2.ModelChunk | None = None, chunks=(), pace_s: float = 0.0,
             stall: bool = False, timeout_s: float = 60, stalled: threading.Event | None = None):
        """Start a push: ``first`` (none: send nothing at all), then ``chunks`` (``(offset, data)``), one every
        ``pace_s`` seconds; ``stall``: then send nothing more (the stream stays open until :meth:`close`), and set
        ``stalled`` once gRPC has taken every message. Returns the call's future (keep it: a dropped call is
        cancelled)."""
        release = threading.Event()
        self.releases.append(release)

        def messages():
            if first is not None:
                yield first
            for offset, data in chunks:
                if pace_s:
                    time.sleep(pace_s)
                yield flmem_pb2.ModelChunk(offset=offset, data=data)
            if stall or first is None:
                if stalled is not None:
                    stalled.set()
                release.wait()
        return self.stub.PushUpdate.future(messages(), timeout=timeout_s)

    @staticmethod
    def first(header: bytes, rank: int, round_idx: int = 0, num_samples: int = 40) -> flmem_pb2.ModelChunk:
        return flmem_pb2.ModelChunk(header=header, round=round_idx, client_rank=rank, num_samples=num_samples)

    def close(self) -> None:
        for release in self.releases:
            release.set()
        self.channel.close()
