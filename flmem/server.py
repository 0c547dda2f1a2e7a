"""The FL server: synchronous FedAvg rounds over the global model (no gRPC here).

Round r: every client fetches the round-r global model, trains, and pushes its update with
its sample count; when all ``num_clients`` updates are in, the server aggregates them into the
round-(r+1) global model, evaluates it on the test split and publishes it. After the last round
it waits until every client has fetched the final model, then returns.

* Original aggregation: the server keeps every client's whole model until the round ends,
  then calls :func:`~flmem.strategy.aggregate`; each fetch serializes the global model anew.
* Optimized aggregation: each update is folded into one running sum as it streams in
  (:class:`~flmem.strategy.StreamingFedAvg`), and the global model is served from its own storage.
"""
from __future__ import annotations

import gc
import threading
import time

import torch

from flmem.codec import ModelCodec
from flmem.phases import NO_PHASES, PhaseLog
from flmem.strategy import StreamingFedAvg, aggregate
from flmem.trainer import evaluate


class RoundTimeoutError(TimeoutError):
    """Not every client update (or final fetch) arrived in time."""


class FedAvgServer:
    """Holds the global model and runs the rounds.

    Args:
        model: the global model (its initial weights are round 0's global model).
        test_data: dataset to evaluate the global model on after each round (None: no evaluation).
        num_clients, rounds: N and R.
        codec: how models are encoded and received.
        streaming: fold updates as they arrive (optimized) instead of keeping N models.
        weighted: FedAvg weights by sample count (True) or uniform (False).
        round_timeout_s: how long a round may wait for its updates.
        eval_batch_size: test batch size (activations of one batch are part of the server's peak).
        status: a :class:`~flmem.status.StatusWriter` (or None).
        phases: records the FL phases of :meth:`run`: per round ``receive`` (waiting for the client updates;
            gRPC handler threads receive or fold them meanwhile), ``aggregate``, ``evaluate`` (with the round's
            bookkeeping and publishing; without test data that is part of ``aggregate``), then ``serve final``.
    """

    def __init__(self, model: torch.nn.Module, test_data, *, num_clients: int, rounds: int, codec: ModelCodec,
                 streaming: bool, weighted: bool = True, round_timeout_s: float = 600.0, eval_batch_size: int = 64,
                 status=None, phases: PhaseLog = NO_PHASES):
        self.model, self.test_data = model, test_data
        self.phases = phases
        self.num_clients, self.rounds = num_clients, rounds
        self.codec, self.streaming, self.weighted = codec, streaming, weighted
        self.round_timeout_s, self.status, self.eval_batch_size = round_timeout_s, status, eval_batch_size
        self.state = model.state_dict()  # tensors share the parameters' storage
        self.aggregator = StreamingFedAvg(self.state) if streaming else None
        self.updates: dict[int, tuple[dict, float]] = {}
        self.received: set[int] = set()
        self.receiving: set[int] = set()  # ranks whose update is streaming in now
        self.final_fetched: set[int] = set()
        self.published = -1
        self.errors: list[BaseException] = []
        self.cond = threading.Condition()
        self.history: list[dict] = []
        self.transfers: list[dict] = []  # per model stream: direction, rank, bytes, seconds (encode + send/receive)
        self._serving: dict[tuple[int, int], tuple[float, int]] = {}
        self._fold_slot = threading.Semaphore(1)

    # ---------------------------------------------------------------- called by gRPC handlers
    def global_model(self, round_idx: int, rank: int):
        """``(header, finished, chunks)`` of the round-``round_idx`` global model, once it exists."""
        self._check_rank(rank)
        with self.cond:
            if not self.cond.wait_for(lambda: self.published >= round_idx or self.errors, self.round_timeout_s):
                raise RoundTimeoutError(f"the round-{round_idx} global model was not ready within "
                                        f"{self.round_timeout_s:g} s (timeouts.round_s)")
            if self.errors:
                raise RuntimeError(f"server failed: {self.errors[0]}")
            if self.published != round_idx:
                raise ValueError(f"client {rank} asked for round {round_idx}, but the server is at round "
                                 f"{self.published}")
        started = time.time()
        header, chunks = self.codec.encode(self.state)
        self._serving[(round_idx, rank)] = (started, header["total_bytes"])
        return header, round_idx == self.rounds, chunks

    def fetch_done(self, round_idx: int, rank: int) -> None:
        """Called when the round-``round_idx`` global model has been streamed to client ``rank``."""
        started, nbytes = self._serving.pop((round_idx, rank), (time.time(), 0))
        with self.cond:
            self.transfers.append({"direction": "global", "rank": rank, "bytes": nbytes,
                                   "seconds": time.time() - started})
            if round_idx == self.rounds:
                self.final_fetched.add(rank)
                self.cond.notify_all()

    def receive_update(self, round_idx: int, rank: int, num_samples: int, header: dict, chunks) -> int:
        """Take client ``rank``'s round-``round_idx`` update; returns how many the round holds now.

        Raises:
            ValueError: wrong round, unknown or repeated rank, or no samples.
        """
        self._check_rank(rank)
        with self.cond:
            if round_idx != self.published or round_idx >= self.rounds:
                raise ValueError(f"client {rank} sent an update for round {round_idx}; the server collects "
                                 f"round {self.published}")
            if rank in self.received or rank in self.receiving:
                raise ValueError(f"client {rank} sent a second update for round {round_idx}")
            self.receiving.add(rank)  # claimed before streaming: a concurrent duplicate is refused too
        try:
            return self._take_update(rank, num_samples, header, chunks)
        finally:
            with self.cond:
                self.receiving.discard(rank)

    def _take_update(self, rank: int, num_samples: int, header: dict, chunks) -> int:
        if num_samples <= 0:
            raise ValueError(f"client {rank} reported {num_samples} training samples")
        weight = float(num_samples) if self.weighted else 1.0
        if self.streaming:
            # One update streams in at a time: the others wait in gRPC's flow-control window (about a
            # chunk each), so the server never holds N clients' in-flight data at once.
            with self._fold_slot:
                started = time.time()
                self.codec.fold(header, chunks, self.aggregator, weight)
        else:
            started = time.time()
            update = self.codec.receive(header, chunks)
            with self.cond:
                self.updates[rank] = (update, weight)
        with self.cond:
            self.transfers.append({"direction": "update", "rank": rank, "bytes": header["total_bytes"],
                                   "seconds": time.time() - started})
            self.received.add(rank)
            self.cond.notify_all()
            return len(self.received)

    def record_error(self, exc: BaseException) -> None:
        with self.cond:
            self.errors.append(exc)
            self.cond.notify_all()

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_clients:
            raise ValueError(f"client rank {rank} is outside 0..{self.num_clients - 1} (num_clients="
                             f"{self.num_clients}); start clients with role.rank below num_clients")

    # ---------------------------------------------------------------- the rounds
    def _wait(self, predicate, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate() or self.errors, self.round_timeout_s):
                raise RoundTimeoutError(f"{what} within {self.round_timeout_s:g} s (timeouts.round_s); "
                                        "a client is missing, slow or dead")
            if self.errors:
                raise self.errors[0]

    def _publish(self, round_idx: int) -> None:
        with self.cond:
            self.published = round_idx
            self.received = set()
            self.cond.notify_all()

    def run(self) -> list[dict]:
        """Run all rounds; returns one metrics record per round."""
        self._publish(0)
        for r in range(self.rounds):
            started = time.time()
            with self.phases.fl("receive", r):
                self._wait(lambda: len(self.received) == self.num_clients,
                           f"round {r}: only {len(self.received)} of {self.num_clients} client updates arrived")
            with self.phases.fl("aggregate", r):
                agg_start = time.time()
                if self.streaming:
                    self.aggregator.finalize_into(self.state)
                else:
                    ordered = [self.updates[k] for k in sorted(self.updates)]
                    self.model.load_state_dict(aggregate(ordered))
                    self.updates = {}  # the original path holds the N models until here
                    del ordered
                    if self.codec.release:
                        gc.collect()
                record = {"round": r, "aggregate_s": time.time() - agg_start}
                if self.test_data is None:
                    self._end_round(r, record, started)
            if self.test_data is not None:
                with self.phases.fl("evaluate", r):
                    scores = evaluate(self.model, self.test_data, self.eval_batch_size)
                    record.update({f"test_{k}": v for k, v in scores.items()})
                    self._end_round(r, record, started)
        with self.phases.fl("serve final", self.rounds):
            self._wait(lambda: len(self.final_fetched) == self.num_clients,
                       f"only {len(self.final_fetched)} of {self.num_clients} clients fetched the final model")
        return self.history

    def _end_round(self, r: int, record: dict, started: float) -> None:
        """Record round ``r``'s metrics and publish the round-``r+1`` global model."""
        record["round_s"] = time.time() - started
        with self.cond:
            record["transfers"], self.transfers = self.transfers, []
        self.history.append(record)
        if self.status:
            self.status.metric(record)
            self.status.update(phase="training", rounds_done=r + 1, test_accuracy=record.get("test_accuracy"))
        self._publish(r + 1)
