"""The FL client loop (no gRPC here): fetch the global model, train locally, push the update; rounds this client
is not sampled for are skipped. When the server asks for an update again (its aggregate restarted without a client
that failed, see :mod:`flmem.restart`), the client encodes its model again: it still holds the trained update,
since nothing is written into it until the next global model arrives."""
from __future__ import annotations

import sys
import time

from flmem import serde, wire
from flmem.codec import ModelCodec
from flmem.phases import NO_PHASES, PhaseLog
from flmem.trainer import Trainer
from flmem.transport import Resend, Skip


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
        (False with ``refused``: the server refused the update, e.g. it came late), ``resends`` when the server
        asked for the update again (times); a round this client was not sampled for has ``sampled: False`` only.
    Raises:
        flmem.transport.TransportError: the server went away or refused an update.
        RuntimeError: the server says the run finished before ``rounds`` rounds, or asks again for an update
            this client did not send last.
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

    def push(r: int, record: dict) -> None:
        """Send the round-``r`` update the model holds, again as long as the server asks at once."""
        while True:
            header, chunks = codec.encode(state)
            result = connection.push(r, rank, trainer.num_samples, header, chunks)
            del header, chunks
            if not result.resend:
                break
            again(r, record, result.reason)
        record["accepted"] = result.accepted
        if not result.accepted:  # out of this round only: the next fetch goes on
            record["refused"] = result.reason
            print(f"flmem client {rank}: round {r} update refused: {result.reason}", file=sys.stderr, flush=True)

    def again(r: int, record: dict, why: str) -> None:
        record["resends"] = record.get("resends", 0) + 1
        print(f"flmem client {rank}: round {r} update asked again ({why or 'the server restarted its aggregate'})",
              file=sys.stderr, flush=True)

    if connection is not None:
        connection.join(rank)
    r = 0
    pushed = None  # (round, record) of the last update sent
    while r <= rounds:
        t0 = time.time()
        if connection is not None:
            with phases.fl("fetch", r):
                fetched = connection.fetch(r, rank, header_cap)
                if not isinstance(fetched, (Skip, Resend)):
                    header, finished, chunks = fetched
                    codec.receive_into(header, chunks, state)
            if isinstance(fetched, Resend):  # the aggregate that held this client's last update was discarded
                if pushed is None or pushed[0] != fetched.round or r != fetched.round + 1:
                    raise RuntimeError(f"the server asks again for this client's round-{fetched.round} update while "
                                       f"it fetches round {r}; its last update was for round "
                                       f"{pushed[0] if pushed else 'none'}")
                with phases.fl("push", fetched.round):
                    again(fetched.round, pushed[1], "")
                    push(*pushed)
                continue
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
                push(r, record)
                pushed = (r, record)
                book(record, t0, t1, t2)
        r += 1
    return history
