"""Typed metadata: the contract's list, struct, map and JSON columns become real Arrow
types in sidecars and ledgers, plain DuckDB reads them without json_extract, and the
crawl ledger has fetched_at / http_status."""

import datetime
import io
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import schemas
from curation.crawl.fetch import FetchPolicy, decode_error, encode_outcome, fetch
from curation.crawl.image_text import _classify
from curation.tiers.routing import check_rules, route
from curation.tiers.writer import tier_media, write_shard
from curation.config import TierRule
from curation.errors import ConfigError

from .servers import hostile_server

LOOPBACK = ("127.0.0.1/32",)
SPAN = pa.struct([("start", pa.float64()), ("end", pa.float64())])


def test_each_typed_column_gets_its_arrow_type():
    side = schemas.arrow_schema("sidecar")
    assert side.field("op_versions").type == pa.map_(pa.string(), pa.string())
    assert side.field("source_meta").type == pa.json_(pa.string())
    assert side.field("media").type == pa.list_(pa.string())
    assert side.field("missing_images").type == pa.list_(pa.string())
    assert side.field("frame_times").type == pa.list_(pa.float64())
    assert side.field("scenes").type == pa.list_(SPAN)
    assert side.field("scene_captions").type == pa.list_(pa.struct(
        [("start", pa.float64()), ("end", pa.float64()), ("time", pa.float64()), ("caption", pa.string())]))
    assert side.field("ocr_boxes").type == pa.list_(pa.struct(
        [("box", pa.list_(pa.list_(pa.float64()))), ("text", pa.string()), ("score", pa.float64())]))
    item = pa.struct([("type", pa.string()), ("text", pa.string()), ("url", pa.string()), ("member", pa.string())])
    assert side.field("doc").type == pa.struct([("doc_id", pa.string()), ("items", pa.list_(item))])
    assert side.field("concepts").type == pa.list_(pa.string())
    ledger = schemas.arrow_schema("ledger")
    assert ledger.field("fetched_at").type == pa.timestamp("us", tz="UTC")
    assert ledger.field("http_status").type == pa.int32()
    # every other column is still a flat scalar
    flat = [f for f in side if f.name not in ("op_versions", "source_meta", "media", "missing_images", "frame_times",
                                               "scenes", "scene_captions", "ocr_boxes", "doc", "concepts")]
    assert all(not pa.types.is_nested(f.type) and not isinstance(f.type, pa.ExtensionType) for f in flat)


def test_values_read_back_from_arrow_or_pandas_are_plain_again():
    t = schemas.arrow_schema("sidecar").field("scenes").type
    table = pa.table({"scenes": pa.array([[{"start": 0.0, "end": 1.5}], None], t)})
    frame = schemas.plain_columns(table.to_pandas())
    assert frame["scenes"].tolist() == [[{"start": 0.0, "end": 1.5}], None]
    m = schemas.arrow_schema("sidecar").field("op_versions").type
    assert schemas.py_value([("ocr", "1")], m) == {"ocr": "1"}  # Arrow's to_pylist of a map
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert schemas.py_value(stamp, pa.timestamp("us", tz="UTC")) == "2026-01-02T03:04:05+00:00"


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, "JPEG")
    return buf.getvalue()


def _row(uid: str, kind: str, names: list[str], **extra) -> dict:
    return {"uid": uid, "key": uid, "kind": kind, "source": "test", "status": "kept", "tier": "t", "shard": "t-000000.tar",
            "sha256": "0" * 64, "width": 6, "height": 4, "pipeline": "p", "config_hash": "0123456789abcdef",
            "op_versions": {"decode_image": "1", "ocr": "2"}, "media": names, **extra}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("typed")
    raw = [
        (_row("00000000000000a1", "image_text", ["png"], source_meta='{"license": "cc-by", "similarity": 0.31}',
              ocr_boxes=[{"box": [[0, 0], [5, 0], [5, 3], [0, 3]], "text": "EXIT", "score": 0.98}]),
         {"png": _png("red")}),
        (_row("00000000000000a2", "image_text", ["jpg"], source_meta='{"license": "cc0"}'), {"jpg": _jpeg("blue")}),
        (_row("00000000000000d1", "interleaved", ["a.jpg", "b.png"], missing_images=["http://x/gone.jpg"],
              doc={"doc_id": "7", "items": [{"type": "text", "text": "Intro."}, {"type": "image", "member": "a.jpg"},
                                            {"type": "image", "url": "http://x/gone.jpg", "member": None},
                                            {"type": "image", "member": "b.png"}]}),
         {"a.jpg": _jpeg("green"), "b.png": _png("white")}),
    ]
    rows, media = [], []
    for row, files in raw:
        media.append(tier_media(row, files))
        rows.append(row)
    write_shard(tmp / "t-000000.tar", rows, media)
    return tmp / "t-000000.parquet"


def test_the_written_sidecar_has_the_contract_types(sidecar):
    assert pq.read_schema(sidecar).remove_metadata() == schemas.arrow_schema("sidecar").remove_metadata()
    assert "binary field_id=-1 source_meta (JSON);" in str(pq.ParquetFile(sidecar).schema)  # Parquet's JSON logical type


def test_duckdb_reads_lists_structs_maps_and_json_without_casts(sidecar):
    con = duckdb.connect()
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{sidecar}')")
    q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
    assert q("SELECT typeof(source_meta), typeof(media), typeof(op_versions) FROM samples LIMIT 1") == [
        ("JSON", "VARCHAR[]", "MAP(VARCHAR, VARCHAR)")]
    assert q("SELECT uid FROM samples WHERE list_contains(media, 'png') ORDER BY uid") == [("00000000000000a1",)]
    assert q("SELECT source_meta->>'license' FROM samples WHERE kind = 'image_text' ORDER BY uid") == [("cc-by",), ("cc0",)]
    assert q("SELECT op_versions['ocr'] FROM samples LIMIT 1") == [("2",)]
    # the document's items in order; its members were renamed to the tier's 0.jpg, 1.png
    assert q("SELECT media, doc.doc_id, [i.member FOR i IN doc.items IF i.type = 'image'], missing_images[1] "
             "FROM samples WHERE kind = 'interleaved'") == [(["0.jpg", "1.png"], "7", ["0.jpg", None, "1.png"],
                                                             "http://x/gone.jpg")]
    assert q("SELECT ocr_boxes[1].text, ocr_boxes[1].box[3][1] FROM samples WHERE ocr_boxes IS NOT NULL") == [("EXIT", 5.0)]


def test_the_tar_json_holds_the_same_typed_values(sidecar):
    import tarfile

    with tarfile.open(sidecar.with_suffix(".tar")) as tar:
        meta = json.loads(tar.extractfile("00000000000000d1.json").read())
    assert meta["media"] == ["0.jpg", "1.png"] and meta["op_versions"] == {"decode_image": "1", "ocr": "2"}
    assert meta["doc"]["items"][1] == {"type": "image", "text": None, "url": None, "member": "0.jpg"}


def test_tier_predicates_see_typed_columns():
    import pandas as pd

    columns = {"uid", "kind", "media", "source_meta", "scenes"}
    rules = (TierRule("pngs", "list_contains(media, 'png')"), TierRule("open", "source_meta->>'license' = 'cc0'"),
             TierRule("long", "len(scenes) > 1"), TierRule("rest", "true"))
    check_rules(rules, columns)
    with pytest.raises(ConfigError, match="bad 'where'"):  # a list is not a string
        check_rules((TierRule("bad", "media LIKE '%png%'"),), columns)
    frame = pd.DataFrame({"uid": ["a", "b", "c", "d"], "kind": ["image_text"] * 3 + ["video"],
                          "media": [["png"], ["jpg"], ["jpg"], ["mp4"]],
                          "source_meta": [None, '{"license": "cc0"}', None, None],
                          "scenes": [None, None, None, [{"start": 0.0, "end": 1.0}, {"start": 1.0, "end": 2.0}]]})
    assert route(frame, rules).tolist() == ["pngs", "open", "rest", "long"]


def test_fetch_records_the_http_status_and_time():
    before = datetime.datetime.now(datetime.timezone.utc)
    with hostile_server() as base:
        policy = FetchPolicy(allowed_networks=LOOPBACK, retries=0)
        ok, missing = fetch(f"{base}/img/1.jpg", "image", policy), fetch(f"{base}/missing.jpg", "image", policy)
        refused = fetch("http://10.255.255.1/x.jpg", "image", FetchPolicy(retries=0))
    assert (ok.status, ok.http_status) == ("kept", 200) and (missing.reason, missing.http_status) == ("http_error", 404)
    assert refused.http_status is None and refused.reason == "private_address"
    assert before <= ok.fetched_at <= missing.fetched_at <= datetime.datetime.now(datetime.timezone.utc)
    # image_text: our fetch's outcome travels through img2dataset's error_message
    fields = _classify("failed_to_download", encode_outcome(missing))
    assert fields["http_status"] == 404 and fields["fetched_at"] == missing.fetched_at.isoformat()
    assert decode_error(encode_outcome(refused))["http_status"] is None
    assert _classify("success", None)["http_status"] == 200


def test_crawl_ledger_has_fetched_at_and_http_status(tmp_path):
    from curation.crawl.media import crawl_media

    docs = [{"doc_id": "ok", "items": [{"type": "image", "url": "BASE/img/1.jpg"}]},
            {"doc_id": "lost", "items": [{"type": "image", "url": "BASE/missing.jpg"}]},
            {"doc_id": "bad", "items": [{"type": "image", "url": "ftp://nowhere/x.jpg"}]}]
    before = datetime.datetime.now(datetime.timezone.utc)
    with hostile_server() as base:
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(d).replace("BASE", base) + "\n" for d in docs))
        crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
    ledger = pq.read_table(tmp_path / "raw" / "crawl_ledger-interleaved.parquet")
    assert ledger.schema.field("fetched_at").type == pa.timestamp("us", tz="UTC")
    assert ledger.schema.field("http_status").type == pa.int32()
    rows = ledger.to_pylist()
    assert [(r["status"], r["http_status"]) for r in rows] == [("kept", 200), ("dropped", 404), ("dropped", None)]
    assert all(before <= r["fetched_at"] <= datetime.datetime.now(datetime.timezone.utc) for r in rows[:2])
    assert rows[2]["fetched_at"] is None  # no request was made
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path / 'raw' / 'crawl_ledger-interleaved.parquet'}') "
                       "WHERE http_status = 404").fetchall() == [(1,)]


def test_verify_names_a_sidecar_column_of_another_type(sidecar):
    from curation.tiers.verify import sidecar_type_problems

    assert sidecar_type_problems(pq.read_schema(sidecar)) == []
    old = pa.schema([("uid", pa.string()), ("media", pa.string()), ("my_score", pa.float64())])  # JSON text, as before
    assert sidecar_type_problems(old) == ["sidecar column media is string, the contract says list<item: string>"]


def test_a_crawl_listing_written_before_these_columns_reads_them_as_null(tmp_path):
    import pandas as pd

    from curation.crawl.media import read_media_shard
    from curation.crawl.rounds import latest_outcomes

    (tmp_path / "_rounds" / "interleaved" / "r000").mkdir(parents=True)
    (tmp_path / "_rounds" / "interleaved" / "r000" / "_DONE").write_text("")
    pd.DataFrame({"uid": ["a"], "raw_key": ["0000000000"], "status": ["kept"], "reason": [None], "error": [None],
                  "transient": [False]}).to_parquet(tmp_path / "interleaved-r000-00000.parquet")
    latest = latest_outcomes(tmp_path, "interleaved", read_media_shard)
    assert latest[["http_status", "fetched_at"]].isna().all().all() and latest["status"].tolist() == ["kept"]
