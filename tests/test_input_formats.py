"""`curate run --input` beyond WebDataset tars (curation/sources.py): Hugging Face parquet
(struct, binary and list-of-image columns, found or named), a `datasets` save_to_disk
folder, a plain folder of media with sidecars; corrupt files; s3; one run end to end."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import sources
from curation.errors import InputError
from curation.inputs import InputOptions, as_shard, resolve_input
from curation.rawshards import ReadCaps, count_samples, read_shard

from .conftest import curate
from .rawgen import jpeg, write_recipe
from .test_inputs import upload, video

SRC = "src"
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(rng, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def hf_parquet(path: Path, columns: dict, features: dict | None, row_group_size: int | None = None) -> Path:
    """A parquet file as `datasets` writes one: its features in the schema's metadata."""
    table = pa.table(columns)
    if features is not None:
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def rows_of(ref, caps=ReadCaps()) -> list[tuple[dict, dict]]:
    out = list(read_shard(ref, SRC, caps))
    assert count_samples(ref, caps) == len(out)  # what the ledger accounts for
    return out


def meta(row) -> dict:
    return json.loads(row["source_meta"]) if row["source_meta"] else {}


def as_list(value) -> list:  # media/doc columns: JSON text or typed, as the sidecar schema has them
    return json.loads(value) if isinstance(value, str) else list(value)


# ----------------------------------------------------------------------------- parquet
def test_hf_parquet_folder_struct_images_text_url_and_producer_columns(tmp_path):
    rng = np.random.default_rng(1)
    images = [jpeg(rng, 40, 30), png(rng, 20, 20), None, jpeg(rng, 30, 30), jpeg(rng, 30, 40)]
    feats = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    for part in range(2):
        hf_parquet(tmp_path / "hub" / "data" / f"train-0000{part}-of-00002.parquet", {
            "image": pa.array([{"bytes": b, "path": None if b else "/etc/passwd"} for b in images], STRUCT),
            "caption": [f"picture {part}-{i}" for i in range(5)],
            "url": [f"http://x.invalid/{part}/{i}.jpg" for i in range(5)],
            "license": ["cc0", "cc-by", "cc0", None, "cc0"],
            "similarity": [0.3, float("nan"), 0.1, 0.2, 0.4],
            "thumb": [b"\x00\x01"] * 5,                  # bytes: never in source_meta
            "notes": ["x" * 40_000] + ["short"] * 4,     # over MAX_META_VALUE_BYTES: left out
            "kind": ["photo"] * 5,                       # named like our field: stays the producer's
        }, feats, row_group_size=2)
    (tmp_path / "hub" / "README.md").write_text("a dataset card")

    raw = resolve_input(tmp_path / "hub")
    assert raw.options.format == "parquet" and raw.source == "hub"
    assert [s.name for s in raw.shards] == ["data%2Ftrain-00000-of-00002.parquet", "data%2Ftrain-00001-of-00002.parquet"]
    rows = rows_of(raw.shards[1])
    assert [r["raw_key"] for r, _ in rows] == [f"{i:09d}" for i in range(5)]
    assert [(r["status"], r["reason"], r["kind"]) for r, _ in rows] == [
        ("kept", None, "image_text"), ("kept", None, "image_text"), ("failed", "image_not_embedded", "image_text"),
        ("kept", None, "image_text"), ("kept", None, "image_text")]
    (r0, f0), (r1, f1) = rows[0], rows[1]
    assert f0["jpg"] == images[0] and f1["png"] == images[1]  # named by the bytes, kept as they are
    assert r0["text"] == "picture 1-0" and r0["url"] == "http://x.invalid/1/0.jpg" and r0["source"] == SRC
    assert meta(r0) == {"license": "cc0", "similarity": 0.3, "kind": "photo"}  # no thumb, no 40 kB notes
    assert meta(r1) == {"license": "cc-by", "notes": "short", "kind": "photo"}  # NaN is no value
    failed = rows[2][0]
    assert failed["url"] == "http://x.invalid/1/2.jpg" and "/etc/passwd" in failed["error"]  # named, never opened
    assert len({r["uid"] for s in raw.shards for r, _ in rows_of(s)}) == 10

    # the same folder with a tar in it is a WebDataset input: its parquet are listings
    tar = tmp_path / "hub" / "extra.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("k.jpg")
        info.size = len(images[0])
        t.addfile(info, io.BytesIO(images[0]))
    assert [(s.name, s.format) for s in resolve_input(tmp_path / "hub").shards] == [("extra.tar", "tar")]
    forced = resolve_input(tmp_path / "hub", InputOptions(format="parquet"))
    assert [s.format for s in forced.shards] == ["parquet", "parquet"]
    # a glob or one file of them
    assert len(resolve_input(f"{tmp_path}/hub/data/*.parquet").shards) == 2
    (one,) = resolve_input(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet").shards
    assert one.format == "parquet" and one.name == "train-00000-of-00002.parquet"


def test_binary_columns_named_by_options(tmp_path):
    rng = np.random.default_rng(2)
    hf_parquet(tmp_path / "p" / "shard.parquet", {
        "pixels": [jpeg(rng, 30, 20), jpeg(rng, 20, 30)], "preview": [png(rng, 8, 8)] * 2,
        "words": ["a cat on a mat", "a dog"], "link": ["http://a.invalid/1", "http://a.invalid/2"], "n": [1, 2]}, None)
    with pytest.raises(InputError, match="no image or video column found.*--image-column"):
        resolve_input(tmp_path / "p")  # two binary columns, neither named like an image
    opts = InputOptions(image_column="pixels", text_column="words", url_column="link")
    raw = resolve_input(tmp_path / "p", opts)
    assert raw.options == InputOptions(format="parquet", image_column="pixels", text_column="words", url_column="link")
    (shard,) = raw.shards
    assert shard.image_column == "pixels" and shard.text_column == "words"  # travels to the Ray tasks
    rows = rows_of(shard)
    assert [(r["text"], r["url"], sorted(f)) for r, f in rows] == [
        ("a cat on a mat", "http://a.invalid/1", ["jpg", "json", "txt"]), ("a dog", "http://a.invalid/2", ["jpg", "json", "txt"])]
    assert meta(rows[0][0]) == {"n": 1}  # the other binary column is not metadata
    clip = video("mp4")
    hf_parquet(tmp_path / "v" / "clips.parquet", {"video": [clip, None], "caption": ["a red flash", "nothing"]}, None)
    rows = rows_of(resolve_input(tmp_path / "v").shards[0])  # found by its name; probed from the file later
    assert [(r["kind"], as_list(r["media"]), r["text"]) for r, _ in rows] == [
        ("video", ["mp4"], "a red flash"), ("image_text", [], "nothing")]
    assert rows[0][1]["mp4"] == clip and rows[0][0]["sha256"]
    with pytest.raises(InputError, match="no column 'nope'"):
        resolve_input(tmp_path / "p", InputOptions(image_column="nope"))
    with pytest.raises(InputError, match="column 'n' is int64: the text column must hold strings"):
        resolve_input(tmp_path / "p", InputOptions(image_column="pixels", text_column="n"))
    with pytest.raises(InputError, match="--image-column applies to parquet and hf-disk inputs"):
        resolve_input(tmp_path / "p", InputOptions(format="files", image_column="pixels"))


def test_a_list_of_images_is_a_document_and_caps_hold(tmp_path):
    rng = np.random.default_rng(3)
    a, b, c = jpeg(rng, 30, 20), png(rng, 20, 20), jpeg(rng, 25, 25)
    feats = {"images": {"feature": {"_type": "Image"}, "_type": "List"}, "text": {"dtype": "string", "_type": "Value"}}
    path = hf_parquet(tmp_path / "docs.parquet", {
        "images": pa.array([[{"bytes": a, "path": None}, {"bytes": b, "path": "b.png"}], [{"bytes": c, "path": None}],
                            [], [{"bytes": a, "path": None}] * 5, [{"bytes": a, "path": None}, {"bytes": None, "path": "x.jpg"}],
                            [{"bytes": a, "path": None}]], pa.list_(STRUCT)),
        "text": ["two pictures", "one", "none", "five", "one not embedded", "x" * 300]}, feats)
    (shard,) = resolve_input(path).shards
    caps = ReadCaps(max_members_per_sample=5, max_text_bytes=200)
    rows = rows_of(shard, caps)
    doc, files = rows[0]
    assert doc["kind"] == "interleaved" and as_list(doc["media"]) == ["0.jpg", "1.png"] and doc["num_images"] == 2
    assert files["0.jpg"] == a and files["1.png"] == b and doc["text"] == "two pictures"
    assert rows[1][0]["kind"] == "image_text" and as_list(rows[1][0]["media"]) == ["0.jpg"]  # one image: not a document
    assert as_list(rows[2][0]["media"]) == []  # no image: stage A fails it no_image
    assert [r["reason"] for r, _ in rows[3:]] == ["too_many_members", "image_not_embedded", "text_too_large"]


def test_corrupt_parquet_files(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    good = hf_parquet(tmp_path / "bad" / "b.parquet", {
        "image": [jpeg(rng, 20 + i, 20) for i in range(6)], "caption": [f"c{i}" for i in range(6)]}, None,
        row_group_size=3)
    raw = resolve_input(tmp_path / "bad" / "b.parquet")
    with pytest.raises(InputError, match="a.parquet is not a readable parquet file"):
        resolve_input(tmp_path / "bad")  # the first file is checked before any work
    rows = rows_of(as_shard(tmp_path / "bad" / "a.parquet"))  # a later one: one row for the file
    assert [(r["raw_key"], r["status"], r["reason"]) for r, _ in rows] == [(None, "failed", "unreadable_shard")]
    # a corrupt page in the second row group: the first group's rows are read, the
    # second's fail one by one (the footer says how many), nothing else is lost
    data = bytearray(good.read_bytes())
    col = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = col.data_page_offset
    data[start:start + 12] = b"\xff" * 12
    good.write_bytes(bytes(data))
    rows = rows_of(raw.shards[0])
    assert [(r["raw_key"], r["status"], r["reason"]) for r, _ in rows] == [
        (f"{i:09d}", "kept", None) for i in range(3)] + [(f"{i:09d}", "failed", "unreadable_rows") for i in range(3, 6)]
    assert "row group 1" in rows[3][0]["error"] and str(tmp_path) not in rows[3][0]["error"]
    assert rows_of(raw.shards[0], ReadCaps(max_rows_per_file=5))[0][0]["reason"] == "unreadable_shard"
    big_groups = rows_of(raw.shards[0], ReadCaps(max_row_group_bytes=100))
    assert [r["reason"] for r, _ in big_groups] == ["row_group_too_large"] * 6  # told by the footer, unread


# ------------------------------------------------------------------------- save_to_disk
def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    from datasets import Features, Value
    from datasets import Image as HFImage

    rng = np.random.default_rng(5)
    feats = Features({"image": HFImage(), "text": Value("string"), "score": Value("float32")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg(rng, 30, 20), "path": None} for _ in range(4)],
                                     "text": [f"caption {i}" for i in range(4)], "score": [0.5, 1.5, 2.5, 3.5]},
                                    features=feats)
    ds.save_to_disk(str(tmp_path / "one"))
    (tmp_path / "one" / "cache-0123abcd.arrow").write_bytes(b"a cache file of a map(): not the dataset")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))

    one = resolve_input(tmp_path / "one")
    assert one.options.format == "arrow" and [s.name for s in one.shards] == ["data-00000-of-00001.arrow"]
    assert one.shards[0].image_column == "image"  # from dataset_info.json's features
    rows = rows_of(one.shards[0])
    assert [(r["raw_key"], r["status"], r["kind"], r["text"], meta(r)["score"]) for r, _ in rows] == [
        (f"{i:09d}", "kept", "image_text", f"caption {i}", i + 0.5) for i in range(4)]
    assert rows[0][1]["jpg"] == ds.with_format("arrow")[0]["image"][0]["bytes"].as_py()

    both = resolve_input(tmp_path / "dict", InputOptions(format="hf-disk"))
    assert [s.name for s in both.shards] == ["test%2Fdata-00000-of-00001.arrow", "train%2Fdata-00000-of-00001.arrow"]
    assert [len(rows_of(s)) for s in both.shards] == [1, 4]
    with pytest.raises(InputError, match="not a save_to_disk folder"):
        resolve_input(tmp_path, InputOptions(format="hf-disk"))

    # an arrow stream cut short: the batches before are read, the rest is one failed row
    arrow = tmp_path / "cut" / "data-00000-of-00001.arrow"
    arrow.parent.mkdir()
    table = ds.data.table
    with pa.ipc.new_stream(arrow, table.schema) as w:
        for batch in table.to_batches(max_chunksize=1):
            w.write_batch(batch)
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) * 3 // 4])
    for name in ("state.json", "dataset_info.json"):
        (arrow.parent / name).write_bytes((tmp_path / "one" / name).read_bytes())
    (cut,) = resolve_input(arrow.parent).shards
    rows = rows_of(cut)
    assert [r["status"] for r, _ in rows[:-1]] == ["kept"] * (len(rows) - 1) and 1 <= len(rows) - 1 < 4
    assert rows[-1][0]["reason"] == "unreadable_rows" and rows[-1][0]["raw_key"] == f"{len(rows) - 1:09d}"


# ------------------------------------------------------------------------ plain folder
def test_plain_folder_of_media_with_sidecars(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "cat.jpg").write_bytes(jpeg(rng, 40, 30))
    (root / "cat.txt").write_text("a cat on a mat")
    (root / "dog.png").write_bytes(png(rng, 20, 20))
    (root / "dog.json").write_text(json.dumps({"url": "http://x.invalid/dog", "caption": "a dog", "license": "cc0"}))
    (root / "sub" / "cat.jpg").write_bytes(jpeg(rng, 30, 30))  # the same stem in another folder: another sample
    (root / "sub" / "cat.caption").write_text("another cat")
    (root / "sub" / "clip.mp4").write_bytes(video("mp4"))
    (root / "sub" / "clip.txt").write_text("a red flash")
    (root / "big.jpg").write_bytes(jpeg(rng, 40, 30) + b"\0" * 5000)
    (root / "notes.txt").write_text("no picture here: not a sample")
    (root / "_tmp").mkdir()
    (root / "_tmp" / "skip.jpg").write_bytes(jpeg(rng, 10, 10))
    (root / ".hidden.jpg").write_bytes(jpeg(rng, 10, 10))
    monkeypatch.setattr(sources, "FILES_PER_SHARD", 2)

    raw = resolve_input(root)
    assert raw.options.format == "files" and [s.name for s in raw.shards] == ["part-00000", "part-00001", "part-00002"]
    assert raw.shards[0].members == ("big.jpg", "cat.jpg", "cat.txt")
    rows = {r["raw_key"]: (r, f) for s in raw.shards for r, f in rows_of(s, ReadCaps(max_member_bytes=4000))}
    assert sorted(rows) == ["big", "cat", "dog", "sub/cat", "sub/clip"]
    assert rows["big"][0]["reason"] == "member_too_large"
    cat, files = rows["cat"]
    assert (cat["kind"], cat["text"], sorted(files)) == ("image_text", "a cat on a mat", ["jpg", "txt"])
    dog = rows["dog"][0]
    assert (dog["text"], dog["url"], meta(dog)) == ("a dog", "http://x.invalid/dog", {"license": "cc0"})
    assert rows["sub/cat"][0]["text"] == "another cat" and rows["sub/cat"][0]["uid"] != cat["uid"]
    clip = rows["sub/clip"][0]
    assert clip["kind"] == "video" and clip["status"] == "kept" and as_list(clip["media"]) == ["mp4"]

    (root / "dog.png").unlink()  # gone since the listing: that sample fails, the count holds
    (after,) = [r for s in raw.shards for r, _ in rows_of(s) if r["raw_key"] == "dog"]
    assert after["reason"] == "unreadable_member" and str(tmp_path) not in after["error"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("captions without pictures")
    with pytest.raises(InputError, match="no images or videos under"):
        resolve_input(tmp_path / "empty", InputOptions(format="files"))


# ---------------------------------------------------------------------------------- s3
def test_hf_parquet_on_s3_reads_as_local(tmp_path, s3):  # s3: the moto server (conftest)
    filesystem, _ = s3
    rng = np.random.default_rng(8)
    feats = {"image": {"_type": "Image"}}
    hf_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", {
        "image": pa.array([{"bytes": jpeg(rng, 20, 20), "path": None} for _ in range(3)], STRUCT),
        "caption": ["one", "two", "three"], "license": ["cc0"] * 3}, feats)
    upload(filesystem, tmp_path / "hub", "bkt/hub")
    remote, local = resolve_input("s3://bkt/hub/"), resolve_input(tmp_path / "hub")
    assert remote.options.format == "parquet" and [s.name for s in remote.shards] == [s.name for s in local.shards]
    got = [(r["uid"], r["text"], r["source_meta"], f) for r, f in rows_of(remote.shards[0])]
    assert got == [(r["uid"], r["text"], r["source_meta"], f) for r, f in rows_of(local.shards[0])]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_curate_run_over_hf_parquet(tmp_path):
    """One run: Ray tasks read the parquet rows; tiers are written; the ledger holds every
    row once, a path-only image included."""
    rng = np.random.default_rng(9)
    n = 12
    images = [{"bytes": jpeg(rng, int(rng.integers(24, 64)), int(rng.integers(24, 64))), "path": None} for _ in range(n)]
    images[5] = {"bytes": None, "path": "elsewhere/5.jpg"}
    hf_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", {
        "image": pa.array(images, STRUCT), "text": [f"a small picture number {i}" for i in range(n)],
        "license": ["cc0"] * n}, {"image": {"_type": "Image"}}, row_group_size=5)
    out = tmp_path / "out"
    curate("run", write_recipe(tmp_path / "cheap.yaml"), "--input", tmp_path / "hub", "--out", out,
           "--input-format", "parquet", "--text-column", "text")
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert sorted(r["raw_key"] for r in ledger) == [f"{i:09d}" for i in range(n)]
    assert len({r["uid"] for r in ledger}) == n
    by_key = {r["raw_key"]: r for r in ledger}
    assert (by_key["000000005"]["status"], by_key["000000005"]["reason"]) == ("failed", "image_not_embedded")
    kept = [r for r in ledger if r["status"] == "kept"]
    manifests = list((out / "tiers").glob("*/manifest.json"))
    assert kept and sum(json.loads(m.read_text())["num_samples"] for m in manifests) == len(kept)
    run = json.loads((out / "_work" / "run.json").read_text())
    assert run["input_options"] == {"format": "parquet", "image_column": None, "video_column": None,
                                    "text_column": "text", "url_column": None}
    from curation.catalog import connect

    assert connect(out).execute("SELECT DISTINCT json_extract_string(source_meta, '$.license') FROM samples"
                                ).fetchall() == [("cc0",)]
