"""The round server: synchronous FL rounds over the global model (no gRPC here, no algorithm either).

Round r: the strategy samples the clients that train; each of them fetches the round-r global model, trains,
and pushes its update with its sample count; the others are told to wait for the next round. When every sampled
client's update has arrived or failed, the strategy checks its failure policy and turns the updates into the
round-(r+1) global model; the server evaluates it on the test split and publishes it. After the last round it
waits until every live client has fetched the final model.

What the server keeps is the strategy's business (:mod:`flmem.strategies`): on the original path
(``streaming=False``) every update is received whole and handed to ``strategy.accept``; on the optimized path
updates are added to a running sum one at a time in rank order (``combine = "sum"``), or chunk k of every update is
reduced together (``combine = "coordinate"``, :mod:`flmem.lockstep`). The global model is served from its own
storage on both paths (each fetch encodes it anew). On the optimized path a client that fails after part of its
update was combined is one failed update too: the round's aggregate restarts without it and the clients whose
values were used send theirs again (:mod:`flmem.restart`).
"""
from __future__ import annotations

import gc
import sys
import threading
import time

import torch

from flmem import serde, wire
from flmem.codec import ModelCodec
from flmem.lockstep import AlignedChunks
from flmem.phases import NO_PHASES, PhaseLog
from flmem.restart import ResendRequested
from flmem.rounds import OPEN, RoundState, UpdateRefused
from flmem.strategies.base import RoundFailedError, Strategy, describe_failures
from flmem.trainer import evaluate


class RoundTimeoutError(TimeoutError):
    """The final fetches did not complete in time."""


class FetchRefused(ValueError):
    """A fetch that would wait for a round not yet in reach, or a second fetch of one client at a time."""


class RoundServer:
    """Holds the global model and runs the rounds of ``strategy``.

    Args:
        model: the global model (its initial weights are round 0's global model).
        test_data: dataset to evaluate the global model on after each round (None: no evaluation).
        strategy: a :class:`~flmem.strategies.Strategy`.
        num_clients, rounds: N and R.
        codec: how models are encoded and received.
        streaming: the optimized aggregation path (see the module docstring).
        seed: the job's seed (client sampling).
        round_timeout_s: how long a round waits for its updates, and round 0 for the clients to join (seconds).
        eval_batch_size: test batch size (activations of one batch are part of the server's peak).
        status: a :class:`~flmem.status.StatusWriter` (or None).
        phases: records the FL phases of :meth:`run`: per round ``receive`` (sampling, then waiting for the
            updates while gRPC handler threads receive or combine them), ``aggregate``, ``evaluate`` (with the round's
            bookkeeping and publishing; without test data that is part of ``aggregate``), then ``serve final``.
        non_finite: ``reject`` (refuse an update holding a NaN or infinity in a floating tensor, checked before
            any of it is combined) or ``accept`` (``server.non_finite``).
    Raises:
        ValueError: ``non_finite`` is neither.
    """

    def __init__(self, model: torch.nn.Module, test_data, *, strategy: Strategy, num_clients: int, rounds: int,
                 codec: ModelCodec, streaming: bool, seed: int = 0, round_timeout_s: float = 600.0,
                 eval_batch_size: int = 64, status=None, phases: PhaseLog = NO_PHASES, non_finite: str = "reject"):
        if non_finite not in wire.NON_FINITE:
            raise ValueError(f"server.non_finite={non_finite}: must be reject or accept")
        self.non_finite = non_finite
        self.model, self.test_data, self.strategy = model, test_data, strategy
        self.num_clients, self.rounds, self.seed = num_clients, rounds, seed
        self.codec, self.streaming = codec, streaming
        self.round_timeout_s, self.eval_batch_size = round_timeout_s, eval_batch_size
        self.status, self.phases = status, phases
        self.state = model.state_dict()  # tensors share the parameters' storage
        self.layout = serde.Layout.of(self.state)
        self.header_cap = wire.header_cap(self.layout)  # the longest update header read (bytes)
        self.joined: set[int] = set()
        self.departed: dict[int, str] = {}
        self.final_fetched: set[int] = set()
        self.current: RoundState | None = None
        self.lockstep: AlignedChunks | None = None
        self.published = -1
        self.errors: list[BaseException] = []
        self.finished = threading.Event()
        self.cond = threading.Condition()
        self.history: list[dict] = []
        self.transfers: list[dict] = []  # per model stream: direction, rank, bytes, seconds (encode + send/receive)
        self._serving: dict[tuple[int, int], tuple[float, int]] = {}
        self._turn = None  # (rank, UpdateTurn) of the update being added to the running sum
        self.fetching: set[int] = set()  # ranks with a fetch under way (waiting or streaming): one each

    # ---------------------------------------------------------------- called by gRPC handlers
    def join(self, rank: int) -> None:
        """Client ``rank`` is connected (its presence stream is open)."""
        self._check_rank(rank)
        with self.cond:
            self.joined.add(rank)
            self.departed.pop(rank, None)
            self.cond.notify_all()

    def leave(self, rank: int) -> None:
        """Client ``rank``'s presence stream closed: unless it is done, it leaves the job (and its round)."""
        with self.cond:
            if self.finished.is_set() or rank in self.final_fetched:
                return
            self.departed[rank] = "its connection closed (the client process exited or its network failed)"
            self._fail(rank, f"left the job: {self.departed[rank]}")
            self.cond.notify_all()

    def global_model(self, round_idx: int, rank: int, active=lambda: True):
        """``(header, finished, chunks)`` of the round-``round_idx`` global model once it exists, or
        ``(None, next_round, None)``: client ``rank`` does not train in that round and should ask for ``next_round``.
        After a returned header, :meth:`fetch_ended` must follow when the stream ends (sent or not).

        A fetch may wait for the round being collected or the next one (a client that pushed its update waits
        while the round aggregates), or, once the rounds are over, the final model; an earlier round is answered
        with the current one. ``active``: False once the caller's call is gone (it then stops waiting; call
        :meth:`wake` when that changes).

        Raises:
            FetchRefused: at once, for a later round, or while another fetch of ``rank`` is under way.
            RuntimeError: the server failed or stopped, or the call went away while waiting.
            ValueError: a rank or round outside the job.
        """
        self._check_rank(rank)
        if not 0 <= round_idx <= self.rounds:
            raise ValueError(f"client {rank} asked for round {round_idx}; this job has rounds 0..{self.rounds}")
        with self.cond:
            self._admit_fetch(round_idx, rank)
        streaming = False
        try:
            with self.cond:
                # No deadline here: a round may take timeouts.round_s plus aggregation and evaluation; the client's
                # own call deadline (timeouts.rpc_s) bounds the wait, and a cancelled call wakes it (``active``).
                self.cond.wait_for(lambda: self.published >= round_idx or self.errors or self.finished.is_set()
                                   or not active() or self._resend_asked(round_idx, rank))
                if self._resend_asked(round_idx, rank):  # its update was in a discarded sum: it sends it again first
                    raise ResendRequested(f"client {rank}'s round-{round_idx - 1} update was in a discarded sum",
                                          round_idx - 1)
                if self.errors or self.published < round_idx:
                    raise RuntimeError(f"server failed: {self.errors[0]}" if self.errors else
                                       f"client {rank}'s fetch of round {round_idx} ended before that round: "
                                       + ("the server stopped" if self.finished.is_set() else "the call went away"))
                self.joined.add(rank)
                if round_idx < self.published:  # a client that fell behind joins the current round
                    return None, self.published, None
                if round_idx < self.rounds and rank not in self.current.status:
                    return None, round_idx + 1, None  # not sampled: no model is encoded or sent for it
            started = time.time()
            header, chunks = self.codec.encode(self.state)
            self._serving[(round_idx, rank)] = (started, header["total_bytes"])
            streaming = True
            return header, round_idx == self.rounds, chunks
        finally:
            if not streaming:
                self.fetch_ended(rank)

    def _admit_fetch(self, round_idx: int, rank: int) -> None:
        """Refuse at once what would hold a handler thread for nothing (lock held): see :meth:`global_model`."""
        if self.published < self.rounds and round_idx > self.published + 1:
            allowed = "0 (the rounds have not begun)" if self.published < 0 else \
                f"{self.published} (being collected) or {self.published + 1} (the next one)"
            raise FetchRefused(f"client {rank} asked for the round-{round_idx} global model; the server serves "
                               f"round {allowed} now, or the final model (round {self.rounds}) after the last round")
        if rank in self.fetching:
            raise FetchRefused(f"client {rank} asked for the round-{round_idx} global model while its previous "
                               "fetch is still under way: one fetch at a time per client")
        self.fetching.add(rank)

    def fetch_ended(self, rank: int) -> None:
        """Client ``rank``'s fetch stream ended (sent whole, cancelled or failed): it may fetch again."""
        with self.cond:
            self.fetching.discard(rank)

    def wake(self) -> None:
        """Let every waiting handler re-check why it waits (e.g. its call was cancelled)."""
        with self.cond:
            self.cond.notify_all()

    def _resend_asked(self, round_idx: int, rank: int) -> bool:
        """Client ``rank``, asking for round ``round_idx``, must first send its round-``round_idx - 1`` update again
        (lock held)."""
        return self.current is not None and self.current.round == round_idx - 1 and \
            self.current.status.get(rank) == "resend"

    def fetch_done(self, round_idx: int, rank: int) -> None:
        """Called when the round-``round_idx`` global model has been streamed to client ``rank``."""
        started, nbytes = self._serving.pop((round_idx, rank), (time.time(), 0))
        with self.cond:
            self.transfers.append({"direction": "global", "rank": rank, "bytes": nbytes,
                                   "seconds": time.time() - started})
            if round_idx == self.rounds:
                self.final_fetched.add(rank)
                self.cond.notify_all()

    def receive_update(self, round_idx: int, rank: int, num_samples: int, incoming: wire.Incoming,
                       peer: str = "") -> None:
        """Take client ``rank``'s round-``round_idx`` update from ``incoming`` (its header not read yet), checked
        against the global model (:mod:`flmem.wire`) before anything is allocated or combined.

        A refused update is recorded with ``rank``, ``peer`` (the client's address), the reason and the bytes
        received so far: in the round's ``failures`` when ``rank`` takes part in it (the client is then out of the
        round; the round goes on without it, as the strategy's failure policy allows), else in its ``refused``;
        and printed on stderr.

        Raises:
            ResendRequested: the update was not used (the round's aggregate restarted without a failed client):
                the client must send it again.
            UpdateRefused: the update is refused; the message names the client, its address and the bytes
                received; ``precondition`` is True when the update was not expected at all (wrong round, a rank not
                sampled, a repeat), False when it was bad (if part of it was combined, the round's aggregate
                restarts without it).
        """
        who = f"client {rank} ({peer or 'in-process'})"
        with self.cond:
            try:
                self._check_rank(rank)
                if round_idx != self.published or round_idx >= self.rounds:
                    now = "the rounds are over" if self.published >= self.rounds else \
                        f"the server collects round {self.published}"
                    raise UpdateRefused(f"client {rank} sent an update for round {round_idx}, but {now}: it came "
                                        "late or early")
                self.current.claim(rank)
            except (UpdateRefused, ValueError) as exc:
                message = f"update of {who} for round {round_idx} refused after {incoming.received} bytes: {exc}"
                if self.current is not None:
                    self.current.refused.append({"rank": rank, "peer": peer, "reason": str(exc),
                                                 "bytes_received": incoming.received})
                print(f"flmem server: {message}", file=sys.stderr, flush=True)
                raise UpdateRefused(message, precondition=True) from None
            state = self.current
        started = time.time()
        try:
            header = incoming.header(self.header_cap)
            queued_s = self._take(state, rank, num_samples, header, incoming.chunks())
        except ResendRequested:  # the chunk-aligned reduction restarted without another client
            with self.cond:
                state.resend(rank)
                self.cond.notify_all()
            raise
        except Exception as exc:  # noqa: BLE001 - a bad update is refused alone
            reason = f"{type(exc).__name__}: {exc}"
            message = f"update of {who} for round {round_idx} refused after {incoming.received} bytes: {reason}"
            with self.cond:  # if part of it was combined, the round's aggregate restarts without it
                self._fail(rank, reason, peer=peer, bytes_received=incoming.received)
                self.cond.notify_all()
            print(f"flmem server: {message}", file=sys.stderr, flush=True)
            raise UpdateRefused(message) from None
        with self.cond:
            self.transfers.append({"direction": "update", "rank": rank, "bytes": header["total_bytes"],
                                   "seconds": time.time() - started - queued_s, "queued_s": queued_s})
            state.set(rank, "done")
            self.cond.notify_all()

    def _take(self, state: RoundState, rank: int, num_samples: int, header: dict, chunks) -> float:
        """Receive and combine one update; returns the seconds it waited for its turn (rank order)."""
        if num_samples <= 0:
            raise ValueError(f"client {rank} reported {num_samples} training samples")
        self.codec.check_header(header, self.layout)  # format, table, size: before anything is allocated
        weight = self.strategy.weight(num_samples)
        if not self.streaming:
            update = self.codec.receive(header, chunks, self.layout, self.non_finite)
            with self.cond:
                self.strategy.accept(rank, weight, update)
            return 0.0
        if self.strategy.combine == "coordinate":
            self.lockstep.feed(rank, self.codec.aligned_chunks(header, chunks, self.layout, self.non_finite))
            return 0.0
        # One update is added at a time, in rank order: the others wait in gRPC's flow-control window (about a
        # chunk each), and the sum is the same float whatever order the updates arrive in.
        queued = time.time()
        with self.cond:
            self.cond.wait_for(lambda: (state.turn() == rank and self._turn is None) or self.errors
                               or self.finished.is_set() or state.status.get(rank) not in OPEN)
            if self.errors or self.finished.is_set():
                raise RuntimeError(f"server failed: {self.errors[0]}" if self.errors else "the server stopped")
            if state.status.get(rank) not in OPEN:  # left the job or timed out while it waited for its turn
                raise UpdateRefused(next((f["reason"] for f in state.failures if f["rank"] == rank),
                                         f"client {rank} is out of round {state.round}"))
            state.set(rank, "combining")
            turn = self._turn = (rank, self.strategy.running.turn())  # one update combines at a time (rank order)
        queued = time.time() - queued
        self.codec.fold(header, chunks, turn[1], weight, self.non_finite)  # on failure the turn stays open until _fail closes it
        with self.cond:
            if self._turn is turn:
                self._turn = None
        return queued

    def record_error(self, exc: BaseException) -> None:
        with self.cond:
            self.errors.append(exc)
            self.cond.notify_all()

    def _fail(self, rank: int, reason: str, **details) -> None:
        """Take ``rank`` out of the current round (lock held); if part of its update was combined, the round's
        aggregate restarts without it (:mod:`flmem.restart`). ``details``: recorded with the failure (peer,
        bytes_received)."""
        state = self.current
        if state is None or state.fail(rank, reason, **details) is None:
            return
        if self.lockstep is not None and self.lockstep.drop(rank, reason):  # lock order: server, then lockstep
            state.restarts += 1
        if self._turn is not None and self._turn[0] == rank:
            turn, self._turn = self._turn[1], None
            if self.strategy.running.abandon(turn.number):  # its later folds are refused either way
                state.restart(self.departed)

    def _lockstep_dropped(self, late: dict[int, str], restarted: bool) -> None:
        """The lockstep dropped participants that stalled (called outside its lock)."""
        with self.cond:
            for rank, reason in late.items():
                self._fail(rank, reason)
            self.current.restarts += restarted
            self.cond.notify_all()

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_clients:
            raise ValueError(f"client rank {rank} is outside 0..{self.num_clients - 1} (num_clients="
                             f"{self.num_clients}); start clients with role.rank below num_clients")

    # ---------------------------------------------------------------- the rounds
    def _wait(self, predicate, timeout_s: float) -> bool:
        with self.cond:
            done = self.cond.wait_for(lambda: predicate() or self.errors, timeout_s)
            if self.errors:
                raise self.errors[0]
            return bool(done)

    def _begin(self, r: int) -> RoundState:
        """Sample round ``r``'s clients and publish the round-``r`` global model."""
        if r == 0:  # the clients start while the server does: wait (bounded) until each has joined or left
            self._wait(lambda: len(self.joined | set(self.departed)) == self.num_clients, self.round_timeout_s)
        with self.cond:
            available = sorted(self.joined - set(self.departed))
            try:
                sampled = self.strategy.sample(r, available, self.seed)
            except ValueError as exc:
                raise RoundFailedError(f"{exc}; clients that left the job: {self.departed or 'none'}") from None
            self.strategy.begin_round(r, self.state)
            self.current, self._turn = RoundState(r, sampled), None
            if self.streaming and self.strategy.combine == "coordinate":
                self.lockstep = AlignedChunks(self.layout, self.codec.chunk_size, sampled,
                                              lambda offset, datas: self.strategy.reduce_chunk(
                                                  self.layout, offset, datas, self.state), self.round_timeout_s,
                                              self._lockstep_dropped)
            self.published = r
            self.cond.notify_all()
            return self.current

    def run(self) -> list[dict]:
        """Run all rounds; returns one metrics record per round.

        Raises:
            RoundFailedError: a round's updates do not satisfy the strategy's failure policy.
            RoundTimeoutError: the final model was not fetched in time.
        """
        try:
            return self._run()
        finally:
            with self.cond:  # every waiting handler (fetch, turn, presence) returns at once: the process can exit
                self.finished.set()
                self.cond.notify_all()
                lockstep = self.lockstep
            if lockstep is not None:
                lockstep.stop("the server stopped before the round completed")

    def _run(self) -> list[dict]:
        for r in range(self.rounds):
            started = time.time()
            with self.phases.fl("receive", r):
                state = self._begin(r)
                if not self._wait(state.settled, self.round_timeout_s):
                    with self.cond:  # clients that sent nothing in time are out; streams under way may finish
                        for rank in state.pending():
                            self._fail(rank, f"late: no update within {self.round_timeout_s:g} s (timeouts.round_s)")
                        self.cond.notify_all()
                    if not self._wait(state.settled, self.round_timeout_s):
                        with self.cond:
                            raise RoundFailedError(self._unsettled(state))
                with self.cond:
                    self.strategy.check_round(r, state.arrived(), state.failures)
            with self.phases.fl("aggregate", r):
                agg_start = time.time()
                metrics = self.strategy.end_round(r, self.state, self.streaming)
                self.lockstep = None
                if self.codec.release:
                    gc.collect()
                record = {"round": r, "strategy": self.strategy.name, **state.record(), **metrics,
                          "aggregate_s": time.time() - agg_start}
                if self.test_data is None:
                    self._end_round(r, record, started)
            if self.test_data is not None:
                with self.phases.fl("evaluate", r):
                    scores = evaluate(self.model, self.test_data, self.eval_batch_size)
                    record.update({f"test_{k}": v for k, v in scores.items()})
                    self._end_round(r, record, started)
        with self.phases.fl("serve final", self.rounds):
            live = lambda: self.joined - set(self.departed) - self.final_fetched  # noqa: E731
            if not self._wait(lambda: not live(), self.round_timeout_s):
                raise RoundTimeoutError(f"client(s) {sorted(live())} did not fetch the final model within "
                                        f"{self.round_timeout_s:g} s (timeouts.round_s)")
        return self.history

    def _unsettled(self, state: RoundState) -> str:
        """Why round ``state.round`` did not settle within 2 x timeouts.round_s, client by client (lock held)."""
        arrived = state.arrived()
        sending = [k for k in state.sampled if state.status[k] in ("receiving", "combining")]
        parts = [f"round {state.round}: {len(arrived)} of {len(state.sampled)} client updates arrived within "
                 f"2 x timeouts.round_s = {2 * self.round_timeout_s:g} s (arrived: {arrived or 'none'})"]
        turn = state.turn()
        if self.streaming and self.strategy.combine == "sum" and turn in sending:
            # updates are added one at a time: the others wait for the one being added, through no fault of theirs
            parts.append(f"client {turn} was still sending its update")
            if len(sending) > 1:
                parts.append(f"client(s) {[k for k in sending if k != turn]} waited for their turn behind it")
        elif sending:
            parts.append(f"client(s) {sending} were still sending their updates")
        parts.append(describe_failures(state.failures))
        return "; ".join(parts)

    def _end_round(self, r: int, record: dict, started: float) -> None:
        """Record round ``r``'s metrics and publish the round-``r+1`` global model."""
        record["round_s"] = time.time() - started
        with self.cond:
            record["transfers"], self.transfers = self.transfers, []
        self.history.append(record)
        if self.status:
            self.status.metric(record)
            self.status.update(phase="training", rounds_done=r + 1, test_accuracy=record.get("test_accuracy"))
        if r + 1 == self.rounds:
            with self.cond:
                self.current = None
                self.published = self.rounds
                self.cond.notify_all()
