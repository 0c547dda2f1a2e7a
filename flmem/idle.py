"""Idle streams: a gRPC stream on which the server has waited for its peer longer than ``timeouts.idle_s`` ends.

Sync gRPC has no per-read timeout: a handler thread blocked in ``next(request_iterator)`` (a client that stopped
sending) or in a send (a client that stopped reading: HTTP/2 flow control holds the server's message) waits until
the call's deadline, holding a handler thread and, on the optimized path, the round's fold slot until
``timeouts.round_s``. :class:`IdleWatch` times each such wait; a watchdog thread cancels (``context.cancel()``)
every stream whose current wait is older than ``idle_s``, and the blocked call then returns or raises at once.

Only time spent waiting on the peer counts: an update that waits for its turn to be added to the running sum, or
a fetch that waits for its round to be published, is the server's doing and is not timed.

A client that sends a chunk just before each ``idle_s`` would still hold the fold slot for ``idle_s`` per chunk.
With ``min_rate_bytes_s`` an update stream also ends once its total wait on the client exceeds ``idle_s`` plus one
second per ``min_rate_bytes_s`` bytes received: after a grace of ``idle_s``, it must average at least that rate
(``transport.min_upload_mib_s``), counted over the time the server waited for it. The watchdog checks
every ``min(idle_s / 4, 1)`` seconds, so a stream ends between ``idle_s`` and ``idle_s`` plus that tick.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import grpc

from flmem import serde


class ClientStreamError(ConnectionError):
    """A client's stream ended before its update did: it went idle, or the client cancelled it (its process
    exited or its network failed). The message names the client and the bytes received."""


_CANCEL_RECORD_S = 1.0  # how long a stream that ended short waits for gRPC to record a cancellation (seconds)


def _declared_total(first) -> int:
    """The payload bytes the stream's header declares (0 when there is none to read: nothing to wait for)."""
    try:
        return int(serde.loads_header(first.header)["total_bytes"]) if first is not None else 0
    except Exception:  # noqa: BLE001 - a malformed header is the receiver's to refuse, with its own message
        return 0


class _Stream:
    """One watched stream: ``since`` is when the current wait on the peer began (None: not waiting)."""
    __slots__ = ("context", "peer", "since", "expired", "waited", "payload", "rated", "slow")

    def __init__(self, context, rated: bool = False):
        self.context, self.since, self.expired = context, None, False
        self.peer = context.peer()  # read now: a cancelled call may no longer know it
        self.waited, self.payload, self.rated, self.slow = 0.0, 0, rated, False


class IdleWatch:
    """Ends streams that wait on their peer for more than ``idle_s`` seconds (see the module docstring).

    Args:
        idle_s: the longest wait for one message from, or one send to, the peer (seconds; ``timeouts.idle_s``).
        min_rate_bytes_s: the lowest average rate of an update stream after ``idle_s`` of waiting on it (bytes per
            second of waiting; None: no floor).
    Raises:
        ValueError: ``idle_s`` is not a number > 0, or ``min_rate_bytes_s`` is not None or > 0.
    """

    def __init__(self, idle_s: float, min_rate_bytes_s: float | None = None):
        if not idle_s > 0:
            raise ValueError(f"timeouts.idle_s={idle_s}: must be a number > 0 seconds")
        if min_rate_bytes_s is not None and not min_rate_bytes_s > 0:
            raise ValueError(f"transport.min_upload_mib_s: {min_rate_bytes_s} bytes/s, must be > 0 (or null)")
        self.idle_s = float(idle_s)
        self.min_rate = float(min_rate_bytes_s) if min_rate_bytes_s else None
        self.tick_s = min(self.idle_s / 4, 1.0)
        self._streams: set[_Stream] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the streams
    def requests(self, messages: Iterator, context) -> Iterator:
        """The client's messages (``ModelChunk``) from ``messages``, each wait for the next one timed.

        Raises:
            ClientStreamError: the stream went idle for ``idle_s`` (it is cancelled), or the client cancelled it;
                the message names the client's rank (from the first message) and the bytes received so far.
        """
        stream, first, received, payload = self._watch(context, rated=True), None, 0, 0
        gone = threading.Event()  # set when the call ends: a cancelled call ends before its handler returns
        if not context.add_callback(gone.set):
            gone.set()
        try:
            while True:
                stream.since = time.monotonic()
                try:
                    message = next(messages)
                except StopIteration:
                    # gRPC ends a cancelled stream like a finished one (the cancellation is recorded just after):
                    # a stream that ends short of its header's total is told apart by waiting for that record
                    if stream.expired or (payload < _declared_total(first) and gone.wait(_CANCEL_RECORD_S)):
                        raise self._ended(stream, first, received) from None
                    return
                except grpc.RpcError:  # gRPC's own error says nothing ("RpcError: "): say who and how far
                    raise self._ended(stream, first, received) from None
                finally:
                    stream.waited += time.monotonic() - stream.since
                    stream.since = None
                if first is None:
                    first = message
                received += len(message.header) + len(message.data)
                payload += len(message.data)
                stream.payload = received
                yield message
        finally:
            self._unwatch(stream)

    def _ended(self, stream: "_Stream", first, received: int) -> ClientStreamError:
        who = f"client {first.client_rank}" if first is not None else f"a client at {stream.peer}"
        if stream.slow:
            waited = stream.waited + (time.monotonic() - stream.since if stream.since is not None else 0.0)
            return ClientStreamError(f"{who} sent {received} bytes in {waited:.0f} s of waiting for it: less "
                                     f"than {self.min_rate / 2**20:g} MiB/s after the first {self.idle_s:g} s "
                                     "(transport.min_upload_mib_s, timeouts.idle_s)")
        if stream.expired:
            return ClientStreamError(f"{who} sent nothing for {self.idle_s:g} s after {received} bytes "
                                     "(timeouts.idle_s)")
        if first is None:  # gRPC cancels a call whose message exceeds its receive limit before the handler sees it
            return ClientStreamError(f"{who}'s update stream ended before its first message arrived: the client "
                                     "cancelled it (its process exited or its network failed), or sent a message "
                                     "larger than transport.max_message_bytes (gRPC refuses it: RESOURCE_EXHAUSTED)")
        return ClientStreamError(f"{who}'s stream was cancelled after {received} bytes (the client process exited "
                                 "or its network failed)")

    @contextmanager
    def sending(self, context):
        """Time a send to the peer: ``with watch.sending(context): yield message`` inside a response generator
        (gRPC sends the message while the generator is suspended). A peer that reads nothing for ``idle_s`` has
        its stream cancelled; gRPC then stops the generator."""
        stream = self._watch(context)
        stream.since = time.monotonic()
        try:
            yield
        finally:
            self._unwatch(stream)

    # ------------------------------------------------------------ the watchdog
    def _watch(self, context, rated: bool = False) -> _Stream:
        stream = _Stream(context, rated)
        with self._lock:
            self._streams.add(stream)
            if self._thread is None:  # started on demand, ends when nothing is watched: no lifetime to manage
                self._thread = threading.Thread(target=self._run, name="flmem-idle-watch", daemon=True)
                self._thread.start()
        return stream

    def _unwatch(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick_s)
            now, expired = time.monotonic(), []
            with self._lock:
                if not self._streams:
                    self._thread = None
                    return
                for stream in self._streams:
                    since = stream.since
                    if since is None or stream.expired:
                        continue
                    slow = stream.rated and self.min_rate is not None and \
                        stream.waited + (now - since) > self.idle_s + stream.payload / self.min_rate
                    if now - since > self.idle_s or slow:
                        stream.expired, stream.slow = True, slow and now - since <= self.idle_s
                        expired.append(stream)
            for stream in expired:  # outside the lock: cancelling runs gRPC callbacks
                stream.context.cancel()
