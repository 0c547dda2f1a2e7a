"""TLS credentials and client authentication on the gRPC channel, built from the ``security`` config.

The server checks every call twice: :class:`AuthInterceptor` authenticates the peer before the handler
runs (a token for the rank it claims in the ``flmem-rank`` metadata, and/or its client certificate's
common name ``flmem-client-K`` with mutual TLS), refusing with UNAUTHENTICATED; then the handler calls
:meth:`Gate.authorize` with the rank written in the message, refusing with PERMISSION_DENIED when that
is not the authenticated rank. Each refusal names the claimed rank and the peer's address, is printed on
the server's stderr, and ends that call only. How tokens are derived: :mod:`flmem.security`.
"""
from __future__ import annotations

import os
import sys
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import grpc

from flmem.security import (CN_PREFIX, ENV_SECRET, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TOKEN,
                            read_secret_file, token_ok)

RANK_KEY = "flmem-rank"
TOKEN_KEY = "flmem-token"


def _is_rank(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9  # "²".isdigit() is true, int("²") fails


class Gate:
    """Authenticates a call's peer as one client rank: by token (``secret`` set) and/or by client certificate
    (``mutual``); with both, both must name the same rank."""

    def __init__(self, secret: bytes | None, mutual: bool):
        self.secret, self.mutual = secret, mutual

    @staticmethod
    def _refuse(context, code: grpc.StatusCode, message: str):
        print(f"flmem server: refused a call: {message}", file=sys.stderr, flush=True)
        context.abort(code, message)

    def rank(self, context) -> int:
        """The rank this call's peer proved; aborts the call with UNAUTHENTICATED when it proved none."""
        metadata = dict(context.invocation_metadata() or ())
        claimed, peer = str(metadata.get(RANK_KEY, ""))[:12], context.peer()
        who = f"claimed rank {claimed or '(none)'} from {peer}"
        cert_rank = None
        if self.mutual:
            names = (context.auth_context() or {}).get("x509_common_name") or [b""]
            cn = names[0].decode("utf-8", "replace")
            if not (cn.startswith(CN_PREFIX) and _is_rank(cn[len(CN_PREFIX):])):
                self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                             f"{who}: its client certificate's common name {cn[:64]!r} names no client rank "
                             f"({CN_PREFIX}K expected; `flmem certs` makes them)")
            cert_rank = int(cn[len(CN_PREFIX):])
        if self.secret is None:
            return cert_rank
        if not _is_rank(claimed):
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"{who}: no client rank in the call's credentials; the client needs security.token_file")
        token = metadata.get(TOKEN_KEY)
        if not token:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"{who}: no token; set security.token_file to that client's token file "
                         f"(client_{claimed}.token from `flmem certs`)")
        if not token_ok(self.secret, int(claimed), str(token)):
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"{who}: wrong token for that rank (not client_{claimed}.token of this server's secret)")
        if cert_rank is not None and cert_rank != int(claimed):
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{who}: its client certificate is rank {cert_rank}'s")
        return int(claimed)

    def authorize(self, context, message_rank: int) -> None:
        """Abort with PERMISSION_DENIED unless ``message_rank`` (the rank a request names) is the peer's own."""
        rank = self.rank(context)
        if rank != message_rank:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"claimed rank {message_rank} from {context.peer()}: that peer authenticated as "
                         f"rank {rank}, and may act as rank {rank} only")


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs :meth:`Gate.rank` before every handler of the service, keeping the handler's kind."""

    def __init__(self, gate: Gate):
        self.gate = gate

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        gate = self.gate
        kind = ("stream" if handler.request_streaming else "unary") + "_" + \
               ("stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)

        def checked(request, context):
            gate.rank(context)
            return behavior(request, context)

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(checked, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    pass


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                          grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds this client's credentials (rank and token) to the metadata of every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d):
        return _CallDetails(
            d.method, d.timeout, tuple(d.metadata or ()) + self.metadata, d.credentials,
            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


@dataclass
class ServerSecurity:
    credentials: grpc.ServerCredentials | None  # None: plaintext
    gate: Gate | None  # None: no client authentication


@dataclass
class ClientSecurity:
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]


def _pem(key: str, path, env_name: str | None = None, env=None) -> bytes | None:
    if env_name and env and env.get(env_name):
        return env[env_name].encode()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{key}={path}: cannot read it ({exc.strerror})") from None


def server_security(sec, env=None) -> ServerSecurity:
    """The server's credentials from the ``security`` config node and, in a local job, the launcher's
    environment (:func:`flmem.security.local_env`). Raises ValueError naming a key whose file is unreadable."""
    env = os.environ if env is None else env
    credentials = None
    cert = _pem("security.server_cert", sec.get("server_cert") if sec.get("tls") else None, ENV_TLS_CERT, env)
    if cert is not None:
        key = _pem("security.server_key", sec.get("server_key"), ENV_TLS_KEY, env)
        mutual = bool(sec.get("mutual_tls"))
        ca = _pem("security.ca_cert", sec.get("ca_cert")) if mutual else None
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=mutual)
    secret = env[ENV_SECRET].encode() if env.get(ENV_SECRET) else \
        read_secret_file("security.secret_file", sec.get("secret_file")) if sec.get("secret_file") else None
    mutual = credentials is not None and bool(sec.get("mutual_tls"))
    return ServerSecurity(credentials, Gate(secret, mutual) if secret is not None or mutual else None)


def client_security(sec, rank: int, env=None) -> ClientSecurity:
    """Client ``rank``'s credentials: TLS (the CA to trust, its own certificate with mutual TLS) and its token."""
    env = os.environ if env is None else env
    credentials = None
    if sec.get("tls") or env.get(ENV_TLS_CA):
        ca = _pem("security.ca_cert", sec.get("ca_cert"), ENV_TLS_CA, env)  # None: the system's trusted CAs
        cert = _pem("security.client_cert", sec.get("client_cert"))
        key = _pem("security.client_key", sec.get("client_key"))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    token = env.get(ENV_TOKEN)
    if not token and sec.get("token_file"):
        token = read_secret_file("security.token_file", sec.get("token_file")).decode("utf-8", "replace")
    metadata = ((RANK_KEY, str(rank)),) + (((TOKEN_KEY, token),) if token else ())
    return ClientSecurity(credentials, metadata)
