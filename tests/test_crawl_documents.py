"""Document formats for `curate crawl --kind interleaved`: MMC4 and OBELICS records as
published, read into the internal form (image placement, kept metadata), crawled end
to end from 127.0.0.1 into raw shards whose json carries source_meta, and hostile
records turned into one dropped ledger row each."""

import json
import tarfile

import duckdb
import pandas as pd
import pytest

from curation.crawl.documents import (MAX_DOCUMENT_IMAGES, MAX_DOCUMENT_ITEMS, MAX_META_VALUE_CHARS,
                                      parse_document, read_documents)
from curation.crawl.media import crawl_media
from curation.crawl.optout import SIGNAL_PATHS
from curation.rawshards import read_shard

from .servers import hostile_server, jpeg_bytes

LOOPBACK = ("127.0.0.1/32",)


def mmc4_record(base="http://images.example", doc="http://blog.example/post-1.html"):
    """An MMC4 document as published: images assigned to sentences by index, listed in
    no particular sentence order; two share sentence 1."""
    return {
        "image_info": [
            {"face_detections": None, "image_name": "a1b2c3d4e5f6.jpg", "matched_sim": 0.281,
             "matched_text_index": 1, "raw_url": f"{base}/img/11.jpg"},
            {"face_detections": None, "image_name": "0f9e8d7c6b5a.jpg", "matched_sim": 0.305,
             "matched_text_index": 0, "raw_url": f"{base}/img/12.jpg"},
            {"face_detections": None, "image_name": "112233445566.jpg", "matched_sim": 0.219,
             "matched_text_index": 1, "raw_url": f"{base}/img/13.jpg"},
        ],
        "similarity_matrix": [[0.20, 0.281, 0.19], [0.305, 0.22, 0.18], [0.17, 0.219, 0.16]],
        "text_list": ["The kettle sits on the stove.", "Steam rises from its spout.", "Tea is ready soon."],
        "url": doc,
        "could_have_url_duplicate": 0,
    }


def obelics_record(base="http://images.example"):
    """An OBELICS row as published: parallel lists, metadata and general_metadata as JSON strings."""
    texts = ["A harbour at dawn.", None, "Boats leave before the sun is up.", None]
    images = [None, f"{base}/img/21.jpg", None, f"{base}/img/22.jpg"]
    image_meta = lambda n, alt: {  # noqa: E731
        "document_url": "https://news.example/harbour", "unformatted_src": f"/media/{n}.jpg",
        "src": f"{base}/img/{n}.jpg", "formatted_filename": f"{n}", "alt_text": alt,
        "rendered_width": 640, "rendered_height": 480, "original_width": 1280, "original_height": 960, "format": "jpeg"}
    metadata = [None, image_meta(21, "harbour"), None, image_meta(22, "")]
    general = {"url": "https://news.example/harbour", "warc_filename": "crawl-data/CC-MAIN-2023-06/x.warc.gz",
               "warc_record_offset": 1234, "warc_record_length": 5678}
    return {"images": images, "metadata": json.dumps(metadata), "general_metadata": json.dumps(general),
            "texts": texts}


def test_mmc4_images_follow_their_sentence_in_a_stable_order():
    doc = parse_document(mmc4_record())
    shape = [it["text"] if it["type"] == "text" else it["url"].rsplit("/", 1)[1] for it in doc.items]
    assert shape == ["The kettle sits on the stove.", "12.jpg", "Steam rises from its spout.", "11.jpg", "13.jpg",
                     "Tea is ready soon."]
    assert doc.format == "mmc4" and doc.url == "http://blog.example/post-1.html"
    meta = doc.source_meta
    assert meta["format"] == "mmc4" and meta["doc_url"] == doc.url and meta["could_have_url_duplicate"] == 0
    assert "similarity_matrix" not in meta and "text_list" not in meta
    # per image, in document order, with where it came from in image_info
    assert [(m["raw_url"].rsplit("/", 1)[1], m["matched_text_index"], m["matched_sim"], m["source_index"])
            for m in meta["images"]] == [("12.jpg", 0, 0.305, 1), ("11.jpg", 1, 0.281, 0), ("13.jpg", 1, 0.219, 2)]
    assert meta["images"][0]["image_name"] == "0f9e8d7c6b5a.jpg" and meta["images"][0]["face_detections"] is None
    assert "omitted" not in meta


def test_obelics_keeps_document_url_and_image_metadata():
    doc = parse_document(obelics_record())
    assert [(it["type"], it.get("text") or it["url"].rsplit("/", 1)[1]) for it in doc.items] == [
        ("text", "A harbour at dawn."), ("image", "21.jpg"), ("text", "Boats leave before the sun is up."),
        ("image", "22.jpg")]
    assert doc.format == "obelics" and doc.url == "https://news.example/harbour"
    meta = doc.source_meta
    assert meta["doc_url"] == "https://news.example/harbour"
    assert meta["general_metadata"]["warc_record_offset"] == 1234
    assert [(m["alt_text"], m["original_width"], m["source_index"]) for m in meta["images"]] == [
        ("harbour", 1280, 1), ("", 1280, 3)]
    assert meta["images"][0]["src"] == doc.items[1]["url"]


def test_parquet_and_jsonl_give_the_same_documents(tmp_path):
    """Parquet hands nested lists back as numpy arrays: the same document either way."""
    records = [mmc4_record(), {**mmc4_record(doc="http://blog.example/2"), "could_have_url_duplicate": 1}]
    with open(tmp_path / "mmc4.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pd.DataFrame(records).to_parquet(tmp_path / "mmc4.parquet")
    obelics = [obelics_record()]
    with open(tmp_path / "obelics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in obelics)
    pd.DataFrame(obelics).to_parquet(tmp_path / "obelics.parquet")
    for stem in ("mmc4", "obelics"):
        from_jsonl = read_documents(tmp_path / f"{stem}.jsonl", source=stem)
        from_parquet = read_documents(tmp_path / f"{stem}.parquet", source=stem)
        assert from_jsonl["problem"].isna().all(), from_jsonl["problem"].tolist()
        cols = ["uid", "url", "caption", "doc", "meta"]
        assert from_parquet[cols].equals(from_jsonl[cols])
    assert json.loads(from_jsonl.loc[0, "meta"])["images"][1]["src"].endswith("/img/22.jpg")


def _hostile_records():
    """(record, reason, what the error must say)."""
    mmc4 = mmc4_record()
    with_info = lambda **change: {**mmc4, "image_info": [{**mmc4["image_info"][0], **change}]}  # noqa: E731
    obelics = obelics_record()
    return [
        ({**mmc4, "text_list": "one long string"}, "bad_document", "'text_list' is a str, not a list"),
        ({**mmc4, "text_list": ["fine", 5]}, "bad_document", "text_list[1] is a int, not a string"),
        ({**mmc4, "image_info": {"raw_url": "http://x.example/a.jpg"}}, "bad_document", "'image_info' is a dict"),
        ({**mmc4, "image_info": ["http://x.example/a.jpg"]}, "bad_document", "image_info[0] is a str, not an object"),
        (with_info(matched_text_index=3), "bad_document", "matched_text_index 3 is outside text_list (3 sentences)"),
        (with_info(matched_text_index=-1), "bad_document", "matched_text_index -1 is outside"),
        (with_info(matched_text_index="1"), "bad_document", "matched_text_index is a str, not an integer"),
        (with_info(matched_text_index=1.0), "bad_document", "matched_text_index is a float, not an integer"),
        (with_info(matched_text_index=True), "bad_document", "matched_text_index is a bool, not an integer"),
        (with_info(matched_text_index=None), "bad_document", "matched_text_index is a NoneType"),
        ({**mmc4, "text_list": []}, "bad_document", "matched_text_index 1 is outside text_list (0 sentences)"),
        ({**mmc4, "text_list": ["s"] * (MAX_DOCUMENT_ITEMS + 1)}, "document_too_large",
         f"'text_list' has {MAX_DOCUMENT_ITEMS + 1} sentences (at most {MAX_DOCUMENT_ITEMS})"),
        ({**mmc4, "image_info": [mmc4["image_info"][0]] * (MAX_DOCUMENT_IMAGES + 1)}, "document_too_large",
         f"'image_info' has {MAX_DOCUMENT_IMAGES + 1} images"),
        ({**mmc4, "text_list": ["a", "x" * 900_000, "b"]}, "document_too_large", "bytes of JSON"),
        ({**obelics, "metadata": "[not json"}, "bad_document", "'metadata' is not valid JSON"),
        ({**obelics, "metadata": json.dumps([None, {}])}, "bad_document", "'metadata' has 2 entries, 'texts' 4"),
        ({**obelics, "metadata": json.dumps([None, "alt text", None, None])}, "bad_document",
         "metadata[1] is a str, not an object"),
        ({**obelics, "general_metadata": json.dumps(["https://news.example"])}, "bad_document",
         "'general_metadata' is a JSON list, not an object"),
        ({**obelics, "texts": [None] * 300, "images": ["http://x.example/a.jpg"] * 300, "metadata": None},
         "document_too_large", f"300 images (at most {MAX_DOCUMENT_IMAGES})"),
        ({"url": "http://blog.example/none", "could_have_url_duplicate": 0}, "bad_document", "a document needs"),
    ]


def test_hostile_documents_become_one_dropped_ledger_row_each(tmp_path):
    cases = _hostile_records()
    path = tmp_path / "hostile.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec, _, _ in cases)
    ledger = crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
    assert len(ledger) == len(cases) and ledger["uid"].is_unique
    for (rec, reason, says), row in zip(cases, ledger.itertuples()):
        assert (row.status, row.reason) == ("dropped", reason), (rec, row.error)
        assert says in row.error, (says, row.error)
    assert ledger.loc[0, "url"] == "http://blog.example/post-1.html"  # the document's url, even when refused
    assert not list((tmp_path / "raw").glob("interleaved-r*.tar"))  # nothing was fetched


def test_oversized_or_odd_metadata_fields_are_left_out_not_fatal():
    rec = mmc4_record()
    deep: list = []
    for _ in range(40):
        deep = [deep]
    rec["image_info"][0] = {**rec["image_info"][0], "face_detections": [[0.5] * 4] * 2000, "nested": deep,
                            "matched_sim": float("nan")}
    rec["extra_blob"] = "y" * (MAX_META_VALUE_CHARS + 1)
    doc = parse_document(rec)
    meta = doc.source_meta
    img = next(m for m in meta["images"] if m["source_index"] == 0)
    assert "face_detections" not in img and "nested" not in img and img["matched_sim"] is None
    assert set(meta["omitted"]) == {"images[1].face_detections", "images[1].nested", "extra_blob"}
    json.dumps(meta, allow_nan=False)  # strict JSON: DuckDB reads it


def test_mmc4_crawl_end_to_end(tmp_path):
    """Three MMC4 documents from 127.0.0.1: members in document order, source_meta in the
    raw json, read back by curation's shard reader and queryable with DuckDB."""
    with hostile_server() as base:
        kept = mmc4_record(base, doc=f"{base}/docs/kettle.html")
        second = {"text_list": ["Only one picture here.", "And a closing line."], "url": f"{base}/docs/two.html",
                  "image_info": [{"raw_url": f"{base}/img/14.jpg", "image_name": "x.jpg", "matched_text_index": 1,
                                  "matched_sim": 0.3, "face_detections": None}]}
        lost = {**mmc4_record(base, doc=f"{base}/docs/lost.html")}
        lost["image_info"] = [*lost["image_info"][:1], {**lost["image_info"][1], "raw_url": f"{base}/missing.jpg"}]
        path = tmp_path / "mmc4.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in (kept, second, lost))
        ledger = crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0, threads=2)
    assert list(zip(ledger["status"], ledger["reason"])) == [("kept", None), ("kept", None),
                                                             ("dropped", "missing_images")]
    assert ledger["url"].tolist() == [f"{base}/docs/kettle.html", f"{base}/docs/two.html", f"{base}/docs/lost.html"]
    (tar_path,) = sorted((tmp_path / "raw").glob("interleaved-r*.tar"))
    with tarfile.open(tar_path) as tar:
        names = [m.name for m in tar]
        first_key = names[0].split(".")[0]
        raw = json.loads(tar.extractfile(f"{first_key}.json").read())
        image_bytes = [tar.extractfile(f"{first_key}.{n}.jpg").read() for n in range(3)]
    assert names[:5] == [f"{first_key}.{m}" for m in ("0.jpg", "1.jpg", "2.jpg", "txt", "json")]
    # members follow the document: image 12 (sentence 0), then 11 and 13 (sentence 1)
    assert image_bytes == [jpeg_bytes(12), jpeg_bytes(11), jpeg_bytes(13)]
    assert [(it["type"], it.get("member")) for it in raw["items"]] == [
        ("text", None), ("image", "0.jpg"), ("text", None), ("image", "1.jpg"), ("image", "2.jpg"), ("text", None)]
    source_meta = json.loads(raw["meta"])
    assert [m["raw_url"] for m in source_meta["images"]] == [it["url"] for it in raw["items"] if it["type"] == "image"]
    assert raw["url"] == source_meta["doc_url"] == f"{base}/docs/kettle.html"

    rows = [row for row, _ in read_shard(tar_path, "mmc4")]
    assert [r["status"] for r in rows] == ["kept", "kept"] and [r["url"] for r in rows] == ledger["url"][:2].tolist()
    # DuckDB reads `sidecar` by name, as curate query reads the sidecars' source_meta
    sidecar = pd.DataFrame({"uid": [r["uid"] for r in rows],  # noqa: F841
                            "source_meta": [r["source_meta"] for r in rows]})
    found = duckdb.sql("""SELECT json_extract_string(source_meta, '$.doc_url') AS doc_url,
                                 CAST(json_extract(source_meta, '$.images[1].matched_sim') AS DOUBLE) AS sim,
                                 CAST(json_extract(source_meta, '$.images[1].matched_text_index') AS INT) AS sentence,
                                 json_array_length(source_meta, '$.images') AS n
                          FROM sidecar ORDER BY uid""").df()
    by_url = found.set_index("doc_url")
    assert by_url.loc[f"{base}/docs/kettle.html", "sim"] == pytest.approx(0.281)
    assert by_url.loc[f"{base}/docs/kettle.html", "sentence"] == 1 and by_url.loc[f"{base}/docs/kettle.html", "n"] == 3
    assert by_url.loc[f"{base}/docs/two.html", "n"] == 1


def test_document_over_the_sample_cap_stops_fetching(tmp_path, monkeypatch):
    """Curation reads at most max_sample_bytes of one raw sample: the crawl stops fetching
    a document's images once they are over it, and drops the document."""
    from curation.crawl import media
    from curation.rawshards import ReadCaps

    from .servers import Hostile

    monkeypatch.setattr(media, "SAMPLE_CAPS", ReadCaps(max_sample_bytes=len(jpeg_bytes(11)) + len(jpeg_bytes(12)) // 2))
    with hostile_server() as base:
        path = tmp_path / "mmc4.jsonl"
        path.write_text(json.dumps(mmc4_record(base)) + "\n")
        ledger = crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
        # the host's opt-out files (robots.txt, tdmrep.json, ai.txt) are asked once each too
        hits = {path: n for path, n in Hostile.hits.items() if path not in SIGNAL_PATHS.values()}
    assert (ledger.loc[0, "status"], ledger.loc[0, "reason"]) == ("dropped", "document_too_large")
    assert "after 2 of 3" in ledger.loc[0, "error"]
    assert hits == {"/img/12.jpg": 1, "/img/11.jpg": 1}  # document order; image 13 never requested
