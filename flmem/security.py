"""Client credentials and where a server may listen without TLS (no gRPC here: the launcher imports it).

Client authentication is a token per rank: client K's token is the hex HMAC-SHA256 (RFC 2104) of
``flmem-client-K`` under the server's secret, so the server holds one secret and client K holds only its
own token, which names no other rank. The server compares tokens in constant time
(``hmac.compare_digest``). With ``security.mutual_tls=true`` the client certificate's common name
``flmem-client-K`` authenticates rank K as well (:mod:`flmem.grpcauth` checks both on every call).

``role=local`` needs no set-up: the launcher draws a secret per job and hands the server its secret and
each client its token through environment variables of that process only (never a file, a log or
``result.json``); with ``security.tls=true`` and no certificate files it also makes a throw-away CA and
server certificate for the job (:func:`flmem.certs.ephemeral_server_tls`).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path

CN_PREFIX = "flmem-client-"
ENV_SECRET = "FLMEM_SERVER_SECRET"   # server: the job's secret (hex)
ENV_TOKEN = "FLMEM_CLIENT_TOKEN"     # client: its token (hex)
ENV_TLS_CA = "FLMEM_TLS_CA_PEM"      # client: the CA to trust (PEM)
ENV_TLS_CERT = "FLMEM_TLS_CERT_PEM"  # server: its certificate (PEM)
ENV_TLS_KEY = "FLMEM_TLS_KEY_PEM"    # server: its private key (PEM)
SECRET_MIN_BYTES = 16


def token_for(secret: bytes, rank: int) -> str:
    """Client ``rank``'s token: hex HMAC-SHA256(``secret``, ``flmem-client-<rank>``), 64 characters."""
    return hmac.new(secret, f"{CN_PREFIX}{rank}".encode(), hashlib.sha256).hexdigest()


def token_ok(secret: bytes, rank: int, token: str) -> bool:
    """Whether ``token`` is ``rank``'s token under ``secret`` (constant-time compare)."""
    return hmac.compare_digest(token_for(secret, rank).encode(), token.encode("utf-8", "replace"))


def is_loopback(host: str) -> bool:
    """True for ``localhost``, any 127.0.0.0/8 address and ``::1`` (bracketed or not): reachable from this host
    only. Any other name or address (wildcards included) is reachable from elsewhere."""
    host = str(host).strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret_file(key: str, path: str) -> bytes:
    """The first line of the file ``path`` (setting ``key``) as bytes, e.g. a secret or a token.

    Raises ValueError naming ``key``, the path and the fix: unreadable, or shorter than 16 bytes.
    """
    try:
        value = Path(path).read_bytes().strip().split(b"\n")[0].strip()
    except OSError as exc:
        raise ValueError(f"{key}={path}: cannot read it ({exc.strerror}); make the files with `flmem certs`") from None
    if len(value) < SECRET_MIN_BYTES:
        raise ValueError(f"{key}={path}: holds {len(value)} bytes, fewer than {SECRET_MIN_BYTES}; use the file "
                         "`flmem certs` wrote")
    return value


def local_env(tls: bool, host: str = "127.0.0.1") -> dict[str, str]:
    """The server's environment of one ``role=local`` job: a fresh secret (each client's is :func:`client_env`),
    and with ``tls`` a fresh certificate (for ``host``, the local names and addresses), its key and the CA
    that signed it."""
    secret = secrets.token_hex(32)
    server = {ENV_SECRET: secret}
    if tls:
        from flmem.certs import ephemeral_server_tls

        ca, cert, key = ephemeral_server_tls(hosts=(host,))
        server.update({ENV_TLS_CERT: cert.decode(), ENV_TLS_KEY: key.decode(), ENV_TLS_CA: ca.decode()})
    return server


def client_env(server_env: dict[str, str], rank: int) -> dict[str, str]:
    """What client ``rank`` of a local job gets: its token, and the job's CA when TLS is on."""
    env = {ENV_TOKEN: token_for(server_env[ENV_SECRET].encode(), rank)}
    if ENV_TLS_CA in server_env:
        env[ENV_TLS_CA] = server_env[ENV_TLS_CA]
    return env
