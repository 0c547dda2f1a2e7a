"""The gRPC layer: maps the ``FederatedLearning`` service onto plain FL objects and chunk streams.

Nothing above this module sees a protobuf message: the server side calls a
:class:`~flmem.server.RoundServer`'s ``join``/``global_model``/``receive_update``, the client side
gets ``(header, finished, chunks)`` where chunks are ``(offset, bytes)`` pairs, or :class:`Skip`, or
:class:`Resend` (see :mod:`flmem.restart`).
Send and receive limits on both sides come from one value, ``transport.max_message_bytes``; a model's header
travels in pieces of at most ``transport.chunk_size`` bytes (the first message announces its length in
``header_bytes``), so no message outgrows the limit however many tensors the model has. A refused update gets an
error status: INVALID_ARGUMENT (a bad update) or FAILED_PRECONDITION (not expected: wrong round, not sampled, a
repeat), which :meth:`ServerConnection.push` turns into ``PushResult(False, reason)``; ABORTED: the server failed.
"""
from __future__ import annotations

import sys
from concurrent import futures
from typing import Iterable, Iterator, NamedTuple

import grpc

from flmem import serde, wire
from flmem.address import join, split
from flmem.channel import channel_options, keepalive_options, proxy_note, rpc_reason
from flmem.idle import IdleWatch
from flmem.security import is_loopback
from flmem.proto import flmem_pb2, flmem_pb2_grpc
from flmem.restart import ResendRequested
from flmem.rounds import UpdateRefused


class TransportError(RuntimeError):
    """A gRPC call failed; the message carries the peer's reason."""


class Skip(NamedTuple):
    """The server's answer to a fetch when this client does not train in the asked round."""
    next_round: int  # the round to ask for next


class Resend(NamedTuple):
    """The server's answer to a fetch when it discarded the aggregate holding this client's last update."""
    round: int  # the round whose update is to be pushed again before fetching again


class PushResult(NamedTuple):
    accepted: bool
    reason: str  # why the update was refused or is asked again ("" when accepted)
    resend: bool = False  # the update was not used: push the same update again at once


class _Servicer(flmem_pb2_grpc.FederatedLearningServicer):
    """``gate``: a :class:`flmem.grpcauth.Gate` when clients must authenticate (serve's ``security``), else None."""

    def __init__(self, fl_server, idle: IdleWatch, gate=None):
        self.fl, self.idle, self.gate = fl_server, idle, gate

    def _authorize(self, context, rank: int) -> None:
        """Abort the call (PERMISSION_DENIED) unless ``rank`` is the rank the peer authenticated as."""
        if self.gate is not None:
            self.gate.authorize(context, rank)

    def Join(self, request, context):
        self._authorize(context, request.client_rank)
        try:
            self.fl.join(request.client_rank)
        except Exception as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
        context.add_callback(lambda: self.fl.leave(request.client_rank))
        while context.is_active() and not self.fl.finished.wait(1.0):  # frees this thread soon after a client dies
            pass
        yield from ()

    def FetchGlobalModel(self, request, context):
        self._authorize(context, request.client_rank)
        context.add_callback(self.fl.wake)  # a call cancelled while it waits for its round frees its thread at once
        try:
            header, finished, chunks = self.fl.global_model(request.round, request.client_rank, context.is_active)
        except ResendRequested as exc:
            yield flmem_pb2.ModelChunk(resend=True, round=exc.round)
            return
        except Exception as exc:  # report to the client instead of a bare "Exception calling application"
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
        if header is None:
            yield flmem_pb2.ModelChunk(skip=True, round=finished)
            return
        raw = serde.dumps_header(header)
        pieces = wire.header_pieces(raw, self.fl.codec.chunk)
        try:  # a client that stops reading is cancelled after timeouts.idle_s (each send is timed)
            with self.idle.sending(context):
                yield flmem_pb2.ModelChunk(header=pieces[0], header_bytes=len(raw), round=request.round,
                                           finished=finished)
            for piece in pieces[1:]:
                with self.idle.sending(context):
                    yield flmem_pb2.ModelChunk(header=piece)
            for offset, data in chunks:
                with self.idle.sending(context):
                    yield flmem_pb2.ModelChunk(offset=offset, data=data)
            self.fl.fetch_done(request.round, request.client_rank)
        finally:  # also when the stream was cancelled: gRPC then closes this generator
            self.fl.fetch_ended(request.client_rank)

    def PushUpdate(self, request_iterator, context):
        peer = context.peer()  # read first: a cancelled call may no longer know it
        request_iterator = self.idle.requests(request_iterator, context)  # idle streams end; errors name the client
        try:
            first = next(request_iterator, None)
        except Exception as exc:  # noqa: BLE001 - e.g. cancelled or idle before its first message (says so)
            first, message = None, f"update refused after 0 bytes: {exc}"
        else:
            message = (f"an update stream from {peer} (client rank unknown) ended before its first message (an "
                       "empty stream): refused after 0 bytes")
        if first is None:
            print(f"flmem server: {message}", file=sys.stderr, flush=True)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        incoming = wire.Incoming(first.header_bytes, _triples(first, request_iterator))
        self._authorize(context, first.client_rank)  # before anything of the update is read
        try:
            self.fl.receive_update(first.round, first.client_rank, first.num_samples, incoming, peer=peer)
        except ResendRequested as exc:
            return flmem_pb2.PushReply(round=first.round, resend=True, reason=str(exc))
        except UpdateRefused as exc:  # this update only: the server and the other clients go on
            context.abort(grpc.StatusCode.FAILED_PRECONDITION if exc.precondition else
                          grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # the round cannot go on: the server fails, and says why to every client
            self.fl.record_error(exc)
            context.abort(grpc.StatusCode.ABORTED, f"{type(exc).__name__}: {exc}")
        return flmem_pb2.PushReply(round=first.round, accepted=True)


def _triples(first, messages) -> Iterator[tuple[bytes, int, bytes]]:
    """A ModelChunk stream as :class:`flmem.wire.Incoming` reads it: ``(header piece, offset, data)``."""
    yield first.header, first.offset, first.data
    for m in messages:
        yield m.header, m.offset, m.data


def serve(fl_server, host: str, port: int, max_message_bytes: int, max_workers: int,
          lean: bool = False, idle_s: float = 60.0, security=None, keepalive_s: float | None = None,
          min_rate_bytes_s: float | None = None) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``fl_server`` on ``host:port`` (port 0: a free port; an IPv6 literal with or
    without brackets); ``lean``: see :func:`channel_options`; ``security``: a
    :class:`flmem.grpcauth.ServerSecurity` (TLS and client authentication; None: plaintext, anyone may call);
    ``keepalive_s``: see :func:`keepalive_options`.

    ``max_workers`` is both the handler threads and the most calls served at once (:func:`max_rpcs`): a call
    beyond it is refused at once with RESOURCE_EXHAUSTED instead of queueing for a thread. A stream on which the
    server waits for the client (its next message, or room to send) longer than ``idle_s`` seconds is cancelled,
    and so is an update stream slower than ``min_rate_bytes_s`` after ``idle_s`` of waiting on it (:mod:`flmem.idle`).

    Returns the started server and the bound port.
    Raises:
        TransportError: the address cannot be bound (gRPC reports that by returning port 0).
    """
    # SO_REUSEPORT (gRPC's default) would let a second job bind a busy port and steal its clients.
    gate = security.gate if security is not None else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=channel_options(max_message_bytes, lean) + [("grpc.so_reuseport", 0)]
                         + keepalive_options(keepalive_s, server=True),
                         maximum_concurrent_rpcs=max_workers,
                         interceptors=[_auth_interceptor(gate)] if gate is not None else None)
    flmem_pb2_grpc.add_FederatedLearningServicer_to_server(
        _Servicer(fl_server, IdleWatch(idle_s, min_rate_bytes_s), gate), server)
    target = join(host, port)
    try:
        if security is not None and security.credentials is not None:
            bound = server.add_secure_port(target, security.credentials)
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError:  # newer gRPC raises where older ones return 0
        bound = 0
    if bound == 0:
        raise TransportError(f"cannot listen on {target} (in use or not a local address); "
                             "pick another server.port, or server.port=0 for a free one")
    server.start()
    return server, bound


def _auth_interceptor(gate):
    from flmem.grpcauth import AuthInterceptor

    return AuthInterceptor(gate)


class ServerConnection:
    """A client's connection to the FL server at ``address`` (``host:port``; an IPv6 literal may lack its
    brackets, as ``::1:50051``: the part after the last colon is the port).

    ``security``: a :class:`flmem.grpcauth.ClientSecurity` (TLS credentials and the metadata that
    authenticates this client on every call; None: plaintext, no credentials); ``keepalive_s``: see
    :func:`keepalive_options`. A loopback server is reached directly, never through an HTTP proxy.
    ``chunk_size``: header pieces are at most this many bytes (the config keeps it under the message limit).
    """

    def __init__(self, address: str, max_message_bytes: int, rpc_timeout_s: float, lean: bool = False,
                 chunk_size: int | None = None, security=None, keepalive_s: float | None = None):
        host, port = split(address)
        self.address = address = join(host, port)
        self.piece_bytes = chunk_size or max_message_bytes - 1024
        self.timeout = rpc_timeout_s
        self.keepalive_s = keepalive_s
        self.tls = security is not None and security.credentials is not None
        options = channel_options(max_message_bytes, lean) + keepalive_options(keepalive_s, server=False)
        if is_loopback(host):  # http_proxy/grpc_proxy would send even 127.0.0.1 to the proxy
            options.append(("grpc.enable_http_proxy", 0))
        self.channel = grpc.secure_channel(address, security.credentials, options=options) if self.tls \
            else grpc.insecure_channel(address, options=options)
        calls = self.channel
        if security is not None and security.metadata:
            from flmem.grpcauth import MetadataInterceptor

            calls = grpc.intercept_channel(self.channel, MetadataInterceptor(security.metadata))
        self.stub = flmem_pb2_grpc.FederatedLearningStub(calls)
        self.presence = None

    def join(self, rank: int) -> None:
        """Open this client's presence stream (held until :meth:`close`): the server then learns at once when
        this process is gone, instead of waiting for its update until ``timeouts.round_s``."""
        self.presence = self.stub.Join(flmem_pb2.JoinRequest(client_rank=rank))

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the server accepts connections; TransportError after ``timeout_s`` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            tls = ("; over TLS, a handshake that fails looks the same: check that security.ca_cert signed the "
                   "server's certificate and that it names the host in server.address" if self.tls
                   else "; a server with security.tls=true needs security.tls=true here too")
            raise TransportError(f"no FL server answered at {self.address} within {timeout_s:g} s; "
                                 f"check server.address and that the server role runs{tls}"
                                 f"{proxy_note(self.address)}") from None

    def fetch(self, round_idx: int, rank: int, header_cap: int = 2**26
              ) -> tuple[dict, bool, Iterator[serde.Chunk]] | Skip | Resend:
        """Start streaming round ``round_idx``'s global model: ``(header, finished, chunks)``, or :class:`Skip`
        when this client does not train in that round, or :class:`Resend` when it must push its last update
        again first. ``header_cap``: the longest header read (bytes; see :func:`flmem.wire.header_cap`).

        Raises:
            TransportError: the call failed, or the header is too long or malformed.
        """
        stream = self.stub.FetchGlobalModel(flmem_pb2.FetchRequest(client_rank=rank, round=round_idx),
                                            timeout=self.timeout)
        what = f"the round-{round_idx} global model from {self.address}"
        try:
            first = next(stream)
        except grpc.RpcError as exc:
            raise TransportError(f"fetching {what}: {rpc_reason(exc, self.address, self.keepalive_s)}") from None
        if first.skip:
            stream.cancel()
            return Skip(first.round)
        if first.resend:
            stream.cancel()
            return Resend(first.round)
        incoming = wire.Incoming(first.header_bytes, _checked_stream(_triples(first, stream), self.address, self.keepalive_s))
        try:
            header = incoming.header(header_cap)
        except ValueError as exc:
            stream.cancel()
            raise TransportError(f"fetching {what}: refused after {incoming.received} bytes: {exc}") from None
        return header, first.finished, incoming.chunks()

    def push(self, round_idx: int, rank: int, num_samples: int, header: dict,
             chunks: Iterable[serde.Chunk]) -> PushResult:
        """Send one client update; the server may refuse it (the client is then out of that round only).

        Returns:
            PushResult(True, "") or, when the server refused the update (status INVALID_ARGUMENT or
            FAILED_PRECONDITION), PushResult(False, the server's reason).
        Raises:
            TransportError: any other failure (server gone, server failed: UNAVAILABLE, ABORTED...).
        """
        def messages():
            raw = serde.dumps_header(header)
            pieces = wire.header_pieces(raw, self.piece_bytes)
            yield flmem_pb2.ModelChunk(header=pieces[0], header_bytes=len(raw), round=round_idx, client_rank=rank,
                                       num_samples=num_samples)
            for piece in pieces[1:]:
                yield flmem_pb2.ModelChunk(header=piece)
            for offset, data in chunks:
                yield flmem_pb2.ModelChunk(offset=offset, data=data)
        try:
            reply = self.stub.PushUpdate(messages(), timeout=self.timeout)
            return PushResult(True, reply.reason, reply.resend)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                return PushResult(False, exc.details())
            raise TransportError(f"sending the round-{round_idx} update of client {rank} to {self.address}: "
                                 f"{rpc_reason(exc, self.address, self.keepalive_s)}") from None

    def close(self) -> None:
        if self.presence is not None:
            self.presence.cancel()
        self.channel.close()


def _checked_stream(triples, address: str, keepalive_s: float | None = None):
    try:
        yield from triples
    except grpc.RpcError as exc:
        raise TransportError(f"model stream from {address} broke: {rpc_reason(exc, address, keepalive_s)}") from None
