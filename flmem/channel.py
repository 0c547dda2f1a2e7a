"""gRPC channel arguments shared by both ends: message limits, flow control, keepalive, proxies, call limits.

Also what a failed call most likely means (:func:`rpc_reason`): gRPC's own codes say little about a hung server
or a proxy in the way.
"""
from __future__ import annotations

import os

import grpc

from flmem.address import split
from flmem.security import is_loopback


def channel_options(max_message_bytes: int, lean: bool = False) -> list[tuple[str, int]]:
    """gRPC channel arguments: the message limits and, when ``lean``, no BDP probing.

    gRPC's bandwidth-delay-product probing grows each stream's flow-control window on fast links
    (measured here: about 30 MiB per concurrent upload on loopback), memory that scales with the
    number of clients; without it a stream buffers about one chunk.
    """
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    return options + [("grpc.http2.bdp_probe", 0)] if lean else options


SPARE_RPCS = 4  # calls beyond the clients' own: a client reconnecting while its old stream is being closed


def max_rpcs(num_clients: int) -> int:
    """The most calls a server for ``num_clients`` clients serves at once: per client its presence stream, one
    update and one fetch (a fetch may start while the reply to its update is still being sent), plus
    :data:`SPARE_RPCS`. ``serve(max_workers=max_rpcs(N))`` gives every such call a handler thread at once."""
    return 3 * num_clients + SPARE_RPCS


PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")


def keepalive_options(keepalive_s: float | None, server: bool) -> list[tuple[str, int]]:
    """gRPC keepalive (``transport.keepalive_s``; None: gRPC's defaults, no pings from the client).

    Each end pings the other after ``keepalive_s`` seconds without traffic, also between calls, and drops
    the connection when no answer comes within ``keepalive_s`` more: a hung or vanished peer is noticed
    within about twice that, however long ``timeouts.rpc_s`` is. The server accepts pings down to half that
    interval (more often earns a GOAWAY ``too_many_pings``, so both ends need the same value).
    """
    if not keepalive_s:
        return []
    ms = max(1000, int(keepalive_s * 1000))
    # grpc.http2.ping_timeout_ms: newer gRPC waits that long (60 s by default) for any ping's answer,
    # whatever keepalive_timeout_ms says.
    options = [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    if server:  # the pings a server accepts without data (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS)
        options.append(("grpc.http2.min_ping_interval_without_data_ms", ms // 2))
    return options


def proxy_note(address: str) -> str:
    """Names the proxy variables gRPC would use to reach a non-loopback ``address`` (their values are not
    shown: they may hold credentials)."""
    names = [v for v in PROXY_VARIABLES if os.environ.get(v)]
    if not names or is_loopback(split(address)[0]):
        return ""
    return (f"; {', '.join(names)} {'is' if len(names) == 1 else 'are'} set, so gRPC connects through that proxy: "
            "unset it, or add the server's host to no_proxy")


def rpc_reason(exc: grpc.RpcError, address: str, keepalive_s: float | None) -> str:
    """``CODE: details`` of a failed call, with what UNAVAILABLE or CANCELLED most likely means here."""
    reason = f"{exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.CANCELLED:  # a server ends a stream it gave up on by cancelling: no status
        reason += (" (the server ended the call: it waited longer than its timeouts.idle_s for this client, or this "
                   "client's upload averaged less than its transport.min_upload_mib_s; its log says which)")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        if keepalive_s and any(w in str(exc.details()).lower() for w in ("keepalive", "ping timeout")):
            reason += (f" (the server answered no keepalive ping within transport.keepalive_s={keepalive_s:g} s: "
                       "it hung, died, or the network dropped)")
        reason += proxy_note(address)
    return reason
