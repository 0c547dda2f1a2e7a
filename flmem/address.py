"""Where clients on other hosts can reach a server: the host's names and non-loopback addresses.

A server bound to a wildcard (``0.0.0.0``, ``::``) listens on every interface, but ``127.0.0.1``
reaches it from this host only. The addresses come from the resolver (the host name's A/AAAA
records) and from the source address the kernel would route outward with (a UDP ``connect``,
which sends no packet); both may miss an interface, and a name is useful only where the other
hosts resolve it.
"""
from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def join(host: str, port: int | str) -> str:
    """``HOST:PORT``, with an IPv6 literal in brackets (gRPC's form): ``[fd00::5]:50051``."""
    host = str(host)
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split(address: str) -> tuple[str, str]:
    """``(host, port)`` of ``HOST:PORT``; the port is what follows the last colon, so an IPv6 literal may come
    with or without brackets (``[::1]:50051`` and ``::1:50051`` both give ``("::1", "50051")``)."""
    host, _, port = str(address).rpartition(":")
    return host.strip("[]"), port


def normalize(address: str) -> str:
    """``HOST:PORT`` in gRPC's form: an IPv6 literal in brackets (``::1:50051`` -> ``[::1]:50051``)."""
    return join(*split(address))


def _usable(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def host_addresses(ipv6: bool = False) -> list[str]:
    """This host's non-loopback IPv4 addresses (and IPv6 ones with ``ipv6``), best guesses first."""
    found: list[str] = []
    families = [(socket.AF_INET, "192.0.2.1")] + ([(socket.AF_INET6, "2001:db8::1")] if ipv6 else [])
    for family, probe in families:  # documentation-range targets: nothing is sent, only a route is chosen
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                found.append(sock.getsockname()[0])
        except OSError:
            pass
    for name in {socket.gethostname(), socket.getfqdn()}:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET6 if ipv6 else socket.AF_INET)
        except OSError:
            continue
        found += [info[4][0] for info in infos]
        if ipv6:
            try:
                found += [info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)]
            except OSError:
                pass
    out: list[str] = []
    for addr in found:
        if addr not in out and _usable(addr):
            out.append(addr)
    return out


def resolves_outward(name: str) -> bool:
    """True when ``name`` resolves (here) to at least one address other hosts could reach: not
    loopback, link-local or unspecified. False when it does not resolve at all."""
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return any(_usable(info[4][0]) for info in infos)


def server_addresses(host: str, port: int) -> tuple[list[str], str]:
    """The ``server.address`` values to print for a server bound to ``host``:``port`` and a note.

    Bound to a wildcard: the host's names that resolve to a non-loopback address, then its
    non-loopback addresses, then names that resolve to loopback only (they reach this host alone;
    the note says 127.0.0.1 does too). Bound to one address: that address alone.
    """
    if host not in WILDCARDS:
        note = " (this host only: bind server.host=0.0.0.0 to accept other hosts)" \
            if host in ("127.0.0.1", "localhost", "::1", "[::1]") else ""
        return [join(host, port)], note
    names = [n for n in dict.fromkeys([socket.getfqdn(), socket.gethostname()]) if n and n != "localhost"]
    # A name that resolves to loopback only (``/etc/hosts`` often maps the host name to 127.0.x.x)
    # works on this host alone: it goes last, after the addresses other hosts can reach.
    reachable = [n for n in names if resolves_outward(n)]
    local_only = [n for n in names if n not in reachable]
    hosts = reachable + host_addresses(ipv6=host != "0.0.0.0") + local_only
    candidates = [join(h, port) for h in dict.fromkeys(hosts)]
    note = (f" (listening on all interfaces; from this host {join('127.0.0.1', port)} also works, but only "
            "here; a name works where the other hosts resolve it)")
    return candidates or [join("127.0.0.1", port)], note
