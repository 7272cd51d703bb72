"""`curate browse`: the JSON API over the small demo's output (paging, one sample, media
bytes = the tar member, ledger rows with their raw media, hostile WHERE clauses and
path tricks), and the page in a real headless Chromium (filter, thumbnails, a sample's
columns, a document's images in order, a playable video, no console errors)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from curation.browse import make_server
from curation.browse.query import QueryError, as_list, jsonable, where_select
from curation.browse.tarindex import TarIndex, read_range
from curation.catalog import connect

HOSTILE_WHERE = [
    "1=1) UNION SELECT * FROM samples WHERE (1=1",
    "1=1) UNION ALL SELECT * REPLACE (read_text('/etc/passwd')::VARCHAR AS text) FROM samples WHERE (1=1",
    "1=1 UNION SELECT * FROM samples",
    "length((SELECT string_agg(content, '') FROM read_text('/etc/passwd'))) > 0",
    "uid IN (SELECT uid FROM read_parquet('/etc/passwd'))",
    "1=1; COPY samples TO '{tmp}/leak.csv'",
    "1=1); COPY (SELECT * FROM samples) TO '{tmp}/leak.csv'; SELECT (1",
    "1=1); ATTACH '{tmp}/x.duckdb' AS x; SELECT (1",
    "1=1); INSTALL httpfs; SELECT (1",
    "1=1); SET enable_external_access = true; SELECT (1",
    "1=1 -- the rest is a comment",
    "1=1 /* a comment */",
    "1=1) ORDER BY (1",
    "1=1) GROUP BY ALL HAVING (1=1",
    "(1=1",
    "'unterminated",
    "no_such_column = 1",
    "COPY samples TO '{tmp}/leak.csv'",
]


# --------------------------------------------------------------------------- units
@pytest.mark.parametrize("where", HOSTILE_WHERE)
def test_a_hostile_where_is_refused_before_it_runs_or_fails_in_the_locked_catalog(where, tmp_path):
    """The shape checks refuse every escape; what parses as one WHERE (a read_text call,
    an unknown column) is left to the catalog's lockdown, tested through the API below."""
    try:
        sql = where_select(where.format(tmp=tmp_path), "samples")
    except QueryError:
        return
    assert sql.startswith("SELECT * FROM samples WHERE (\n") and sql.endswith("\n)")
    assert any(word in where for word in ("read_text", "read_parquet", "no_such_column")), sql


def test_where_select_keeps_a_plain_clause_and_strings_holding_parentheses():
    assert where_select("", "ledger") == "SELECT * FROM ledger"
    sql = where_select("text LIKE '%)%' AND \"kind\" = 'a;b' AND uid IN (SELECT uid FROM ledger)", "samples")
    assert sql == "SELECT * FROM samples WHERE (\ntext LIKE '%)%' AND \"kind\" = 'a;b' AND uid IN (SELECT uid FROM ledger)\n)"
    with pytest.raises(QueryError, match="unknown view"):
        where_select("1=1", "shards")


def test_jsonable_handles_lists_structs_times_bytes_and_nan():
    value = {"a": [1, 2.5, float("nan")], "b": {"c": float("inf"), "d": dt.datetime(2024, 1, 2, 3, 4, 5)},
             "e": b"\x00\xff", "f": decimal.Decimal("1.5"), "g": np.float32(0.25), "h": np.arange(2), "i": None}
    out = jsonable(value)
    assert out == {"a": [1, 2.5, None], "b": {"c": None, "d": "2024-01-02T03:04:05"},
                   "e": {"bytes": 2, "base64": "AP8="}, "f": 1.5, "g": 0.25, "h": [0, 1], "i": None}
    json.dumps(out, allow_nan=False)
    assert as_list('["0.jpg", "1.png"]') == as_list(["0.jpg", "1.png"]) == ["0.jpg", "1.png"]
    assert as_list("not json") == as_list(None) == as_list('{"a": 1}') == []


def test_tar_index_reads_members_by_offset_and_skips_what_is_not_a_regular_file(tmp_path):
    import io

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.jpg", b"A" * 700), ("k1.json", b"{}"), ("../evil.jpg", b"E"), ("k1.jpg", b"second")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k2.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    index = TarIndex(path)
    assert index.sample_members("k1") == ["jpg", "json"] and "k2.jpg" not in index.members
    assert b"".join(read_range(path, index.members["k1.jpg"], chunk=100)) == b"A" * 700  # the first of two wins
    assert b"".join(read_range(path, index.members["k1.jpg"], 10, 19)) == b"A" * 10
    (tmp_path / "y.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 1000)
    with pytest.raises(ValueError, match="compressed"):
        TarIndex(tmp_path / "y.tar")


# --------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def run_root(demo_out) -> Path:
    return demo_out / "curated"


@pytest.fixture(scope="module")
def base(run_root):
    server = make_server(run_root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url.rstrip("/")
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def catalog(run_root):
    return connect(run_root)


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def api(base: str, path: str, **params) -> tuple[int, dict]:
    status, _, body = get(base + path + ("?" + urllib.parse.urlencode(params) if params else ""))
    return status, json.loads(body)


def tar_member(tar_path: Path, name: str) -> bytes:
    with tarfile.open(tar_path) as tar:
        return tar.extractfile(name).read()


def one_of_kind(catalog, kind: str) -> dict:
    cur = catalog.execute("SELECT * FROM samples WHERE kind = ? ORDER BY uid LIMIT 1", [kind])
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def test_samples_pages_cover_every_row_once_and_limit_is_capped(base, catalog):
    total = catalog.execute("SELECT count(*) FROM samples").fetchone()[0]
    status, first = api(base, "/api/samples", limit=7, offset=0)
    assert status == 200 and first["total"] == total and len(first["rows"]) == 7 and len(first["media"]) == 7
    uids = []
    for offset in range(0, total, 200):
        page = api(base, "/api/samples", limit=100000, offset=offset)[1]
        assert page["limit"] == 200
        uids += [r["uid"] for r in page["rows"]]
    assert len(uids) == len(set(uids)) == total and uids[:7] == [r["uid"] for r in first["rows"]]
    status, kind = api(base, "/api/samples", where="kind = 'video' AND duration > 0", limit=200)
    expected = catalog.execute("SELECT count(*) FROM samples WHERE kind = 'video' AND duration > 0").fetchone()[0]
    assert status == 200 and kind["total"] == len(kind["rows"]) == expected > 0
    assert {r["kind"] for r in kind["rows"]} == {"video"} and all(m and m[0]["type"] == "video/mp4" for m in kind["media"])
    status, desc = api(base, "/api/samples", where="clip_score IS NOT NULL", order="clip_score", desc="1", limit=5)
    scores = [r["clip_score"] for r in desc["rows"]]
    assert status == 200 and scores == sorted(scores, reverse=True) and len(scores) == 5


def test_one_sample_has_every_column_and_its_media_are_the_tar_members(base, catalog, run_root):
    columns = [c[0] for c in catalog.execute("DESCRIBE samples").fetchall()]
    for kind in ("image_text", "interleaved", "video"):
        row = one_of_kind(catalog, kind)
        status, sample = api(base, f"/api/sample/{row['uid']}")
        assert status == 200 and sample["view"] == "samples" and list(sample["row"]) == columns
        assert sample["row"]["text"] == row["text"] and sample["row"]["key"] == row["key"]
        assert sample["ledger"]["status"] == "kept" and sample["ledger"]["tier"] == row["tier"]
        names = as_list(row["media"])
        assert [m["name"] for m in sample["media"]] == names and names
        tar_path = run_root / "tiers" / row["tier"] / row["shard"]
        for m in sample["media"]:
            status, headers, body = get(base + m["url"])
            assert status == 200 and body == tar_member(tar_path, f"{row['key']}.{m['name']}")
            assert headers["content-type"] == m["type"] == {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                                                            "mp4": "video/mp4"}[m["name"].rsplit(".", 1)[-1]]
            assert headers["x-content-type-options"] == "nosniff" and "default-src 'none'" in headers["content-security-policy"]
        if kind == "interleaved":
            assert len(names) >= 2 and sample["doc"]["items"]
        if kind == "video":
            status, headers, part = get(base + sample["media"][0]["url"], {"Range": "bytes=100-199"})
            assert status == 206 and headers["content-range"].startswith("bytes 100-199/") and part == body[100:200]


def test_ledger_rows_show_reasons_errors_and_their_raw_media(base, catalog, demo_out):
    status, page = api(base, "/api/samples", view="ledger", where="status <> 'kept' AND raw_shard IS NOT NULL", limit=200)
    assert status == 200 and page["total"] > 0 and {r["status"] for r in page["rows"]} <= {"dropped", "failed"}
    assert all(r["reason"] for r in page["rows"]) and all(r["error"] for r in page["rows"] if r["status"] == "failed")
    with_media = [(r, m) for r, m in zip(page["rows"], page["media"]) if any(x["name"] == "jpg" for x in m)]
    assert with_media, "dropped image samples have their raw jpg"
    row, media = with_media[0]
    status, headers, body = get(base + f"/media/{row['uid']}/jpg")
    raw_tar = demo_out / "raw" / row["raw_shard"]
    assert status == 200 and headers["content-type"] == "image/jpeg" and body == tar_member(raw_tar, f"{row['raw_key']}.jpg")
    status, sample = api(base, f"/api/sample/{row['uid']}")
    assert status == 200 and sample["view"] == "ledger" and sample["row"]["reason"] == row["reason"]
    crawl = api(base, "/api/samples", view="ledger", where="stage = 'crawl'", limit=1)[1]["rows"][0]
    status, sample = api(base, f"/api/sample/{crawl['uid']}")
    assert status == 200 and sample["media"] == [] and "never reached" in sample["media_note"]


@pytest.mark.parametrize("where", HOSTILE_WHERE)
def test_a_hostile_or_bad_where_is_a_400_with_the_error(where, base, tmp_path):
    status, headers, body = get(base + "/api/samples?" + urllib.parse.urlencode({"where": where.format(tmp=tmp_path)}))
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error and "Traceback" not in error and "root:" not in error  # nothing of /etc/passwd's content
    if "passwd" in where and "(1=1" not in where:  # a clause that reached DuckDB: the lockdown refused the file
        assert "disabled by configuration" in error, error
    assert not list(tmp_path.iterdir())  # nothing written, attached or leaked


def test_bad_parameters_are_400_and_unknown_uids_404(base, catalog):
    for params in ({"limit": "-1"}, {"limit": "ten"}, {"offset": "1e3"}, {"order": "no_such"}, {"view": "shards"},
                   {"where": "x" * 9000}):
        status, body = api(base, "/api/samples", **params)
        assert status == 400 and body["error"], params
    assert api(base, "/api/sample/0123456789abcdef")[0] == 404
    assert api(base, "/api/sample/..%2F..%2Fetc")[0] == 404


def test_media_paths_cannot_leave_the_uid_or_its_members(base, catalog, run_root):
    image, video = one_of_kind(catalog, "image_text"), one_of_kind(catalog, "video")
    uid, other = image["uid"], video["uid"]
    assert get(base + f"/media/{uid}/jpg")[0] == 200
    for path in [f"/media/{other}/jpg",                    # another uid's member
                 f"/media/{uid}/mp4", f"/media/{uid}/json", f"/media/{uid}/txt",  # not one of its media
                 f"/media/{uid}/../{other}/mp4", f"/media/{uid}/..%2F{other}%2Fmp4", f"/media/{uid}/%2e%2e%2fjpg",
                 f"/media/{uid}/jpg/x", f"/media/{uid.upper()}/jpg", f"/media/{uid}/", f"/media/{uid}/.jpg",
                 f"/media/{uid}/{urllib.parse.quote(image['key'] + '.jpg')}", "/media/../../etc/passwd",
                 "/static/../server.py", "/static/app.js/..", "/etc/passwd", f"/media//{uid}/jpg", f"/media/{uid}//jpg"]:
        status, headers, body = get(base + path)
        assert status in (400, 404), path
        assert json.loads(body)["error"] and headers["x-content-type-options"] == "nosniff"
    status, _, body = get(base + "/api/samples", {"Host": "evil.example:80"})
    assert status == 403  # DNS rebinding: a page of another site cannot read the API


def test_the_page_and_its_assets_are_local_with_a_strict_policy(base):
    status, headers, body = get(base + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert b"http://" not in body and b"https://" not in body
    for asset in ("/static/app.js", "/static/app.css"):
        status, _, text = get(base + asset)
        assert status == 200 and b"http://" not in text and b"https://" not in text


def test_curate_browse_prints_its_url_and_serves_until_interrupted(run_root, capsys):
    import signal
    import subprocess

    from curation.cli import main

    from .conftest import CURATE, REPO

    proc = subprocess.Popen([*CURATE, "browse", "--root", str(run_root.parent), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split()[2]
        assert line.startswith("curate browse: http://127.0.0.1:") and url.endswith("/"), line
        status, page = api(url.rstrip("/"), "/api/samples", limit=1)
        assert status == 200 and page["total"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert main(["browse", "--root", str(run_root / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: --root") and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- the page
def test_the_page_in_headless_chromium(base, catalog):
    from tests.chromium import chromium_page

    image, doc, video = (one_of_kind(catalog, k) for k in ("image_text", "interleaved", "video"))
    with chromium_page() as page:
        page.goto(base + "/")
        page.wait_for_selector("#grid .card")

        expected = catalog.execute("SELECT count(*) FROM samples WHERE kind = 'image_text' "
                                   "AND clip_score IS NOT NULL").fetchone()[0]
        assert expected < catalog.execute("SELECT count(*) FROM samples").fetchone()[0]
        page.fill("#where", "kind = 'image_text' AND clip_score IS NOT NULL")
        page.click("#run")
        page.wait_for_function("e => document.querySelector('#count').textContent.endsWith(`of ${e} samples rows`)", arg=expected)
        page.wait_for_function("() => [...document.querySelectorAll('#grid .card img.thumb')].length > 0 && "
                               "[...document.querySelectorAll('#grid .card img.thumb')].slice(0, 6)"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#grid .card").count() == min(expected, 60)

        page.fill("#where", f"uid = '{image['uid']}'")
        page.click("#run")
        page.wait_for_function(f"() => document.querySelectorAll('#grid .card').length === 1 && "
                               f"document.querySelector('#grid .card').dataset.uid === '{image['uid']}'")
        card_text = page.text_content("#grid .card")
        assert image["text"] in card_text and f"clip_score {image['clip_score']:.3f}" in card_text
        assert not image["caption"] or f"re-caption: {image['caption']}" in card_text
        assert not image["ocr_text"] or f"OCR: {image['ocr_text']}" in card_text
        page.click("#grid .card")
        page.wait_for_selector("#detail:not([hidden])")
        assert page.text_content("#columns tr[data-column='uid'] td") == image["uid"]
        assert page.text_content("#columns tr[data-column='text'] td") == image["text"]
        assert page.locator("#columns tbody tr").count() >= len(image)
        page.wait_for_function("() => document.querySelector('#detail-media img').naturalWidth > 0")
        page.click("#close")

        page.fill("#where", "kind = 'interleaved'")
        page.click("#run")
        page.wait_for_selector(f"#grid .card[data-uid='{doc['uid']}']")
        page.click(f"#grid .card[data-uid='{doc['uid']}']")
        page.wait_for_function(f"() => document.querySelector('#detail-title').textContent.startsWith('{doc['uid']}')")
        srcs = page.eval_on_selector_all("#detail-media img", "els => els.map(e => e.getAttribute('src'))")
        assert srcs == [f"/media/{doc['uid']}/{m}" for m in as_list(doc["media"])]
        page.wait_for_function("() => [...document.querySelectorAll('#detail-media img')].every(i => i.complete && i.naturalWidth > 0)")
        texts = page.eval_on_selector_all("#detail-media .doc-text", "els => els.map(e => e.textContent)")
        items = json.loads(doc["doc"]) if isinstance(doc["doc"], str) else doc["doc"]
        assert texts == [it["text"] for it in items["items"] if it.get("type") == "text" and (it.get("text") or "").strip()]
        page.click("#close")

        page.select_option("#view", "samples")
        page.fill("#where", f"uid = '{video['uid']}'")
        page.click("#run")
        page.wait_for_function(f"() => document.querySelector('#grid .card')?.dataset.uid === '{video['uid']}'")
        page.click("#grid .card")
        page.wait_for_selector("#detail-media video")
        page.wait_for_function("() => (v => v.readyState >= 1 || v.error)(document.querySelector('#detail-media video'))")
        state = page.eval_on_selector("#detail-media video", "v => ({ready: v.readyState, error: v.error && v.error.code, "
                                      "duration: v.duration, controls: v.controls})")
        assert state["error"] is None and state["ready"] >= 1 and state["controls"]
        assert math.isclose(state["duration"], video["duration"], rel_tol=0.2)
        page.click("#close")

        page.select_option("#view", "ledger")
        page.fill("#where", "status = 'dropped'")
        page.click("#run")
        page.wait_for_selector("#grid .card .status-dropped")

        page.fill("#where", "1=1) UNION SELECT * FROM ledger WHERE (1=1")
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert "refused" in page.text_content("#error") or "unbalanced" in page.text_content("#error")
        assert page.locator("#grid .card").count() == 0
        # the one error the page may log is the 400 of that refused filter, which it shows
        errors = [e for e in page.console_errors if "400" not in e]
        assert errors == []
