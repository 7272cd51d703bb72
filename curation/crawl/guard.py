"""Refuse urls that point at private, loopback, link-local or otherwise non-public
addresses (server-side request forgery). The decision is a pure function of the
resolved addresses, so it is tested without opening any connection."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")


def address_is_public(addr: str) -> bool:
    """True only for globally routable unicast addresses."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # drop reason when not allowed
    error: str | None = None  # set when the check itself failed (e.g. DNS)
    addresses: tuple[str, ...] = ()  # the vetted addresses: connect to these, not to a new lookup


def in_networks(addr: str, networks: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def judge_addresses(addresses: Iterable[str], allow_private: bool, allowed_networks: Iterable[str] = ()) -> Verdict:
    """Every address must be public, or inside an explicitly allowed network, unless
    allow_private lifts the rule altogether."""
    addresses = list(addresses)
    allowed_networks = tuple(allowed_networks)
    if not addresses:
        return Verdict(False, "dns_error", "host resolved to no address")
    if not allow_private and not all(address_is_public(a) or in_networks(a, allowed_networks) for a in addresses):
        return Verdict(False, "private_address")
    return Verdict(True, addresses=tuple(addresses))


def check_url(url: str | None, allow_private: bool, resolver: Callable[[str, int], list[str]] = resolve,
              allowed_networks: Iterable[str] = ()) -> Verdict:
    """Decide whether `url` may be fetched. Every address the host resolves to must be
    public (unless allow_private), so a name with one private record is refused."""
    if not url:
        return Verdict(False, "bad_url", "empty url")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return Verdict(False, "bad_url", str(exc))
    if parts.scheme not in ALLOWED_SCHEMES or not parts.hostname:
        return Verdict(False, "bad_url", f"only http(s) urls with a host are fetched: {url[:200]}")
    try:
        addresses = resolver(parts.hostname, port)
    except socket.gaierror as exc:
        transient = exc.errno == socket.EAI_AGAIN
        return Verdict(False, "dns_error", f"{'EAI_AGAIN ' if transient else ''}{type(exc).__name__}: {exc}")
    except (UnicodeError, OSError) as exc:
        return Verdict(False, "dns_error", f"{type(exc).__name__}: {exc}")
    return judge_addresses(addresses, allow_private, allowed_networks)
