"""Aligned chunks: the N client uploads of a round advance together, chunk k of every stream at a time.

Each client's gRPC handler thread deposits its chunk k and waits; the thread that completes chunk k (every
participant has deposited it) reduces the N chunks, writes chunk k of the new global model, and lets all of
them read chunk k+1. The server therefore holds N chunks, not N models; a stream that is not read waits in
the client, held by gRPC flow control. A participant that fails before any chunk was reduced is simply dropped.
One that fails after (its stream breaks or stalls, a later chunk is bad, its client dies) has values in chunks
0..k-1 of the new global model: since a chunk is computed from the participants' values only, the lockstep
restarts at chunk 0 without it, and the remaining participants' handlers end with
:class:`~flmem.restart.ResendRequested` (their clients send the same update again; see :mod:`flmem.restart`).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Mapping, Sequence

from flmem import serde
from flmem.restart import ResendRequested


class AlignedChunks:
    """Reduce chunk k of every participant's ``raw`` stream together.

    Args:
        layout: the global model's tensor table (every stream must have it).
        chunk_size: payload bytes per chunk (rounded down to a multiple of 8, as the sender cuts them).
        participants: the ranks expected to send (the round's sampled clients).
        reduce_chunk: ``(offset, datas)`` -> None, datas in rank order; writes the result. It must not read what it
            writes (a restart computes every chunk again from the updates).
        timeout_s: how long a deposited chunk may wait for the other participants' (seconds); those that sent
            nothing by then are dropped.
        on_drop: ``({rank: reason}, restarted)`` -> None, called (outside this object's lock) when the lockstep
            drops participants itself (they stalled); ``restarted``: the reduction started again at chunk 0.
    """

    def __init__(self, layout: serde.Layout, chunk_size: int, participants: Iterable[int],
                 reduce_chunk: Callable[[int, Sequence[bytes]], None], timeout_s: float,
                 on_drop: Callable[[Mapping[int, str], bool], None] | None = None):
        self.layout, self.reduce_chunk, self.timeout_s, self.on_drop = layout, reduce_chunk, timeout_s, on_drop
        self.chunk = chunk_size - chunk_size % serde.ALIGN
        self.num_chunks = -(-layout.total_bytes // self.chunk)
        self.participants = set(participants)
        self.dropped: dict[int, str] = {}
        self.slots: dict[int, bytes] = {}
        self.index = 0  # chunks reduced in this generation
        self.generation = 0  # restarts so far; a stream fed in an older generation must be sent again
        self.restarted_because = ""
        self.cond = threading.Condition()

    @property
    def restarts(self) -> int:
        return self.generation

    def expected(self, i: int) -> tuple[int, int]:
        """Offset and length of chunk ``i``."""
        offset = i * self.chunk
        return offset, min(self.chunk, self.layout.total_bytes - offset)

    def drop(self, rank: int, reason: str) -> bool:
        """``rank`` will not send (more). Returns True when some of its values had been reduced: the reduction
        then starts again at chunk 0 without it, and the other participants' streams under way must be sent again."""
        with self.cond:
            return self._remove({rank: reason})

    def _remove(self, gone: Mapping[int, str]) -> bool:
        """Drop the participants in ``gone`` (rank -> reason); lock held. Returns whether the reduction restarted."""
        present = sorted(rank for rank in gone if rank in self.participants)
        if not present:
            return False
        for rank in present:
            self.participants.discard(rank)
            self.slots.pop(rank, None)
            self.dropped[rank] = gone[rank]
        restart = 0 < self.index < self.num_chunks  # chunks < index hold their values
        if restart:
            why = "; ".join(f"client {rank}: {gone[rank]}" for rank in present)
            self.restarted_because = (f"the round's chunk-aligned reduction restarted at chunk 0 without client(s) "
                                      f"{present}, which failed after {self.index} of {self.num_chunks} chunks were "
                                      f"reduced ({why}); send the same update again")
            self.index, self.generation = 0, self.generation + 1
            self.slots.clear()
        self.cond.notify_all()
        return restart

    def stop(self, reason: str) -> None:
        """The server stops: every participant waiting here raises RoundSpoiledError(``reason``) at once."""
        with self.cond:
            if self.spoiled is None:
                self.spoiled = reason
            self.cond.notify_all()

    def _complete(self) -> bool:
        return bool(self.participants) and all(p in self.slots for p in self.participants)

    def _outcome(self, rank: int, generation: int) -> Exception | None:
        """Why ``rank``'s stream of ``generation`` cannot go on (lock held), or None."""
        if rank not in self.participants:
            return ValueError(f"client {rank} is out of the round: {self.dropped.get(rank, 'not sampled')}")
        if generation != self.generation:
            return ResendRequested(self.restarted_because)
        return None

    def feed(self, rank: int, chunks: Iterable[serde.Chunk]) -> None:
        """Deposit ``rank``'s chunks one by one; returns when all of them have been reduced.

        Raises:
            ValueError: a chunk is not where the aligned cut puts it, the stream ends early (``rank`` should then
                be dropped with :meth:`drop`), or ``rank`` was dropped (it stalled, or failed elsewhere).
            ResendRequested: the reduction restarted without another participant; this stream's values are no
                longer used and the whole update must be fed again.
        """
        with self.cond:
            generation = self.generation
            problem = self._outcome(rank, generation)
        if problem is not None:
            raise problem
        i = 0
        for offset, data in chunks:  # reading the network happens outside the lock
            want = self.expected(i) if i < self.num_chunks else (None, 0)
            if (offset, len(data)) != want:
                raise ValueError(f"chunk {i} of client {rank} is [{offset}, {offset + len(data)}), the aligned cut "
                                 f"is [{want[0]}, {(want[0] or 0) + want[1]}): server and clients must use the same "
                                 "transport.chunk_size")
            late: dict[int, str] = {}
            restarted = False
            with self.cond:
                problem = self._outcome(rank, generation)
                if problem is None:
                    self.slots[rank] = data
                    self.cond.notify_all()
                while problem is None and self.index == i:
                    if self._complete():
                        self.reduce_chunk(offset, [self.slots[k] for k in sorted(self.participants)])
                        self.slots.clear()
                        self.index += 1
                        self.cond.notify_all()
                        break
                    if not self.cond.wait(self.timeout_s) and self._outcome(rank, generation) is None \
                            and self.index == i and not self._complete():
                        late = {p: f"stalled: sent nothing for {self.timeout_s:g} s at chunk {i} of {self.num_chunks} "
                                   "while the others waited (timeouts.round_s)"
                                for p in self.participants if p not in self.slots}
                        restarted = self._remove(late)  # at chunk 0 the others simply go on without them
                    problem = self._outcome(rank, generation)
            if late and self.on_drop is not None:  # outside the lock: the server's lock comes first
                self.on_drop(late, restarted)
            if problem is not None:
                raise problem
            i += 1
        if i != self.num_chunks:
            raise ValueError(f"client {rank}'s update ended after {i} of {self.num_chunks} chunks")
