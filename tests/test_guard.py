"""The private-address guard, tested as a pure function: no connection is opened."""

import pytest

from curation.crawl.guard import address_is_public, check_url, judge_addresses


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "127.8.9.10", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3", "224.0.0.1", "240.0.0.1",
])
def test_non_public_addresses_refused(addr):
    assert not address_is_public(addr)


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.4.4"])
def test_public_addresses_allowed(addr):
    assert address_is_public(addr)


def fake_resolver(table):
    def resolve(host, port):
        return table[host]
    return resolve


def test_any_private_record_refuses_the_host():
    resolver = fake_resolver({"mixed.example": ["8.8.8.8", "10.0.0.1"], "ok.example": ["8.8.8.8"]})
    assert check_url("http://mixed.example/a.jpg", False, resolver).reason == "private_address"
    assert check_url("http://ok.example/a.jpg", False, resolver).allowed
    assert check_url("http://mixed.example/a.jpg", True, resolver).allowed


@pytest.mark.parametrize("url", ["", None, "ftp://x.example/a", "file:///etc/passwd", "javascript:alert(1)", "http:///nohost"])
def test_bad_urls(url):
    v = check_url(url, True, fake_resolver({}))
    assert not v.allowed and v.reason == "bad_url"


def test_loopback_literal_refused_without_flag():
    # Literal addresses resolve locally (no DNS query, no connection).
    assert check_url("http://127.0.0.1:9/x.jpg", False).reason == "private_address"
    assert check_url("http://[::1]:9/x.jpg", False).reason == "private_address"
    assert check_url("http://127.0.0.1:9/x.jpg", True).allowed


def test_allowed_networks_open_exactly_those_addresses():
    assert judge_addresses(["127.0.0.1"], False, ["127.0.0.1/32"]).allowed
    assert judge_addresses(["127.0.0.2"], False, ["127.0.0.1/32"]).reason == "private_address"
    assert judge_addresses(["10.1.2.3"], False, ["127.0.0.0/8"]).reason == "private_address"
    assert judge_addresses(["8.8.8.8"], False, ["127.0.0.1/32"]).addresses == ("8.8.8.8",)


def test_unresolvable_host_is_a_failure_not_a_crash():
    def boom(host, port):
        raise OSError("no such host")
    v = check_url("http://nowhere.invalid/x.jpg", False, boom)
    assert not v.allowed and v.reason == "dns_error" and "no such host" in v.error
    assert judge_addresses([], False).reason == "dns_error"


# IPv6 forms that carry an IPv4 address: each with a private and a public one inside.
# (address, public?) -- see guard.py's docstring for the rule per form.
EMBEDDED = [
    # IPv4-mapped ::ffff:a.b.c.d is the IPv4 address itself
    ("::ffff:127.0.0.1", False), ("::ffff:192.168.0.1", False), ("::ffff:8.8.8.8", True),
    # 6to4 2002:AABB:CCDD::/48 reaches AA.BB.CC.DD through a relay
    ("2002:7f00:0001::", False), ("2002:a00:1::1", False), ("2002:a9fe:a9fe::", False),
    ("2002:c058:6301::", False),  # 192.88.99.1, the deprecated 6to4 relay anycast
    ("2002:808:808::1", True),
    # NAT64 well-known prefix 64:ff9b::/96: the translator connects to the last 32 bits
    ("64:ff9b::7f00:1", False), ("64:ff9b::10.1.2.3", False), ("64:ff9b::169.254.169.254", False),
    ("64:ff9b::8.8.8.8", True),
    # NAT64 local-use 64:ff9b:1::/48: refused whatever it carries (open it with --allow-network)
    ("64:ff9b:1::7f00:1", False), ("64:ff9b:1::8.8.8.8", False),
    # IPv4-compatible ::a.b.c.d (deprecated): refused whatever it carries
    ("::127.0.0.1", False), ("::10.0.0.1", False), ("::8.8.8.8", False),
    # Teredo 2001:0::/32 (server in bits 32-63, client = last 32 bits xor 0xffffffff): always refused
    ("2001:0:808:808::80ff:fffe", False),  # server 8.8.8.8, client 127.0.0.1
    ("2001:0:a00:1::f7f7:f7f7", False),  # server 10.0.0.1, client 8.8.8.8
    ("2001:0:808:808::f7f7:f7f7", False),  # both public: still refused
    # ISATAP interface ids: a private embedded IPv4 refuses, a public one is judged as IPv6
    ("2606:4700::5efe:a00:1", False), ("2606:4700::200:5efe:c0a8:101", False),
    ("2606:4700::5efe:808:808", True), ("fe80::5efe:808:808", False),
]


@pytest.mark.parametrize("addr,public", EMBEDDED)
def test_ipv6_carrying_ipv4_is_judged_by_what_it_carries(addr, public):
    assert address_is_public(addr) is public
    verdict = check_url("http://embedded.example/x.jpg", False, fake_resolver({"embedded.example": [addr]}))
    assert verdict.allowed is public and (public or verdict.reason == "private_address")


def test_embedded_ipv4_extraction():
    import ipaddress

    from curation.crawl.guard import embedded_ipv4

    def emb(a):
        form, v4s = embedded_ipv4(ipaddress.ip_address(a))
        return form, [str(v) for v in v4s]

    assert emb("2002:7f00:0001::") == ("6to4", ["127.0.0.1"])
    assert emb("2001:0:4136:e378:8000:63bf:3fff:fdd2") == ("teredo", ["65.54.227.120", "192.0.2.45"])  # RFC 4380 example
    assert emb("64:ff9b::c000:221") == ("nat64", ["192.0.2.33"])  # RFC 6052 example
    assert emb("::ffff:10.0.0.1") == ("ipv4-mapped", ["10.0.0.1"])
    assert emb("::10.0.0.1") == ("ipv4-compatible", ["10.0.0.1"])
    assert emb("2001:db8::5efe:a00:1") == ("isatap", ["10.0.0.1"])
    assert embedded_ipv4(ipaddress.ip_address("2606:4700:4700::1111")) is None


@pytest.mark.parametrize("addr", ["2001:db8::1", "3fff::1", "fec0::1", "ff02::1", "100::1", "::", "192.0.2.1",
                                  "198.18.0.1", "203.0.113.9", "255.255.255.255"])
def test_special_purpose_blocks_refused(addr):
    assert not address_is_public(addr)


def test_allowed_network_covers_the_mapped_form_only():
    assert judge_addresses(["::ffff:127.0.0.1"], False, ["127.0.0.1/32"]).allowed
    assert judge_addresses(["64:ff9b::7f00:1"], False, ["127.0.0.1/32"]).reason == "private_address"
    assert judge_addresses(["2002:7f00:1::"], False, ["127.0.0.1/32"]).reason == "private_address"


def test_resolver_answering_garbage_is_a_dns_error():
    v = check_url("http://odd.example/", False, fake_resolver({"odd.example": ["not-an-address"]}))
    assert (v.allowed, v.reason) == (False, "dns_error")


@pytest.mark.parametrize("url,fragment", [
    ("http://user:secret@ok.example/a.jpg", "credentials"),
    ("http://ok.example@evil.example/a.jpg", "credentials"),
    ("http://ok.example/" + "a" * 9000, "characters long"),
    ("http://ok.example/a.jpg\r\nX-Injected: 1", "control characters"),
    ("http://ok.example/a.jpg\x00", "control characters"),
    ("http://ok.example:99999/a.jpg", "Port"),
    ("http://" + "a" * 64 + ".example/a.jpg", "IDNA"),
    ("http://[::1/a.jpg", "IPv6"),
])
def test_url_problems_are_bad_urls(url, fragment):
    v = check_url(url, True, fake_resolver({}))
    assert (v.allowed, v.reason) == (False, "bad_url") and fragment in v.error
