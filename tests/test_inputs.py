"""`curate run --input` beyond a flat folder of .tar: recursive folders with .tar.gz/.tgz,
globs, brace patterns and s3:// (a moto server on 127.0.0.1); kinds told by the members
when no json says; the producer's own json fields kept in source_meta; img2dataset's
failed urls in the ledger; a gzip bomb costing only its shard."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import inputs
from curation.errors import InputError
from curation.ids import make_uid
from curation.inputs import ShardRef, expand_braces, glob_regex, resolve_input, shard_name
from curation.rawshards import ReadCaps, count_samples, read_shard

from .conftest import curate
from .rawgen import jpeg, write_recipe

SRC = "src"


# ------------------------------------------------------------------------ building
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_bytes(name: str, data: bytes) -> bytes:
    """One tar member as it sits in the archive: header, data, padding."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def image_samples(rng, keys, caption="a small picture here", meta=None) -> list[tuple[str, bytes]]:
    out = []
    for k in keys:
        out += [(f"{k}.jpg", jpeg(rng, 40, 30)), (f"{k}.txt", caption.encode())]
        if meta is not None:
            out.append((f"{k}.json", json.dumps(meta(k)).encode()))
    return out


def write(path: Path, members, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(members)
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    return path


def video(fmt: str = "mp4", n_frames: int = 6) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(n_frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), (t * 30, 0, 0)))
            frame.pts, frame.time_base = t, Fraction(1, 8)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def img2dataset_shard(folder: Path, rng, stem: str = "00000") -> dict:
    """img2dataset's layout: <stem>.tar with the successes (json with its own fields and
    the user's extra columns) and <stem>.parquet listing every url with its status."""
    rows = [("000000000", "success", None), ("000000001", "failed_to_download", "HTTP Error 404: Not Found"),
            ("000000002", "success", None), ("000000003", "failed_to_resize", "image decoding failed"),
            ("000000004", "success", None)]
    members = []
    for key, status, _ in rows:
        if status == "success":
            meta = {"url": f"http://img.invalid/{key}.jpg", "caption": "a picture of a thing", "key": key,
                    "status": "success", "error_message": None, "width": 40, "height": 30, "original_width": 128,
                    "original_height": 96, "exif": "{}", "sha256": None, "license": "cc-by-4.0", "similarity": 0.31}
            members += [(f"{key}.jpg", jpeg(rng, 40, 30)), (f"{key}.txt", b"a picture of a thing"),
                        (f"{key}.json", json.dumps(meta).encode())]
    write(folder / f"{stem}.tar", members)
    pq.write_table(pa.table({"url": [f"http://img.invalid/{k}.jpg" for k, _, _ in rows], "key": [k for k, _, _ in rows],
                             "status": [s for _, s, _ in rows], "error_message": [e for _, _, e in rows],
                             "license": ["cc-by-4.0"] * len(rows)}), folder / f"{stem}.parquet")
    (folder / f"{stem}_stats.json").write_text(json.dumps({"count": len(rows), "successes": 3}))
    return {k: (s, e) for k, s, e in rows}


def gzip_bomb(path: Path, rng, zeros: int) -> None:
    """A good sample, then a member of `zeros` zero bytes that its header claims honestly
    (so no member cap refuses it) and that compresses to almost nothing."""
    chunk = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    good = b"".join(member_bytes(n, d) for n, d in image_samples(rng, ["good"]))  # no end-of-archive blocks
    with open(path, "wb") as f:
        f.write(gzip.compress(good))
        header = tarfile.TarInfo("bomb.jpg")
        header.size = zeros
        f.write(gzip.compress(header.tobuf(tarfile.GNU_FORMAT)))
        for _ in range(zeros // (16 << 20)):
            f.write(chunk)


def rows_of(ref, caps=ReadCaps()):
    out = list(read_shard(ref, SRC, caps))
    assert count_samples(ref, caps) == len(out)
    return out


# --------------------------------------------------------------------- resolution
def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert expand_braces("{a,b}/x{1..5..2}.tar") == ["a/x1.tar", "a/x3.tar", "a/x5.tar", "b/x1.tar", "b/x3.tar", "b/x5.tar"]
    assert expand_braces("{x}/y{a,{b,c}}.tar") == ["{x}/ya.tar", "{x}/yb.tar", "{x}/yc.tar"]  # {x}: no pattern
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    with pytest.raises(InputError, match="more than"):
        expand_braces("{0..99999999}")
    with pytest.raises(InputError, match="more than"):
        expand_braces("{0..999}{0..999}")


def test_object_store_globs_stay_within_folders_unless_doubled():
    assert glob_regex("raw/*.tar").match("raw/a.tar") and not glob_regex("raw/*.tar").match("raw/sub/a.tar")
    assert glob_regex("raw/**/*.tar").match("raw/a.tar") and glob_regex("raw/**/*.tar").match("raw/x/y/a.tar")
    assert glob_regex("s[0-9].tar").match("s5.tar") and not glob_regex("s[!0-9].tar").match("s5.tar")
    assert not glob_regex("a.tar").match("a.tar.gz") and not glob_regex("?.tar").match("/.tar")


def test_names_are_unique_stable_and_file_safe():
    assert shard_name("x.tar") == "x.tar"  # a flat folder keeps its names
    assert shard_name("a/b/x.tar") == "a%2Fb%2Fx.tar"
    assert shard_name("a%2Fb/x.tar") != shard_name("a/b/x.tar")  # the escape character is escaped too
    assert shard_name("a*[1]?.tar") == "a%2A%5B1%5D%3F.tar"
    long = shard_name("d" * 300 + "/x.tgz")
    assert len(long.encode()) <= inputs.MAX_NAME_BYTES and long.endswith("%2Fx.tgz")
    assert long != shard_name("e" + "d" * 299 + "/x.tgz")


def make_tree(root: Path, rng) -> None:
    write(root / "top.tar", image_samples(rng, ["k0", "k1"]))
    write(root / "sub1" / "x.tar", image_samples(rng, ["k0", "k1"]))
    write(root / "sub2" / "x.tar", image_samples(rng, ["k0", "k1", "k2"]))  # same file name, same keys
    write(root / "deep" / "er" / "y.tar.gz", image_samples(rng, ["g0", "g1"]), compress=True)
    write(root / "z.tgz", image_samples(rng, ["t0"]), compress=True)
    write(root / "_tmp" / "work.tar", image_samples(rng, ["w"]))          # a work folder: skipped
    write(root / ".cache" / "c.tar", image_samples(rng, ["c"]))           # hidden: skipped
    write(root / "old_out" / "tiers" / "t.tar", image_samples(rng, ["o"]))  # a curate output: skipped
    (root / "old_out" / "_work").mkdir()
    (root / "old_out" / "_work" / "run.json").write_text("{}")
    (root / "notes.txt").write_text("not a shard")


def test_folder_is_searched_recursively_and_same_file_names_stay_apart(tmp_path):
    rng = np.random.default_rng(0)
    make_tree(tmp_path / "raw", rng)
    raw = resolve_input(tmp_path / "raw")
    names = [s.name for s in raw.shards]
    assert names == ["deep%2Fer%2Fy.tar.gz", "sub1%2Fx.tar", "sub2%2Fx.tar", "top.tar", "z.tgz"]
    assert raw.source == "raw" and raw.crawl_ledgers == () and all(s.listing_failures for s in raw.shards)
    rows = {s.name: rows_of(s) for s in raw.shards}
    assert [len(rows[n]) for n in names] == [2, 2, 3, 2, 1]
    assert all(r["status"] == "kept" and r["raw_shard"] == n for n in names for r, _ in rows[n])
    uids = [r["uid"] for n in names for r, _ in rows[n]]
    assert len(set(uids)) == len(uids) == 10  # same keys in sub1/x.tar and sub2/x.tar, distinct samples
    assert rows["sub1%2Fx.tar"][0][0]["uid"] == make_uid(f"{SRC}/sub1%2Fx.tar", "k0")
    assert rows["z.tgz"][0][1]["jpg"][:2] == b"\xff\xd8"  # decompressed, streamed
    # a token carries the reference to a Ray task unchanged
    assert all(ShardRef.from_token(s.token()) == s for s in raw.shards)


def test_globs_and_braces_name_shards_from_their_folder_part(tmp_path):
    rng = np.random.default_rng(1)
    make_tree(tmp_path / "raw", rng)
    for i in range(3):
        write(tmp_path / "flat" / f"shard-{i:05d}.tar", image_samples(rng, [f"s{i}"]))
    by_glob = resolve_input(f"{tmp_path}/raw/**/*.tar")
    assert [s.name for s in by_glob.shards] == ["_tmp%2Fwork.tar", "old_out%2Ftiers%2Ft.tar", "sub1%2Fx.tar",
                                               "sub2%2Fx.tar", "top.tar"]  # a glob takes what it says
    assert by_glob.source == "raw"
    assert [s.name for s in resolve_input(f"{tmp_path}/raw/*/x.tar").shards] == ["sub1%2Fx.tar", "sub2%2Fx.tar"]
    by_brace = resolve_input(f"{tmp_path}/flat/shard-{{00000..00002}}.tar")
    assert [s.name for s in by_brace.shards] == [f"shard-{i:05d}.tar" for i in range(3)]
    assert [s.name for s in resolve_input(f"{tmp_path}/{{flat/shard-00001.tar,raw/z.tgz}}").shards] == \
        ["flat%2Fshard-00001.tar", "raw%2Fz.tgz"]
    assert [s.name for s in resolve_input(tmp_path / "raw" / "z.tgz").shards] == ["z.tgz"]  # one file
    with pytest.raises(InputError, match="1 raw shards named by .* do not exist"):
        resolve_input(f"{tmp_path}/flat/shard-{{00000..00003}}.tar")
    with pytest.raises(InputError, match="no raw shards"):
        resolve_input(f"{tmp_path}/flat/*.tar.gz")
    with pytest.raises(InputError, match="input folder not found"):
        resolve_input(tmp_path / "nope")
    with pytest.raises(InputError, match="not supported"):
        resolve_input("gs://bucket/raw/")
    write(tmp_path / "flat" / "shard-00000.tgz", image_samples(rng, ["s"]), compress=True)
    with pytest.raises(InputError, match="differ only by their suffix"):
        resolve_input(tmp_path / "flat")


def test_a_crawl_folder_keeps_its_ledger_and_ignores_listing_failures(tmp_path):
    rng = np.random.default_rng(2)
    expected = img2dataset_shard(tmp_path / "crawl", rng)
    pq.write_table(pa.table({"uid": ["0" * 16]}), tmp_path / "crawl" / "crawl_ledger-image_text.parquet")
    ours = resolve_input(tmp_path / "crawl")
    assert [p.name for p in ours.crawl_ledgers] == ["crawl_ledger-image_text.parquet"]
    assert not ours.shards[0].listing_failures
    assert len(rows_of(ours.shards[0])) == sum(s == "success" for s, _ in expected.values())


def test_the_catalog_reads_the_crawl_ledgers_the_run_recorded(tmp_path):
    """crawl_ledger is what the run merged (run.json), not whatever lies beside the input:
    a glob, a single shard or s3:// merged none, whatever the folder holds now."""
    from curation import schemas
    from curation.catalog import connect

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    row = {"uid": "0" * 16, "source": "s", "stage": "crawl", "status": "failed", "reason": "http_404"}
    pq.write_table(pa.Table.from_pylist([row], schema=schemas.arrow_schema("ledger")), crawl / "crawl_ledger-image_text.parquet")
    (crawl / "crawl_ledger-video.parquet").write_bytes(b"written later, not by this run")
    for name, recorded in (("glob", []), ("folder", [str(crawl / "crawl_ledger-image_text.parquet"), "/etc/passwd"])):
        root = tmp_path / name
        (root / "_work").mkdir(parents=True)
        pq.write_table(schemas.arrow_schema("ledger").empty_table(), root / "ledger.parquet")
        spec = str(crawl / "*.tar") if name == "glob" else str(crawl)
        (root / "_work" / "run.json").write_text(json.dumps({"input": spec, "crawl_ledgers": recorded}))
        tables = {t for (t,) in connect(root).execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if name == "glob":
            assert "crawl_ledger" not in tables
        else:  # only files named like a crawl ledger
            assert connect(root).execute("SELECT uid, stage FROM crawl_ledger").fetchall() == [("0" * 16, "crawl")]


# ----------------------------------------------------------------- what is read
def test_img2dataset_failures_become_rows_and_producer_fields_are_kept(tmp_path):
    rng = np.random.default_rng(3)
    expected = img2dataset_shard(tmp_path / "i2d", rng)
    (shard,) = resolve_input(tmp_path / "i2d").shards
    rows = {r["raw_key"]: r for r, _ in rows_of(shard)}
    assert sorted(rows) == sorted(expected)  # every url of the listing, once
    for key, (status, error) in expected.items():
        row = rows[key]
        assert row["uid"] == make_uid(f"{SRC}/00000.tar", key) and row["url"] == f"http://img.invalid/{key}.jpg"
        if status == "success":
            assert row["status"] == "kept"
            meta = json.loads(row["source_meta"])
            assert meta == {"license": "cc-by-4.0", "width": 40, "height": 30, "original_width": 128,
                            "original_height": 96, "similarity": 0.31}  # not key/status/error_message
        else:
            assert (row["status"], row["reason"], row["error"]) == (
                "failed", {"failed_to_download": "download_error", "failed_to_resize": "decode_error"}[status], error)
        assert row["stage"] == (None if status == "success" else "crawl")  # img2dataset's outcome, not ours
    # read as a plain path (as before: our crawl's ledger accounts for the failures), not rows
    assert len(rows_of(tmp_path / "i2d" / "00000.tar")) == 3


def test_img2dataset_failures_enter_the_ledger_as_crawl_rows_once(tmp_path):
    """Stage B (without Ray) over the reader's rows of two img2dataset shards: the failed
    urls keep stage crawl in the ledger, the rest are curate's, every uid exactly once."""
    from curation import config
    from curation.annotate import BINARY_COLUMNS, stage_schema
    from curation.decide import decide
    from curation.rawshards import READ_COLUMNS

    rng = np.random.default_rng(3)
    expected = img2dataset_shard(tmp_path / "i2d", rng)
    img2dataset_shard(tmp_path / "i2d", rng, stem="00001")
    shards = resolve_input(tmp_path / "i2d").shards
    schema = stage_schema(list(READ_COLUMNS))
    parts = []
    for i, shard in enumerate(shards):
        rows = [{c: r.get(c) for c in schema.names} for r, _ in read_shard(shard, SRC)]
        parts.append(tmp_path / f"part{i}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), parts[-1])
    cfg = config.parse({"name": "t", "ops": [{"op": "decode_image"}], "tiers": [{"name": "all", "where": "true"}]})
    decision = decide(cfg, parts, [s.name for s in shards], tmp_path / "work", binary_columns=BINARY_COLUMNS)
    ledger = pq.read_table(decision.ledger).to_pylist()
    assert len(ledger) == len({r["uid"] for r in ledger}) == 2 * len(expected)
    got = sorted((r["raw_shard"], r["raw_key"], r["stage"], r["status"], r["reason"]) for r in ledger)
    want = sorted((f"{stem}.tar", key, "curate" if status == "success" else "crawl",
                   "dropped" if status == "success" else "failed",  # dropped: unrouted (stage A routes)
                   "unrouted" if status == "success" else
                   {"failed_to_download": "download_error", "failed_to_resize": "decode_error"}[status])
                  for stem in ("00000", "00001") for key, (status, _) in expected.items())
    assert got == want


def test_producer_meta_merges_with_our_meta(tmp_path):
    samples = [("a.jpg", b"\xff\xd8x"), ("a.json", json.dumps({"license": "mit", "meta": '{"qa": [1]}'}).encode()),
               ("b.jpg", b"\xff\xd8y"), ("b.json", json.dumps({"license": "mit", "meta": "free text"}).encode()),
               ("c.jpg", b"\xff\xd8z"), ("c.json", json.dumps({"meta": {"qa": [2]}, "score": None}).encode()),
               ("d.jpg", b"\xff\xd8w"), ("d.json", b'{"license": "x", "huge": 1e999, "exif": "{}", "tags": []}')]
    out = rows_of(write(tmp_path / "m.tar", samples))
    metas = [r["source_meta"] for r, _ in out]
    assert [r["status"] for r, _ in out] == ["kept"] * 4
    assert json.loads(metas[0]) == {"license": "mit", "qa": [1]}
    assert json.loads(metas[1]) == {"license": "mit", "meta": "free text"}
    assert metas[2] == '{"qa": [2]}'  # nothing of the producer's own: as before
    assert json.loads(metas[3]) == {"license": "x"}  # empty values, and one JSON cannot hold, are left out


def test_kinds_are_told_by_the_members_when_no_json_says(tmp_path):
    from curation.annotate import validate_media

    rng = np.random.default_rng(4)
    a, b, c = jpeg(rng, 40, 30), jpeg(rng, 30, 30), jpeg(rng, 20, 30)
    samples = [("one.jpg", a), ("one.txt", b"an image"),
               ("doc.2.jpg", c), ("doc.0.jpg", a), ("doc.1.png", b), ("doc.txt", b"three images"),
               ("pages.img0.jpg", a), ("pages.img1.jpg", b),
               ("clip.mp4", video("mp4")), ("clip.txt", b"a red flash"),
               ("mkv.mkv", video("matroska")),
               ("said.0.jpg", a), ("said.1.jpg", b), ("said.json", b'{"kind": "image_text"}')]
    out = rows_of(write(tmp_path / "kinds.tar", samples))
    by_key = {r["raw_key"]: (r, f) for r, f in out}
    assert {k: r["kind"] for k, (r, _) in by_key.items()} == {
        "one": "image_text", "doc": "interleaved", "pages": "interleaved", "clip": "video", "mkv": "video",
        "said": "image_text"}
    doc = by_key["doc"][0]
    assert doc["media"] == ["0.jpg", "1.png", "2.jpg"] and doc["num_images"] == 3
    assert [i["member"] for i in doc["doc"]["items"]] == ["0.jpg", "1.png", "2.jpg"]
    assert by_key["pages"][0]["media"] == ["img0.jpg", "img1.jpg"]
    assert by_key["said"][0]["media"] == ["0.jpg"]  # the json's kind wins
    for key in ("clip", "mkv"):  # probed from the file, no probe json needed
        row, files = by_key[key]
        assert row["status"] == "kept" and row["duration"] is None
        validate_media(row, files)
        assert row["status"] == "kept", row
        assert (row["width"], row["height"], row["num_frames"]) == (32, 32, 6) and row["duration"] > 0.5
    for key in ("one", "doc", "pages"):
        row, files = by_key[key]
        validate_media(row, files)
        assert row["status"] == "kept", row


def test_a_gzip_bomb_costs_only_its_shard(tmp_path):
    rng = np.random.default_rng(5)
    bomb = tmp_path / "bomb.tar.gz"
    gzip_bomb(bomb, rng, zeros=192 << 20)  # honest headers: no member cap stops it
    caps = ReadCaps(max_member_bytes=256 << 20, min_inflate_bytes=8 << 20, max_inflate_ratio=20)
    t0 = time.monotonic()
    out = rows_of(bomb, caps)
    assert [(r["raw_key"], r["status"], r["reason"]) for r, _ in out] == [
        ("good", "kept", None), ("bomb", "failed", "decompressed_too_large")]
    assert "compression bomb" in out[1][0]["error"] and str(tmp_path) not in out[1][0]["error"]
    assert time.monotonic() - t0 < 10  # it stopped at ~8 MiB + 20x its size, not at 192 MiB, twice
    assert bomb.stat().st_size < 1 << 20


# ------------------------------------------------------------------------------ s3
class FlakyObject(io.BytesIO):
    """An object store file whose connection drops after `good` bytes."""

    def __init__(self, data: bytes, good: int):
        super().__init__(data)
        self.good = good

    def size(self) -> int:
        return len(self.getvalue())

    def read(self, n=-1):
        if self.tell() + (n if n >= 0 else self.size()) > self.good:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
        return super().read(n)


def test_a_connection_lost_mid_shard_is_raised_not_recorded(monkeypatch):
    rng = np.random.default_rng(9)
    data = tar_bytes(image_samples(rng, [f"k{i}" for i in range(20)]))

    class FlakyStore:
        def open_input_file(self, path):
            return FlakyObject(data, good=len(data) // 2)

    monkeypatch.setattr(inputs, "s3_filesystem", lambda endpoint, region: FlakyStore())
    monkeypatch.setattr(inputs, "STREAM_BUFFER", 4096)  # ranged reads small enough to drop halfway
    ref = ShardRef(name="f.tar", url="s3://bkt/f.tar", size=len(data))
    read = []
    with pytest.raises(inputs.ShardIOError, match="cannot read s3://bkt/f.tar: .*connection reset.*run the same command"):
        for row, _ in read_shard(ref, SRC):
            read.append(row["status"])
    assert 0 < len(read) < 20 and set(read) == {"kept"}  # no truncated_member row for the network's fault


def upload(filesystem, local_root: Path, prefix: str) -> None:
    for p in sorted(local_root.rglob("*")):
        if p.is_file():
            # compression=None: pyarrow would otherwise gzip a .gz name once more
            with filesystem.open_output_stream(f"{prefix}/{p.relative_to(local_root).as_posix()}", compression=None) as f:
                f.write(p.read_bytes())


def test_s3_prefix_glob_and_brace_read_streamed(tmp_path, s3, monkeypatch):
    filesystem, _ = s3
    rng = np.random.default_rng(6)
    make_tree(tmp_path / "raw", rng)
    expected = img2dataset_shard(tmp_path / "raw" / "i2d", rng)
    big = [("big.jpg", b"\xff\xd8" + bytes(rng.integers(0, 255, 24 << 20, dtype=np.uint8))), ("big.txt", b"too big")]
    write(tmp_path / "raw" / "big.tar", image_samples(rng, ["before"]) + big + image_samples(rng, ["after"]))
    (tmp_path / "raw" / "sub1" / "x.parquet").write_bytes(b"not parquet" * 100)  # a garbage listing: ignored
    upload(filesystem, tmp_path / "raw", "bkt/data/raw")

    raw = resolve_input("s3://bkt/data/raw/")
    names = [s.name for s in raw.shards]
    assert names == ["big.tar", "deep%2Fer%2Fy.tar.gz", "i2d%2F00000.tar", "sub1%2Fx.tar", "sub2%2Fx.tar", "top.tar", "z.tgz"]
    assert raw.source == "raw" and all(s.url.startswith("s3://bkt/data/raw/") for s in raw.shards)
    local = {s.name: s for s in resolve_input(tmp_path / "raw").shards}
    for ref in raw.shards:
        if ref.name == "big.tar":
            continue
        got = [(r["uid"], r["status"], r["reason"], r["source_meta"], sorted(f)) for r, f in rows_of(ref)]
        assert got == [(r["uid"], r["status"], r["reason"], r["source_meta"], sorted(f)) for r, f in rows_of(local[ref.name])]
    i2d = next(s for s in raw.shards if s.name == "i2d%2F00000.tar")
    assert sorted(r["raw_key"] for r, _ in rows_of(i2d)) == sorted(expected)  # the listing, read from s3 too

    # streamed: a member over the cap is seeked past, not downloaded
    fetched = []
    real = inputs._RemoteRaw.readinto
    monkeypatch.setattr(inputs._RemoteRaw, "readinto", lambda self, b: fetched.append(real(self, b)) or fetched[-1])
    out = list(read_shard(raw.shards[0], SRC, ReadCaps(max_member_bytes=1 << 20)))
    assert [(r["raw_key"], r["reason"]) for r, _ in out] == [("before", None), ("big", "member_too_large"), ("after", None)]
    assert sum(fetched) < 2 * inputs.STREAM_BUFFER + (1 << 20) < raw.shards[0].size

    # a network failure (here: the object gone since the listing) is raised, never rows:
    # the task fails and a re-run resumes, instead of a shard read halfway
    filesystem.delete_file("bkt/data/raw/top.tar")
    top = next(s for s in raw.shards if s.name == "top.tar")
    with pytest.raises(inputs.ShardIOError, match="s3://bkt/data/raw/top.tar"):
        list(read_shard(top, SRC))
    with pytest.raises(inputs.ShardIOError):
        count_samples(top)

    by_glob = resolve_input("s3://bkt/data/raw/**/x.tar")
    assert [s.name for s in by_glob.shards] == ["sub1%2Fx.tar", "sub2%2Fx.tar"]
    by_brace = resolve_input("s3://bkt/data/raw/{sub1/x.tar,z.tgz}")
    assert [s.name for s in by_brace.shards] == ["sub1%2Fx.tar", "z.tgz"]
    with pytest.raises(InputError, match="do not exist"):
        resolve_input("s3://bkt/data/raw/{top,nope}.tar")
    with pytest.raises(InputError, match="no raw shards"):
        resolve_input("s3://bkt/elsewhere/")


# ------------------------------------------------------------------- end to end
def build_mixed_input(root: Path, rng) -> None:
    """Every kind of input at once, as a user might bring it."""
    lic = lambda k: {"url": f"http://x.invalid/{k}", "license": "cc0", "aesthetic": 5.5}
    write(root / "a" / "part.tar", image_samples(rng, ["k0", "k1", "k2"], meta=lic))
    write(root / "b" / "part.tar", image_samples(rng, ["k0", "k1", "k2"]))  # same name and keys
    write(root / "c" / "more.tar.gz", image_samples(rng, ["g0", "g1"]), compress=True)
    write(root / "d.tgz", image_samples(rng, ["t0", "t1"]), compress=True)
    img2dataset_shard(root / "i2d", rng)
    write(root / "kinds.tar", [("doc.0.jpg", jpeg(rng, 40, 30)), ("doc.1.jpg", jpeg(rng, 40, 30)),
                               ("doc.txt", b"two pictures together"), ("clip.mp4", video("mp4")),
                               ("clip.txt", b"a red flash")])
    gzip_bomb(root / "bomb.tar.gz", rng, zeros=160 << 20)


def check_run(out: Path, raw_spec: str, env: dict | None = None) -> dict:
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    raw = resolve_input(raw_spec)
    counts = {s.name: count_samples(s) for s in raw.shards}
    assert len(ledger) == sum(counts.values()) == len({r["uid"] for r in ledger})  # every input once
    by_shard = {}
    for r in ledger:
        by_shard.setdefault(r["raw_shard"], []).append(r)
    assert {k: len(v) for k, v in by_shard.items()} == counts
    return {(r["raw_shard"], r["raw_key"]): r for r in ledger}


@pytest.mark.slow
def test_curate_run_over_a_mixed_s3_prefix(tmp_path, s3):
    """One run from the object store to the object store (Ray tasks read the shards; the
    run works in --stage-dir and publishes there): subfolders with the same file names,
    .tar.gz/.tgz, img2dataset's layout with failed urls and its own fields, kinds told by
    the members, a gzip bomb. Every input is in the ledger once."""
    filesystem, env = s3
    build_mixed_input(tmp_path / "raw", np.random.default_rng(7))
    upload(filesystem, tmp_path / "raw", "bkt/raw")
    out = tmp_path / "out"  # the stage folder: what a local --out would hold
    args = ("run", write_recipe(tmp_path / "cheap.yaml"), "--input", "s3://bkt/raw/", "--out", "s3://bkt/curated",
            "--stage-dir", out)
    proc = curate(*args, env={**os.environ, **env})
    ledger = check_run(out, "s3://bkt/raw/")
    assert json.loads((out / "_work" / "run.json").read_text())["input"] == "s3://bkt/raw/"
    assert {k for k in ledger if k[0].endswith("part.tar")} == {(f"{d}%2Fpart.tar", f"k{i}") for d in "ab" for i in range(3)}
    assert ledger[("c%2Fmore.tar.gz", "g0")]["status"] == "kept" and ledger[("d.tgz", "t1")]["status"] == "kept"
    fails = {k[1]: (r["stage"], r["status"], r["reason"], r["url"]) for k, r in ledger.items()
             if k[0] == "i2d%2F00000.tar" and r["status"] == "failed"}
    assert fails == {"000000001": ("crawl", "failed", "download_error", "http://img.invalid/000000001.jpg"),
                     "000000003": ("crawl", "failed", "decode_error", "http://img.invalid/000000003.jpg")}
    assert ledger[("bomb.tar.gz", "good")]["status"] == "kept"
    assert ledger[("bomb.tar.gz", "bomb")]["reason"] == "decompressed_too_large"
    assert ledger[("kinds.tar", "doc")]["status"] == "kept" and ledger[("kinds.tar", "clip")]["status"] == "kept"

    from curation.catalog import connect

    con = connect(out)
    got = con.execute("""SELECT json_extract_string(source_meta, '$.license') AS license, count(*) AS n,
                                min(CAST(json_extract(source_meta, '$.original_width') AS INTEGER)) AS ow
                         FROM samples GROUP BY ALL ORDER BY ALL""").fetchall()
    assert ("cc-by-4.0", 3, 128) in got and ("cc0", 3, None) in got
    assert con.execute("SELECT kind, count(*) FROM samples WHERE kind <> 'image_text' GROUP BY ALL ORDER BY ALL"
                       ).fetchall() == [("interleaved", 1), ("video", 1)]
    manifests = list((out / "tiers").glob("*/manifest.json"))
    assert sum(json.loads(m.read_text())["num_samples"] for m in manifests) == sum(
        r["status"] == "kept" for r in ledger.values())

    from .test_publish import check_published_run  # --out s3://: the objects, a resume, an export

    check_published_run(filesystem, proc, args, out, "s3://bkt/curated", tmp_path)
