"""Aligned chunks: the N client uploads of a round advance together, chunk k of every stream at a time.

Each client's gRPC handler thread deposits its chunk k and waits; the thread that completes chunk k (every
participant has deposited it) reduces the N chunks, writes chunk k of the new global model, and lets all of
them read chunk k+1. The server therefore holds N chunks, not N models; a stream that is not read waits in
the client, held by gRPC flow control. A participant that fails before it deposited anything is simply dropped;
one that fails after its values were used spoils the round (its chunks are part of the new model already).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence

from flmem import serde


class RoundSpoiledError(RuntimeError):
    """A client failed after part of its update was already combined into the new global model."""


class AlignedChunks:
    """Reduce chunk k of every participant's ``raw`` stream together.

    Args:
        layout: the global model's tensor table (every stream must have it).
        chunk_size: payload bytes per chunk (rounded down to a multiple of 8, as the sender cuts them).
        participants: the ranks expected to send (the round's sampled clients).
        reduce_chunk: ``(offset, datas)`` -> None, datas in rank order; writes the result.
        timeout_s: how long a deposited chunk may wait for the other participants' (seconds).
    """

    def __init__(self, layout: serde.Layout, chunk_size: int, participants: Iterable[int],
                 reduce_chunk: Callable[[int, Sequence[bytes]], None], timeout_s: float):
        self.layout, self.reduce_chunk, self.timeout_s = layout, reduce_chunk, timeout_s
        self.chunk = chunk_size - chunk_size % serde.ALIGN
        self.num_chunks = -(-layout.total_bytes // self.chunk)
        self.participants = set(participants)
        self.slots: dict[int, bytes] = {}
        self.index = 0
        self.spoiled: str | None = None
        self.cond = threading.Condition()

    def expected(self, i: int) -> tuple[int, int]:
        """Offset and length of chunk ``i``."""
        offset = i * self.chunk
        return offset, min(self.chunk, self.layout.total_bytes - offset)

    def drop(self, rank: int, reason: str) -> None:
        """``rank`` will not send (more): dropped if none of its values were used, else the round is spoiled."""
        with self.cond:
            if rank not in self.participants:
                return
            self.participants.discard(rank)
            self.slots.pop(rank, None)
            if 0 < self.index < self.num_chunks and self.spoiled is None:  # chunks < index hold its values
                self.spoiled = (f"client {rank} failed after {self.index} of {self.num_chunks} chunks of its update "
                                f"were combined into the new global model ({reason}); the chunk-aligned path holds "
                                "no copy to take them back (optimization.aggregation=false keeps whole updates)")
            self.cond.notify_all()

    def stop(self, reason: str) -> None:
        """The server stops: every participant waiting here raises RoundSpoiledError(``reason``) at once."""
        with self.cond:
            if self.spoiled is None:
                self.spoiled = reason
            self.cond.notify_all()

    def _complete(self) -> bool:
        return bool(self.participants) and all(p in self.slots for p in self.participants)

    def feed(self, rank: int, chunks: Iterable[serde.Chunk]) -> None:
        """Deposit ``rank``'s chunks one by one; returns when all of them have been reduced.

        Raises:
            ValueError: a chunk is not where the aligned cut puts it, or the stream ends early (``rank``
                should then be dropped with :meth:`drop`).
            RoundSpoiledError: another participant spoiled the round, or one did not send in time.
        """
        i = 0
        for offset, data in chunks:  # reading the network happens outside the lock
            want = self.expected(i) if i < self.num_chunks else (None, 0)
            if (offset, len(data)) != want:
                raise ValueError(f"chunk {i} of client {rank} is [{offset}, {offset + len(data)}), the aligned cut "
                                 f"is [{want[0]}, {(want[0] or 0) + want[1]}): server and clients must use the same "
                                 "transport.chunk_size")
            with self.cond:
                self._raise_if_spoiled()
                self.slots[rank] = data
                self.cond.notify_all()
                while self.index == i and self.spoiled is None:
                    if self._complete():
                        self.reduce_chunk(offset, [self.slots[k] for k in sorted(self.participants)])
                        self.slots.clear()
                        self.index += 1
                        self.cond.notify_all()
                        break
                    if not self.cond.wait(self.timeout_s) and self.index == i and not self._complete():
                        late = sorted(p for p in self.participants if p not in self.slots)
                        self.spoiled = (f"chunk {i}: client(s) {late} sent nothing for {self.timeout_s:g} s "
                                        "(timeouts.round_s) while the others waited")
                        self.cond.notify_all()
                self._raise_if_spoiled()
            i += 1
        if i != self.num_chunks:
            raise ValueError(f"client {rank}'s update ended after {i} of {self.num_chunks} chunks")

    def _raise_if_spoiled(self) -> None:
        if self.spoiled is not None:
            raise RoundSpoiledError(self.spoiled)
