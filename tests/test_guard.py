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
