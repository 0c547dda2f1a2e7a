"""``flmem certs``: a CA, a server certificate, per-client certificates and tokens for a run across hosts.

Everything is made with the ``cryptography`` library: ECDSA P-256 keys (PKCS#8 PEM, unencrypted, written
0600), X.509 v3 certificates signed with SHA-256. The server certificate's subject alternative names are
the given hosts plus ``localhost``, ``127.0.0.1`` and ``::1``; client K's certificate has the common name
``flmem-client-K`` (what a server with ``security.mutual_tls=true`` reads the rank from). The server secret
is 32 random bytes (hex); client K's token is HMAC-SHA256(secret, "flmem-client-K") (RFC 2104), see
:mod:`flmem.security`.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from flmem.security import CN_PREFIX, token_for

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _certificate(subject_cn: str, key, issuer=None, issuer_key=None, *, ca: bool = False, hosts=(),
                 client: bool = False, days: int = 365):
    """One X.509 certificate for ``key``'s public key, signed by ``issuer_key`` (itself when None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]),
                                        critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def ephemeral_server_tls(hosts=(), days: int = 2) -> tuple[bytes, bytes, bytes]:
    """A throw-away CA and a server certificate for ``hosts`` and ``localhost``/``127.0.0.1``/``::1`` (one local job):
    ``(ca_cert_pem, server_cert_pem, server_key_pem)``."""
    ca_key = _key()
    ca = _certificate("flmem job CA", ca_key, ca=True, days=days)
    key = _key()
    cert = _certificate("localhost", key, ca, ca_key, hosts=[*hosts, *LOCAL_NAMES], days=days)
    return _pem_cert(ca), _pem_cert(cert), _pem_key(key)


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write ``data`` to ``path`` (a new file, or one replaced), mode 0600 for keys and tokens from the start."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600 if secret else 0o644)
        fh.write(data)


def make_certs(out: Path, hosts: list[str], clients: int, days: int = 365, force: bool = False) -> dict[str, Path]:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key``, ``server.secret`` and for each rank K in
    0..clients-1 ``client_K.pem``/``client_K.key``/``client_K.token`` into ``out`` (created).

    Returns name -> path. Raises ValueError for ``clients`` < 1, no hosts or ``days`` < 1, and when any of those
    files exists already unless ``force`` (a new CA or secret would void every certificate and token handed out).
    """
    if clients < 1 or days < 1:
        raise ValueError(f"--clients {clients} --days {days}: both must be >= 1")
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("--hosts: give the server's host names or addresses, comma-separated, e.g. h1,10.0.0.5")
    names = ["ca.pem", "ca.key", "server.pem", "server.key", "server.secret"] + \
        [f"client_{k}.{ext}" for k in range(clients) for ext in ("pem", "key", "token")]
    present = [n for n in names if os.path.lexists(out / n)]
    if present and not force:
        raise ValueError(f"--out {out} holds {', '.join(present[:3])}{' ...' if len(present) > 3 else ''} already: "
                         "new ones would void the certificates and tokens made with them; pick another --out, or "
                         "--force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def put(name, data, secret):
        paths[name] = out / name
        _write(out / name, data, secret)

    ca_key = _key()
    ca = _certificate("flmem CA", ca_key, ca=True, days=days)
    put("ca.pem", _pem_cert(ca), False)
    put("ca.key", _pem_key(ca_key), True)
    key = _key()
    put("server.pem", _pem_cert(_certificate(hosts[0], key, ca, ca_key, hosts=[*hosts, *LOCAL_NAMES], days=days)),
        False)
    put("server.key", _pem_key(key), True)
    secret = secrets.token_hex(32).encode()
    put("server.secret", secret + b"\n", True)
    for rank in range(clients):
        key = _key()
        put(f"client_{rank}.pem", _pem_cert(_certificate(f"{CN_PREFIX}{rank}", key, ca, ca_key, client=True,
                                                         days=days)), False)
        put(f"client_{rank}.key", _pem_key(key), True)
        put(f"client_{rank}.token", token_for(secret, rank).encode() + b"\n", True)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to write into (created)")
    parser.add_argument("--hosts", required=True,
                        help="the server's names and addresses clients connect to, comma-separated "
                             "(localhost, 127.0.0.1 and ::1 are always added)")
    parser.add_argument("--clients", required=True, type=int, help="num_clients: one certificate and token per rank")
    parser.add_argument("--days", type=int, default=365, help="validity of every certificate (default 365)")
    parser.add_argument("--force", action="store_true", help="replace files a previous run wrote into --out")


def run(args: argparse.Namespace) -> int:
    """Make the files and print the overrides for each role (file paths only: no secret is printed)."""
    paths = make_certs(args.out, args.hosts.split(","), args.clients, args.days, force=args.force)
    d = args.out
    print(f"wrote {len(paths)} files to {d} (keys, tokens and the server secret with mode 0600)\n"
          f"server (keep ca.key offline; it is needed only to issue more certificates):\n"
          f"  python launch.py role=server server.host=0.0.0.0 security.tls=true security.server_cert={d}/server.pem "
          f"security.server_key={d}/server.key security.secret_file={d}/server.secret ...\n"
          f"  for mutual TLS add: security.mutual_tls=true security.ca_cert={d}/ca.pem\n"
          f"client K (copy ca.pem and its own client_K.* only):\n"
          f"  python launch.py role=client role.rank=K server.address=HOST:PORT security.tls=true "
          f"security.ca_cert={d}/ca.pem security.token_file={d}/client_K.token ...\n"
          f"  for mutual TLS add: security.client_cert={d}/client_K.pem security.client_key={d}/client_K.key")
    return 0
