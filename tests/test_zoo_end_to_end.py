"""The bad-input zoo through the whole job: one `curate run` over raw shards full of
hostile samples and broken shards finishes, accounts for every input with the expected
outcome, and writes tiers that webdataset reads and `curate verify` passes. Recipe
mistakes found only on real rows stop the job once, before any tier is written."""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.ids import make_uid

from .conftest import curate
from .rawgen import jpeg, write_raw_shards

pytestmark = pytest.mark.slow

RECIPE = """\
name: zoo
seed: 1
ops:
  - op: decode_image
  - op: perceptual_hash
  - op: image_quality
    min_side: 8
  - op: caption_length
    min_words: 1
  - op: video_quality
    min_duration: 0.1
    min_side: 8
  - op: exact_dedup
  - op: near_dedup
    max_hamming: 2
tiers:
  - name: picky                # fails only on the row whose caption is 'boom boom'
    where: "CASE WHEN text = 'boom boom' THEN CAST(text AS INTEGER) > 0 ELSE false END"
  - name: docs
    where: "kind = 'interleaved'"
  - name: video
    where: "kind = 'video'"
  - name: images
    where: "true"
shard:
  max_samples: 50
"""


def png16(value: int) -> bytes:
    """Mean `value` (of 65535), with a stripe so its phash is not a flat picture's."""
    a = np.full((20, 30), value, dtype=np.uint16)
    a[:, :10] += 2000
    a[:, 10:20] -= 2000
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (24, 24), (255, 0, 0, 0))
    img.paste((0, 255, 0, 0), (0, 0, 24, 8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def mp4(n_frames=8) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
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


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# key -> (members, expected (status, reason))
def zoo_samples(rng):
    good = jpeg(rng, 40, 30)
    doc_meta = lambda items, **kw: json.dumps({"kind": "interleaved", "items": items, **kw}).encode()
    return {
        "good": ({"jpg": good, "txt": b"a fine picture", "json": b'{"url": "http://x.invalid/a"}'}, ("kept", None)),
        "url_number": ({"jpg": jpeg(rng, 40, 30), "txt": b"a caption", "json": b'{"url": 12345}'}, ("failed", "bad_metadata")),
        "caption_list": ({"jpg": jpeg(rng, 40, 30), "json": b'{"caption": ["a", "b"]}'}, ("failed", "bad_metadata")),
        "deep_json": ({"jpg": jpeg(rng, 40, 30), "txt": b"a caption", "json": b"[" * 100000}, ("failed", "bad_metadata")),
        "kind_list": ({"jpg": jpeg(rng, 40, 30), "txt": b"a caption", "json": b'{"kind": ["video"]}'}, ("failed", "unknown_kind")),
        "bad_utf8": ({"jpg": jpeg(rng, 40, 30), "txt": b"\xff\xfe caption"}, ("failed", "bad_text")),
        "png16": ({"png": png16(32768), "txt": b"a grey card"}, ("kept", None)),
        "cmyk": ({"jpg": cmyk_jpeg(), "txt": b"a cyan card"}, ("kept", None)),
        "rotated": ({"jpg": rotated_jpeg(), "txt": b"a green bar"}, ("kept", None)),
        "bomb": ({"png": bomb_png(), "txt": b"a huge picture"}, ("dropped", "too_many_pixels")),
        "not_image": ({"jpg": b"<html>hello</html>", "txt": b"a page"}, ("failed", None)),
        "boom": ({"jpg": jpeg(rng, 40, 30), "txt": b"boom boom"}, ("failed", "routing_error")),
        "doc_ok": ({"0.jpg": jpeg(rng, 30, 30), "1.jpg": jpeg(rng, 30, 30), "txt": b"two pictures",
                    "json": doc_meta([{"type": "text", "text": "two"}, {"type": "image", "member": "0.jpg"},
                                      {"type": "image", "member": "1.jpg"}])}, ("kept", None)),
        "doc_corrupt_second": ({"0.jpg": jpeg(rng, 30, 30), "1.jpg": jpeg(rng, 30, 30)[:60], "txt": b"a document",
                                "json": doc_meta([{"type": "image", "member": "0.jpg"}, {"type": "image", "member": "1.jpg"}])},
                               ("failed", "corrupt_image")),
        "doc_bomb_second": ({"0.jpg": jpeg(rng, 30, 30), "1.png": bomb_png(), "txt": b"a document",
                             "json": doc_meta([{"type": "image", "member": "0.jpg"}, {"type": "image", "member": "1.png"}])},
                            ("dropped", "too_many_pixels")),
        "doc_items_not_objects": ({"0.jpg": jpeg(rng, 30, 30), "txt": b"a document",
                                   "json": doc_meta(["just a string", 3])}, ("failed", "bad_metadata")),
        "video_lies": ({"mp4": mp4(), "txt": b"a red flash",
                        "json": json.dumps({"kind": "video", "probe": {"duration": 999.0, "width": 4000, "height": 3000}}).encode()},
                       ("kept", None)),
        "video_corrupt": ({"mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 50, "txt": b"a clip",
                           "json": b'{"kind": "video"}'}, ("failed", None)),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    raw = root / "raw"
    write_raw_shards(raw, shards=2, per_shard=30, seed=9)
    rng = np.random.default_rng(4)
    expected = {}
    with tarfile.open(raw / "zoo-00000.tar", "w") as tar:
        for key, (members, outcome) in zoo_samples(rng).items():
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
            expected[make_uid("raw/zoo-00000.tar", key)] = (key, outcome)
    # a shard cut at a member boundary, with its listing: the tail is accounted for
    keys = [f"t{i:03d}" for i in range(10)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k in keys:
            add(tar, f"{k}.jpg", jpeg(rng, 40, 30))
            add(tar, f"{k}.txt", b"a picture that was cut")
    data = buf.getvalue()
    cut, seen = 0, 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # offset where the 7th sample starts
        for m in tar:
            if m.name.startswith("t006"):
                cut = m.offset
                break
    (raw / "cut-00000.tar").write_bytes(data[:cut])
    pq.write_table(pa.table({"key": keys, "status": ["success"] * 10}), raw / "cut-00000.parquet")
    (raw / "garbage-00000.tar").write_bytes(b"this is not a tar file at all" * 10)
    # the same uid claimed by two shards
    uid = make_uid("elsewhere", "x")
    for name in ("dupa-00000.tar", "dupb-00000.tar"):
        with tarfile.open(raw / name, "w") as tar:
            add(tar, "s.jpg", jpeg(rng, 40, 30))
            add(tar, "s.txt", b"claimed twice")
            add(tar, "s.json", json.dumps({"uid": uid}).encode())
    recipe = root / "zoo.yaml"
    recipe.write_text(RECIPE)
    out = root / "out"
    proc = curate("run", recipe, "--input", raw, "--out", out)
    ledger = {r["uid"]: r for r in pq.read_table(out / "ledger.parquet").to_pylist()}
    return out, raw, ledger, expected, keys, uid, proc


def test_every_hostile_sample_has_its_expected_outcome(zoo):
    out, raw, ledger, expected, *_ = zoo
    wrong = {}
    for uid, (key, (status, reason)) in expected.items():
        row = ledger.get(uid)
        got = (row["status"], row["reason"]) if row else None
        if got is None or got[0] != status or (reason is not None and got[1] != reason):
            wrong[key] = (got, (status, reason), row and row["error"])
    assert not wrong


def test_broken_shards_cost_only_their_samples(zoo):
    out, raw, ledger, expected, keys, uid, proc = zoo
    cut = [r for r in ledger.values() if r["raw_shard"] == "cut-00000.tar"]
    assert len(cut) == 10
    tail = sorted(r["raw_key"] for r in cut if r["reason"] == "missing_from_shard")
    assert tail == keys[7:] or tail == keys[6:], tail  # the sample cut at its boundary may be truncated_member
    assert [r["reason"] for r in ledger.values() if r["raw_shard"] == "garbage-00000.tar"] == ["unreadable_shard"]
    claims = [r for r in ledger.values() if r["raw_shard"] in ("dupa-00000.tar", "dupb-00000.tar")]
    assert sorted((r["raw_shard"], r["status"], r["reason"]) for r in claims) == [
        ("dupa-00000.tar", "kept", None), ("dupb-00000.tar", "failed", "duplicate_uid")]
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["curate"].values()) == summary["raw_samples"] == len(ledger)


def test_tiers_hold_what_their_sidecars_say(zoo):
    import webdataset as wds

    out, raw, ledger, expected, *_ = zoo
    by_key = {key: uid for uid, (key, _) in expected.items()}
    sidecars = {r["uid"]: r for p in (out / "tiers").rglob("*.parquet") for r in pq.read_table(p).to_pylist()}
    grey = sidecars[by_key["png16"]]
    assert grey["image_format"] == "PNG" and grey["conversion"]
    rotated = sidecars[by_key["rotated"]]
    assert (rotated["width"], rotated["height"]) == (20, 40)
    video = sidecars[by_key["video_lies"]]
    assert video["duration"] == pytest.approx(1.0, abs=0.2) and video["width"] == 32 and video["sha256"]
    good = sidecars[by_key["good"]]
    seen = {}
    for tar in sorted((out / "tiers").rglob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            seen[sample["__key__"]] = sample
    assert seen[good["key"]]["jpg"] == zoo_samples(np.random.default_rng(4))["good"][0]["jpg"]  # original bytes
    png = Image.open(io.BytesIO(seen[grey["key"]]["png"]))
    assert abs(int(np.asarray(png.convert("L")).mean()) - 128) <= 1  # 16-bit scaled, not saturated
    cmyk = Image.open(io.BytesIO(seen[sidecars[by_key["cmyk"]]["key"]]["jpg"]))
    assert cmyk.mode == "RGB"
    assert curate("verify", "--root", out).returncode == 0


def test_a_predicate_failing_on_every_row_stops_once_and_the_fixed_recipe_runs_on_the_same_out(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=2, per_shard=20, seed=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("CASE WHEN text = 'boom boom' THEN CAST(text AS INTEGER) > 0 ELSE false END",
                                  "CAST(text AS INTEGER) > 0"))
    out = tmp_path / "out"
    proc = curate("run", bad, "--input", raw, "--out", out, check=False)
    assert proc.returncode == 2 and proc.stderr.count("curate: error:") == 1
    assert "tier routing failed on every row" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "tiers").exists() or not list((out / "tiers").rglob("*.tar"))
    good = tmp_path / "good.yaml"
    good.write_text(RECIPE)
    proc = curate("run", good, "--input", raw, "--out", out)
    assert "starting over" in proc.stderr and (out / "_SUCCESS").exists()
