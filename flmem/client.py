"""The FL client loop (no gRPC here): fetch the global model, train locally, push the update."""
from __future__ import annotations

import time

from flmem.codec import ModelCodec
from flmem.trainer import Trainer


def run_client(connection, trainer: Trainer, codec: ModelCodec, *, rank: int, rounds: int, status=None) -> list[dict]:
    """Take part in ``rounds`` synchronous FedAvg rounds, then fetch the final global model.

    Args:
        connection: a :class:`~flmem.transport.ServerConnection` (anything with ``fetch``/``push``), or
            None for ``client.mode=local_only``: the same loop with no communication at all.
        trainer: trains ``trainer.model`` in place; the global model is received into it.
        codec: how models are received and encoded.
    Returns:
        One metrics record per round (loss, update_norm, seconds spent fetching/training/pushing).
    Raises:
        flmem.transport.TransportError: the server went away or refused an update.
        RuntimeError: the server says the run finished before ``rounds`` rounds.
    """
    state = trainer.model.state_dict()  # tensors share the parameters' storage
    history = []
    for r in range(rounds + 1):
        t0 = time.time()
        if connection is not None:
            header, finished, chunks = connection.fetch(r, rank)
            codec.receive_into(header, chunks, state)
            if finished and r < rounds:
                raise RuntimeError(f"the server finished after {r} round{'' if r == 1 else 's'}, but this client expects rounds={rounds}")
        if r == rounds:
            break
        t1 = time.time()
        record = {"round": r, **trainer.train_round(r)}
        t2 = time.time()
        if connection is not None:
            header, chunks = codec.encode(state)
            connection.push(r, rank, trainer.num_samples, header, chunks)
            del header, chunks
        record.update(fetch_s=t1 - t0, train_s=t2 - t1, push_s=time.time() - t2)
        history.append(record)
        if status:
            status.metric(record)
            status.update(phase="training", rounds_done=r + 1, loss=record["loss"])
    return history
