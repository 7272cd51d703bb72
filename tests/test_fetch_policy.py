"""The fetch policy against a hostile server on 127.0.0.1: every url ends with the
status and reason a user expects, and no connection ever leaves 127.0.0.1."""

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from curation.crawl.fetch import FetchPolicy, fetch, opted_out

from .servers import Hostile, hostile_server

# Loopback is allowed by network, not by allow_private, so the guard still refuses
# every other private address (the redirect test relies on that).
POLICY = FetchPolicy(timeout=0.6, deadline=2.0, retries=2, backoff=0.01, backoff_max=0.05,
                     max_bytes={"image": 2 * 1024 * 1024, "video": 4 * 1024 * 1024, "any": 2 * 1024 * 1024},
                     max_pixels=50_000_000, allowed_networks=("127.0.0.1/32",))

EXPECTED = {
    "/img/1.jpg": ("kept", None),
    "/missing.jpg": ("failed", "http_error"),
    "/gone.jpg": ("failed", "http_error"),
    "/flaky-a.jpg": ("kept", None),
    "/always-500.jpg": ("failed", "http_error"),
    "/truncated.jpg": ("failed", "corrupt_image"),
    "/short-read.jpg": ("failed", "connection_error"),
    "/page.jpg": ("dropped", "not_image"),
    "/optout.jpg": ("dropped", "opt_out"),
    "/optout-us.jpg": ("dropped", "opt_out"),
    "/optout-other.jpg": ("kept", None),
    "/slow.jpg": ("failed", "timeout"),
    "/drip.jpg": ("failed", "timeout"),
    "/huge-declared.jpg": ("dropped", "too_large"),
    "/huge-chunked.jpg": ("dropped", "too_large"),
    "/bomb.png": ("dropped", "too_many_pixels"),
    "/redirect-ok.jpg": ("kept", None),
    "/redirect-private.jpg": ("dropped", "private_address"),
    "/redirect-loop.jpg": ("failed", "too_many_redirects"),
}
TRANSIENT = {"/always-500.jpg", "/short-read.jpg", "/slow.jpg", "/drip.jpg"}


@pytest.fixture
def connections(monkeypatch):
    """Every address the crawler connects to."""
    seen = []
    real = socket.create_connection

    def recording(address, *args, **kwargs):
        seen.append(address[0])
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return seen


def test_every_hostile_url_ends_as_expected(connections):
    with hostile_server() as base:
        paths = list(EXPECTED) + [f"/img/{i}.jpg" for i in range(2, 30)]  # good urls mixed in
        with ThreadPoolExecutor(8) as pool:
            outcomes = dict(zip(paths, pool.map(lambda p: fetch(base + p, "image", POLICY), paths)))
    for path, (status, reason) in EXPECTED.items():
        o = outcomes[path]
        assert (o.status, o.reason) == (status, reason), f"{path}: {o.status} {o.reason} {o.error}"
        assert o.transient == (path in TRANSIENT), path
        if status == "failed":
            assert o.error
    for i in range(2, 30):  # nothing else in the run was disturbed
        assert outcomes[f"/img/{i}.jpg"].status == "kept"
    assert outcomes["/flaky-a.jpg"].attempts == 3 and Hostile.hits["/flaky-a.jpg"] == 3
    assert Hostile.hits["/always-500.jpg"] == 3  # 1 + 2 retries, then given up
    assert Hostile.hits["/missing.jpg"] == 1 and Hostile.hits["/page.jpg"] == 1  # permanent: never retried
    assert set(connections) == {"127.0.0.1"}  # the private redirect target was never contacted


def test_loopback_refused_without_permission(connections):
    with hostile_server() as base:
        o = fetch(base + "/img/1.jpg", "image", FetchPolicy(retries=0))
    assert (o.status, o.reason) == ("dropped", "private_address")
    assert connections == []  # refused before connecting
    assert sum(Hostile.hits.values()) == 0


def test_user_agent_names_the_project(monkeypatch):
    seen = {}
    from tests.servers import Hostile as H
    original = H.do_GET

    def capture(self):
        seen["ua"] = self.headers.get("User-Agent")
        return original(self)

    monkeypatch.setattr(H, "do_GET", capture)
    with hostile_server() as base:
        assert fetch(base + "/img/3.jpg", "image", POLICY).status == "kept"
    assert "curation-vlm" in seen["ua"]


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"),
    (["noindex, nofollow"], "noindex"),
    (["nofollow"], None),
    (["otherbot: noai"], None),
    (["curation-vlm: noimageai"], "noimageai"),
    (["CURATION-VLM: NOAI"], "noai"),
    (["*: noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
])
def test_opt_out_parsing(values, expected):
    assert opted_out(values) == expected


def test_video_kind_checks_container(connections):
    Hostile.videos = {"/video/a.mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, "/video/b.mp4": b"<html>"}
    with hostile_server() as base:
        assert fetch(base + "/video/a.mp4", "video", POLICY).status == "kept"
        o = fetch(base + "/video/b.mp4", "video", POLICY)
    assert (o.status, o.reason) == ("dropped", "not_video")


@pytest.mark.parametrize("values, expected", [
    (["max-image-preview:large, noai"], "noai"),
    (["noai,unavailable_after: 25 Jun 2010 15:00:00 PST"], "noai"),
    (["none"], "noindex"),
    (["otherbot: noindex, curation-vlm: noai"], "noai"),
    (["otherbot: noindex, nofollow"], None),
])
def test_opt_out_parsing_edge_cases(values, expected):
    assert opted_out(values) == expected


def test_headers_trickled_past_the_deadline_time_out(connections):
    import threading as th
    import time as tm
    from socket import socket as sock_cls

    server = sock_cls()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def trickle():
        conn, _ = server.accept()
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 40:
                conn.send(bytes([byte]))
                tm.sleep(0.1)  # each byte well inside the socket timeout
        except OSError:
            pass
        finally:
            conn.close()

    t = th.Thread(target=trickle, daemon=True)
    t.start()
    started = tm.monotonic()
    policy = FetchPolicy(timeout=1.0, deadline=1.0, retries=0, allowed_networks=("127.0.0.1/32",))
    o = fetch(f"http://127.0.0.1:{port}/x.jpg", "image", policy)
    assert (o.status, o.reason, o.transient) == ("failed", "timeout", True)
    assert tm.monotonic() - started < 3
    server.close()


def test_unknown_host_is_permanent():
    import socket as s

    def nxdomain(host, port):
        raise s.gaierror(s.EAI_NONAME, "Name or service not known")

    o = fetch("http://no-such-host.invalid/x.jpg", "image", FetchPolicy(retries=2, backoff=0.01), resolver=nxdomain)
    assert (o.status, o.reason, o.transient, o.attempts) == ("failed", "dns_error", False, 1)
