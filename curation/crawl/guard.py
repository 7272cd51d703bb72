"""Refuse urls that point at private, loopback, link-local or otherwise non-public
addresses (server-side request forgery). The decision is a pure function of the
resolved addresses, so it is tested without opening any connection.

IPv6 addresses that carry an IPv4 address are judged by what they carry, because a
packet to them ends at that IPv4 address (or a host named by it):

* IPv4-mapped `::ffff:a.b.c.d`: it *is* the IPv4 address (dual-stack sockets).
* NAT64 well-known `64:ff9b::a.b.c.d` (RFC 6052): the translator connects to a.b.c.d.
  Allowed when a.b.c.d is public (this is how an IPv6-only network with DNS64 reaches
  the IPv4 web), refused otherwise.
* 6to4 `2002:AABB:CCDD::/48` (RFC 3056): a relay tunnels to AA.BB.CC.DD. Allowed when
  that address is public, refused otherwise.
* Teredo `2001:0::/32` (RFC 4380): refused whatever it carries. IANA lists it as not
  globally reachable; its addresses name a NAT-ed client (the client IPv4 is the last 32
  bits inverted, the server IPv4 in bits 32-63), never a web server, and a tunnel to
  either end is no business of a crawler.
* IPv4-compatible `::a.b.c.d` (`::/96`, deprecated by RFC 4291): refused whatever it
  carries; nothing routes it any more, and old stacks turned it into IPv4.
* NAT64 local-use `64:ff9b:1::/48` (RFC 8215): refused (not globally reachable; where the
  IPv4 address sits depends on the operator's prefix length). A crawler behind such a
  translator opens it with `--allow-network 64:ff9b:1::/48`.
* ISATAP interface ids (`...:0:5efe:a.b.c.d`, `...:200:5efe:a.b.c.d`): refused when the
  embedded IPv4 is not public, otherwise judged as the IPv6 address it is.

The rules do not lean on the standard library's `is_global` alone (which moved between
Python releases): the special-purpose blocks are listed here too.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 8192  # characters; longer urls are refused as bad_url (servers answer 414 anyway)

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# IANA special-purpose blocks that are not globally reachable (plus multicast and the
# 6to4 relay anycast), whatever this Python's ipaddress tables say.
NON_PUBLIC_V4 = tuple(_V4(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
NON_PUBLIC_V6 = tuple(_V6(n) for n in (
    "::/8", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8"))
MAPPED = _V6("::ffff:0:0/96")
COMPATIBLE = _V6("::/96")
NAT64_WELL_KNOWN = _V6("64:ff9b::/96")
NAT64_LOCAL_USE = _V6("64:ff9b:1::/48")
SIX_TO_FOUR = _V6("2002::/16")
TEREDO = _V6("2001::/32")
ISATAP_IDS = (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")


def _v4_is_public(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in n for n in NON_PUBLIC_V4)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]] | None:
    """(form, the IPv4 addresses it carries) for the IPv6 forms that embed IPv4, else None."""
    low32 = ipaddress.IPv4Address(ip.packed[12:])
    if ip in MAPPED:
        return "ipv4-mapped", (low32,)
    if ip in COMPATIBLE:
        return "ipv4-compatible", (low32,)
    if ip in NAT64_WELL_KNOWN:
        return "nat64", (low32,)
    if ip in NAT64_LOCAL_USE:
        return "nat64-local", (low32,)  # the /96 reading; other prefix lengths put it elsewhere
    if ip in SIX_TO_FOUR:
        return "6to4", (ipaddress.IPv4Address(ip.packed[2:6]),)
    if ip in TEREDO:
        server = ipaddress.IPv4Address(ip.packed[4:8])
        client = ipaddress.IPv4Address(bytes(b ^ 0xFF for b in ip.packed[12:]))
        return "teredo", (server, client)
    if ip.packed[8:12] in ISATAP_IDS:
        return "isatap", (low32,)
    return None


def address_is_public(addr: str) -> bool:
    """True only for globally routable unicast addresses (see the module docstring for
    IPv6 addresses that carry IPv4)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_is_public(ip)
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        form, v4s = embedded
        if form in ("ipv4-mapped", "nat64", "6to4"):
            return all(_v4_is_public(v4) for v4 in v4s)
        if form in ("ipv4-compatible", "nat64-local", "teredo"):
            return False
        if not all(_v4_is_public(v4) for v4 in v4s):  # isatap: then judged as IPv6 below
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local
                                 or ip.is_site_local or any(ip in n for n in NON_PUBLIC_V6))


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # drop reason when not allowed
    error: str | None = None  # set when the check itself failed (e.g. DNS)
    addresses: tuple[str, ...] = ()  # the vetted addresses: connect to these, not to a new lookup


def in_networks(addr: str, networks: Iterable[str]) -> bool:
    """`addr` lies in one of `networks`; an IPv4-mapped address counts as its IPv4 address."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    candidates = [ip] + ([ip.ipv4_mapped] if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else [])
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    return any(c.version == n.version and c in n for c in candidates for n in nets)


def resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def judge_addresses(addresses: Iterable[str], allow_private: bool, allowed_networks: Iterable[str] = ()) -> Verdict:
    """Every address must be public, or inside an explicitly allowed network, unless
    allow_private lifts the rule altogether."""
    addresses = list(addresses)
    allowed_networks = tuple(allowed_networks)
    if not addresses:
        return Verdict(False, "dns_error", "host resolved to no address")
    try:
        ok = allow_private or all(address_is_public(a) or in_networks(a, allowed_networks) for a in addresses)
    except ValueError as exc:  # a resolver that answered something that is not an address
        return Verdict(False, "dns_error", f"ValueError: {exc}")
    if not ok:
        return Verdict(False, "private_address")
    return Verdict(True, addresses=tuple(addresses))


def url_problem(url) -> str | None:
    """Why `url` is not a fetchable url (None when it is): only http(s) urls with a
    host, no credentials, no control characters, a valid port and host name, at most
    MAX_URL_LENGTH characters. Spaces and non-ASCII in the path are fine: the request
    percent-encodes them."""
    if not isinstance(url, str):
        if url is None:
            return "no url (missing, null or not a string)"
        return f"url is a {type(url).__name__}, not a string"
    if not url:
        return "empty url"
    if len(url) > MAX_URL_LENGTH:
        return f"url is {len(url)} characters long (at most {MAX_URL_LENGTH})"
    if any(ord(c) < 32 or ord(c) == 127 for c in url):  # CR/LF would be header injection
        return f"url contains control characters: {url[:200]!r}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"{exc}: {url[:200]}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
        return f"only http(s) urls with a host are fetched: {url[:200]}"
    if parts.username is not None or parts.password is not None:
        return "urls with credentials (user:password@) are not fetched"
    host = parts.hostname
    if not (host.startswith("[") or ":" in host):  # IPv6 literals are checked as addresses
        try:
            host.encode("idna")
        except UnicodeError as exc:
            return f"host is not a valid (IDNA) name: {exc}"
    return None


def check_url(url: str | None, allow_private: bool, resolver: Callable[[str, int], list[str]] = resolve,
              allowed_networks: Iterable[str] = ()) -> Verdict:
    """Decide whether `url` may be fetched. Every address the host resolves to must be
    public (unless allow_private), so a name with one private record is refused."""
    problem = url_problem(url)
    if problem:
        return Verdict(False, "bad_url", problem)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        addresses = resolver(parts.hostname, port)
    except socket.gaierror as exc:
        transient = exc.errno == socket.EAI_AGAIN
        return Verdict(False, "dns_error", f"{'EAI_AGAIN ' if transient else ''}{type(exc).__name__}: {exc}")
    except (UnicodeError, OSError) as exc:
        return Verdict(False, "dns_error", f"{type(exc).__name__}: {exc}")
    return judge_addresses(addresses, allow_private, allowed_networks)
