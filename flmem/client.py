"""The FL client loop (no gRPC here): fetch the global model, train locally, push the update; rounds this client
is not sampled for are skipped."""
from __future__ import annotations

import sys
import time

from flmem import serde, wire
from flmem.codec import ModelCodec
from flmem.phases import NO_PHASES, PhaseLog
from flmem.trainer import Trainer
from flmem.transport import Skip


def run_client(connection, trainer: Trainer, codec: ModelCodec, *, rank: int, rounds: int, status=None,
               phases: PhaseLog = NO_PHASES, train_phase: str = "train") -> list[dict]:
    """Take part in ``rounds`` synchronous FL rounds (those the server samples this client for), then fetch the
    final global model.

    Args:
        connection: a :class:`~flmem.transport.ServerConnection` (anything with ``fetch``/``push``), or
            None for ``client.mode=local_only``: the same loop with no communication at all.
        trainer: trains ``trainer.model`` in place; the global model is received into it.
        codec: how models are received and encoded.
        phases: records the FL phases ``fetch``, ``train_phase`` and ``push`` of each round, then the final
            ``fetch`` (``client.mode=local_only``: ``train_phase`` only); they follow each other without gaps.
    Returns:
        One metrics record per round: loss, update_norm, seconds spent fetching/training/pushing, ``accepted``
        (False with ``refused``: the server refused the update, e.g. it came late); a round this client was not
        sampled for has ``sampled: False`` only.
    Raises:
        flmem.transport.TransportError: the server went away or refused an update.
        RuntimeError: the server says the run finished before ``rounds`` rounds.
    """
    state = trainer.model.state_dict()  # tensors share the parameters' storage
    header_cap = wire.header_cap(serde.Layout.of(state))  # the longest global-model header read (bytes)
    history = []

    def book(record: dict, t0: float, t1: float, t2: float) -> None:
        record.update(fetch_s=t1 - t0, train_s=t2 - t1, push_s=time.time() - t2)
        history.append(record)
        if status:
            status.metric(record)
            status.update(phase="training", rounds_done=record["round"] + 1, loss=record["loss"])

    if connection is not None:
        connection.join(rank)
    r = 0
    while r <= rounds:
        t0 = time.time()
        if connection is not None:
            with phases.fl("fetch", r):
                fetched = connection.fetch(r, rank, header_cap)
                if not isinstance(fetched, Skip):
                    header, finished, chunks = fetched
                    codec.receive_into(header, chunks, state)
            if isinstance(fetched, Skip):  # not sampled: no model is held or trained for this round
                record = {"round": r, "sampled": False}
                history.append(record)
                if status:
                    status.metric(record)
                    status.update(phase="training", rounds_done=min(fetched.next_round, rounds))
                r = max(fetched.next_round, r + 1)
                continue
            if finished and r < rounds:
                raise RuntimeError(f"the server finished after {r} round{'' if r == 1 else 's'}, but this client expects rounds={rounds}")
        if r == rounds:
            break
        t1 = time.time()
        with phases.fl(train_phase, r):
            record = {"round": r, **trainer.train_round(r)}
            t2 = time.time()
            if connection is None:
                book(record, t0, t1, t2)
        if connection is not None:
            with phases.fl("push", r):  # the round's bookkeeping is part of push: the phases leave no gap
                header, chunks = codec.encode(state)
                result = connection.push(r, rank, trainer.num_samples, header, chunks)
                del header, chunks
                record["accepted"] = result.accepted
                if not result.accepted:  # out of this round only: the next fetch goes on
                    record["refused"] = result.reason
                    print(f"flmem client {rank}: round {r} update refused: {result.reason}", file=sys.stderr,
                          flush=True)
                book(record, t0, t1, t2)
        r += 1
    return history
