"""A zoo of hostile url-list inputs. Each ends in the crawl ledger with the status and
reason below, or as one `curate: error: ...` line; none crashes the crawl.

Names resolve through an injected resolver (no DNS query is ever made) and every
connection is checked to go to 127.0.0.1, where the hostile test server listens."""

import ipaddress
import json
import socket
import tarfile

import pandas as pd
import pytest

from curation.crawl.fetch import FetchPolicy
from curation.crawl.image_text import valid_url
from curation.crawl.media import crawl_media
from curation.crawl.sources import read_url_list
from curation.errors import InputError

from .servers import Hostile, hostile_server

LOOPBACK = ("127.0.0.1/32",)
NAMES = {
    "zoo.example": ["127.0.0.1"],
    "bücher.example": ["127.0.0.1"],  # what urlsplit hands over for an IDN host
    "xn--bcher-kva.example": ["127.0.0.1"],  # the same name in punycode
    "intranet.example": ["10.0.0.7"],
    "nat64.example": ["64:ff9b::7f00:1"],  # NAT64 of 127.0.0.1
}


def zoo_resolver(host, port):
    """The system resolver's contract without the network: literals resolve to
    themselves, a few names to fixed addresses, everything else is NXDOMAIN."""
    host.encode("idna")  # as getaddrinfo does: raises UnicodeError for a bad name
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if host in NAMES:
        return NAMES[host]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


POLICY = FetchPolicy(timeout=2, deadline=10, retries=0, allowed_networks=LOOPBACK, resolver=zoo_resolver)


@pytest.fixture
def connections(monkeypatch):
    seen = []
    real = socket.create_connection

    def recording(address, *args, **kwargs):
        seen.append(address[0])
        assert address[0] == "127.0.0.1", f"connection to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    yield seen
    assert set(seen) <= {"127.0.0.1"}


@pytest.fixture(scope="module")
def clip():
    import random

    from curation.demo.corpus import _video_bytes
    from curation.demo.scenes import random_scene

    return _video_bytes(random_scene(random.Random(0)), "left to right")


def video_rows(port):
    """(row, expected (status, reason), what the ledger error must mention)."""
    zoo = f"http://zoo.example:{port}"
    return [
        ({"url": f"{zoo}/video/good.mp4"}, ("kept", None), None),
        ({"url": 12345}, ("dropped", "bad_url"), "not a string"),
        ({"url": None}, ("dropped", "bad_url"), "no url"),
        ({"url": [f"{zoo}/video/good.mp4"]}, ("dropped", "bad_url"), "not a string"),
        ({"url": {"href": f"{zoo}/video/good.mp4"}}, ("dropped", "bad_url"), "not a string"),
        ({"url": "file:///etc/passwd"}, ("dropped", "bad_url"), "http(s)"),
        ({"url": f"ftp://zoo.example:{port}/video/good.mp4"}, ("dropped", "bad_url"), "http(s)"),
        ({"url": "javascript:alert(1)"}, ("dropped", "bad_url"), "http(s)"),
        ({"url": f"http://user:secret@zoo.example:{port}/video/good.mp4"}, ("dropped", "bad_url"), "credentials"),
        ({"url": f"http://bücher.example:{port}/video/good.mp4"}, ("kept", None), None),
        ({"url": f"http://xn--bcher-kva.example:{port}/video/good.mp4"}, ("kept", None), None),
        ({"url": f"http://{'a' * 64}.example:{port}/video/good.mp4"}, ("dropped", "bad_url"), "IDNA"),
        ({"url": f"{zoo}/video/good.mp4?pad={'a' * 9000}"}, ("dropped", "bad_url"), "characters long"),
        ({"url": f"{zoo}/redirect-private.jpg"}, ("dropped", "private_address"), None),
        ({"url": f"{zoo}/redirect-loop.jpg"}, ("failed", "too_many_redirects"), None),
        ({"url": f"{zoo}/video/dup.mp4"}, ("kept", None), None),
        ({"url": f"{zoo}/video/dup.mp4"}, ("kept", None), None),  # the same url twice: two rows, two samples
        ({"url": f"http://intranet.example:{port}/video/good.mp4"}, ("dropped", "private_address"), None),
        ({"url": f"http://nat64.example:{port}/video/good.mp4"}, ("dropped", "private_address"), None),
        ({"url": f"http://no-such-host.example:{port}/video/good.mp4"}, ("failed", "dns_error"), None),
        ({"url": f"{zoo}/video/ü.mp4"}, ("kept", None), None),  # sent percent-encoded
        ({"url": f"{zoo}/video/a b.mp4"}, ("kept", None), None),  # sent as a%20b.mp4
        ({"url": f"{zoo}/video/good.mp4\r\nX-Injected: 1"}, ("dropped", "bad_url"), "control characters"),
        ({"url": f"{zoo}/video/good.mp4", "caption": 42}, ("kept", None), None),
        ({"url": f"{zoo}/page.jpg"}, ("dropped", "not_video"), None),
    ]


def test_video_url_list_zoo(tmp_path, clip, connections):
    Hostile.videos = {"/video/good.mp4": clip, "/video/dup.mp4": clip, "/video/%C3%BC.mp4": clip,
                     "/video/a%20b.mp4": clip}
    with hostile_server() as base:
        port = base.rsplit(":", 1)[1]
        cases = video_rows(port)
        path = tmp_path / "zoo.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row, _, _ in cases))
        ledger = crawl_media("video", path, tmp_path / "raw", policy=POLICY, threads=4)
        hits = dict(Hostile.hits)
    assert len(ledger) == len(cases) and ledger["uid"].is_unique
    for i, ((row, expected, mention), got) in enumerate(zip(cases, ledger.itertuples())):
        assert (got.status, got.reason) == expected, (i, row, got.error)
        if mention:
            assert mention in got.error, (i, got.error)
    assert hits["/video/dup.mp4"] == 2  # both rows fetched; exact_dedup drops one copy at curation
    kept = ledger[ledger["status"] == "kept"]
    uids = []
    for tar_path in sorted((tmp_path / "raw").glob("video-r*.tar")):
        with tarfile.open(tar_path) as tar:
            uids += [json.loads(tar.extractfile(m).read())["uid"] for m in tar if m.name.endswith(".json")]
    assert sorted(uids) == sorted(kept["uid"])
    assert ledger.loc[ledger["url"].isna(), "reason"].eq("bad_url").all()  # non-string urls are no urls


def test_parquet_url_columns_of_other_types(tmp_path):
    pd.DataFrame({"url": [1, 2, 3]}).to_parquet(tmp_path / "ints.parquet")
    pd.DataFrame({"url": [["http://zoo.example/a"], [], None]}).to_parquet(tmp_path / "lists.parquet")
    pd.DataFrame({"url": [b"http://zoo.example/a"]}).to_parquet(tmp_path / "bytes.parquet")
    for name in ("ints", "lists", "bytes"):
        ledger = crawl_media("video", tmp_path / f"{name}.parquet", tmp_path / name, policy=POLICY)
        assert ledger["status"].eq("dropped").all() and ledger["reason"].eq("bad_url").all(), name
        assert not list((tmp_path / name).glob("video-r*.tar"))  # nothing was fetched


def test_image_text_refuses_the_same_urls():
    # image_text decides "worth a request" with the same guard before img2dataset runs
    for url in ("file:///etc/passwd", "javascript:alert(1)", "http://u:p@zoo.example/a.jpg", 12345, None,
                "http://zoo.example/" + "a" * 9000, "ftp://zoo.example/a.jpg"):
        assert not valid_url(url), url
    assert valid_url("http://bücher.example/a.jpg") and valid_url("HTTPS://zoo.example/a.jpg")


def _one_line_error(capsys, *argv):
    from curation.cli import main

    assert main(["crawl", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curate: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("name,content,kind,expected", [
    ("empty.jsonl", b"", "video", "has no rows"),
    ("blank.jsonl", b"\n\n  \n", "video", "has no rows"),
    ("empty.csv", b"", "video", "has no rows"),
    ("header-only.csv", b"url,caption\n", "video", "has no rows"),
    ("empty.txt", b"", "video", "has no rows"),
    ("latin1.csv", "url,caption\nhttp://zoo.example/a.mp4,café crème\n".encode("latin-1"), "video", "not UTF-8"),
    ("latin1.txt", "http://zoo.example/é.mp4\n".encode("latin-1"), "video", "UTF-8"),
    ("nourl.jsonl", b'{"link": "http://zoo.example/a.mp4"}\n', "video", "no url column"),
    ("broken.jsonl", b'{"url": "http://zoo.example/a.mp4"}\n{"url": \n', "video", "line 2: not valid JSON"),
    ("array.jsonl", b'["http://zoo.example/a.mp4"]\n', "video", "line 1: a JSON list, not an object"),
    ("latin1.jsonl", '{"url": "http://zoo.example/é.mp4"}\n'.encode("latin-1"), "video", "line 1: not UTF-8"),
    ("urls.xml", b"<urls/>", "video", "unsupported format"),
    ("nodocs.jsonl", b'{"text": "no items here"}\n', "interleaved", "needs 'items' or both"),
    ("empty-docs.jsonl", b"", "interleaved", "has no rows"),
    ("docs-array.jsonl", b'[{"type": "text", "text": "hi"}]\n', "interleaved", "not an object"),
])
def test_unusable_inputs_are_one_line_errors(tmp_path, capsys, name, content, kind, expected):
    path = tmp_path / name
    path.write_bytes(content)
    err = _one_line_error(capsys, "--input", path, "--out", tmp_path / "raw", "--kind", kind)
    assert expected in err, err


def test_missing_named_column_and_empty_parquet(tmp_path, capsys):
    pd.DataFrame({"url": ["http://zoo.example/a.mp4"]}).to_parquet(tmp_path / "ok.parquet")
    err = _one_line_error(capsys, "--input", tmp_path / "ok.parquet", "--out", tmp_path / "raw", "--kind", "video",
                          "--url-col", "URL")
    assert "no url column 'URL'" in err
    pd.DataFrame({"url": pd.Series([], dtype=str)}).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(InputError, match="has no rows"):
        read_url_list(tmp_path / "none.parquet")


def test_documents_zoo(tmp_path, connections):
    with hostile_server() as base:
        zoo = base.replace("127.0.0.1", "zoo.example")
        docs = [
            ({"items": [{"type": "text", "text": "a"}, {"type": "image", "url": f"{zoo}/img/1.jpg"}]}, ("kept", None)),
            ({"items": ["just a string", 5]}, ("dropped", "bad_document")),  # items that are not objects
            ({"items": "not a list"}, ("dropped", "bad_document")),
            ({"items": [{"type": "video", "url": f"{zoo}/img/2.jpg"}]}, ("dropped", "bad_document")),
            ({"items": [{"type": "text", "text": 7}, {"type": "image", "url": f"{zoo}/img/2.jpg"}]},
             ("dropped", "bad_document")),
            ({"texts": ["a", None], "images": f"{zoo}/img/3.jpg"}, ("dropped", "bad_document")),  # images not a list
            ({"texts": ["a"], "images": [None, f"{zoo}/img/3.jpg"]}, ("dropped", "bad_document")),  # not parallel
            ({"texts": "a", "images": [f"{zoo}/img/3.jpg"]}, ("dropped", "bad_document")),
            ({"texts": [None, "b"], "images": [f"{zoo}/img/4.jpg", None]}, ("kept", None)),
            ({"items": [{"type": "image", "url": 5}]}, ("dropped", "missing_images")),  # a url that is no url
            ({"items": [{"type": "image", "url": [f"{zoo}/img/5.jpg"]}]}, ("dropped", "missing_images")),
            ({"items": [{"type": "image", "url": "http://intranet.example/x.jpg"}]}, ("dropped", "missing_images")),
            ({"items": [{"type": "image", "url": f"{zoo}/img/6.jpg"}, {"type": "image", "url": f"{zoo}/img/6.jpg"}]},
             ("kept", None)),  # the same image twice in one document: both members
            ({"items": []}, ("dropped", "no_images")),
            ({"items": None, "texts": None}, ("dropped", "bad_document")),
            ({"doc_id": 3, "items": [{"type": "image", "url": f"{zoo}/img/7.jpg"}]}, ("kept", None)),
        ]
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d, _ in docs))
        ledger = crawl_media("interleaved", path, tmp_path / "raw", policy=POLICY, threads=4)
    assert len(ledger) == len(docs)
    for i, ((doc, expected), got) in enumerate(zip(docs, ledger.itertuples())):
        assert (got.status, got.reason) == expected, (i, doc, got.error)
    bad = ledger[ledger["reason"] == "bad_document"]
    assert bad["error"].str.contains("not an object|not a list|type 'video'|not a string|entries|needs").all()
    metas = {}
    for tar_path in sorted((tmp_path / "raw").glob("interleaved-r*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["uid"]] = meta
    twice = metas[ledger.loc[12, "uid"]]
    assert [it["member"] for it in twice["items"]] == ["0.jpg", "1.jpg"]
    assert metas[ledger.loc[15, "uid"]]["doc_id"] == "3"
