"""Hostile raw shards: every case gives exact rows (status, reason), count_samples agrees
with read_shard, the rows fit the Arrow schema, and nothing raises."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.annotate import stage_schema
from curation.errors import InputError
from curation.ids import make_uid
from curation.rawshards import READ_COLUMNS, ReadCaps, count_samples, iter_samples, read_shard, scan_keys

SRC = "src"
JPG = b"\xff\xd8\xff\xe0fake-jpeg" + b"\x00" * 50
MP4 = b"\x00\x00\x00\x18ftypmp42fake-video"
SCHEMA = stage_schema(list(READ_COLUMNS))  # what stage A's Ray blocks hold (the sidecar contract's types)


def info(name: str, size: int = 0, type_: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = size, type_, linkname
    return ti


def tar_of(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    """members: (name, bytes) or a TarInfo without data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                tar.addfile(info(m[0], len(m[1])), io.BytesIO(m[1]))
    return buf.getvalue()


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def listing(path, keys, statuses=None, col="key", uids=None):
    cols = {col: keys, "status": statuses or ["success"] * len(keys)}
    if uids is not None:
        cols["uid"] = uids
    pq.write_table(pa.table(cols), path.with_name(path.name[: -len(".tar")] + ".parquet"))


def read_all(path, caps=ReadCaps()):
    n = count_samples(path, caps)
    out = list(read_shard(path, SRC, caps))
    assert n == len(out), f"count_samples {n} != {len(out)} rows"
    for row, files in out:
        assert set(row) == set(READ_COLUMNS)
        assert isinstance(files, dict)
        assert row["error"] is None or ("\n" not in row["error"] and len(row["error"]) <= 300)
        assert (row["status"] == "kept") == (row["reason"] is None)
    pa.Table.from_pylist([r for r, _ in out], schema=SCHEMA)  # types and UTF-8 fit the Arrow schema
    return out


def outcome(out):
    return [(r["status"], r["reason"]) for r, _ in out]


def sample(key: str, meta=None, *, image=True, txt=None, kind_files=()):
    members = list(kind_files)
    if image:
        members.append((f"{key}.jpg", JPG))
    if txt is not None:
        members.append((f"{key}.txt", txt))
    if meta is not None:
        members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return members


KEPT = [("kept", None)]


def bad(field):
    return lambda r: field in r["error"]


# --------------------------------------------------------------------------- metadata
META_CASES = {
    # id: (json member, txt member, expected, check)
    "url_number": ({"url": 5}, None, [("failed", "bad_metadata")], bad("'url'")),
    "caption_list": ({"caption": ["a", "b"]}, None, [("failed", "bad_metadata")], bad("'caption'")),
    "source_number": ({"source": 1}, None, [("failed", "bad_metadata")], bad("'source'")),
    "uid_number": ({"uid": 123}, None, KEPT, lambda r: r["uid"] == make_uid(f"{SRC}/s.tar", "k")),
    "uid_ours": ({"uid": "0123456789abcdef"}, None, KEPT, lambda r: r["uid"] == "0123456789abcdef"),
    "kind_list": ({"kind": ["video"]}, None, [("failed", "unknown_kind")], lambda r: r["kind"] == "image_text"),
    "kind_dict": ({"kind": {"a": 1}}, None, [("failed", "unknown_kind")], None),
    "kind_number": ({"kind": 7}, None, [("failed", "unknown_kind")], None),
    "meta_object": ({"meta": {"b": 1, "a": [1]}}, None, KEPT, lambda r: r["source_meta"] == '{"a": [1], "b": 1}'),
    "meta_number": ({"meta": 5}, None, KEPT, lambda r: r["source_meta"] == "5"),
    "deep_list": (b"[" * 100_000, None, [("failed", "bad_metadata")], bad("deeply")),
    "deep_object": (b'{"a":' * 100_000, None, [("failed", "bad_metadata")], bad("deeply")),
    "not_an_object": (b"[1, 2]", None, [("failed", "bad_metadata")], bad("not an object")),
    "invalid_json": (b'{"url": ', None, [("failed", "bad_metadata")], None),
    "nan_caption": (b'{"caption": NaN, "url": "http://x/a.jpg"}', None, KEPT, lambda r: r["text"] is None),
    "huge_int_elsewhere": (b'{"n": 1' + b"0" * 5000 + b', "caption": "c"}', None, KEPT, lambda r: r["text"] == "c"),
    "json_not_utf8": (b'{"caption": "\xff\xfe"}', None, [("failed", "bad_metadata")], bad("UTF-8")),
    "surrogate_caption": (b'{"caption": "\\ud800"}', None, [("failed", "bad_metadata")], bad("surrogate")),
    "txt_not_utf8": ({"caption": "c"}, b"caf\xe9", [("failed", "bad_text")], bad("UTF-8")),
    "txt_bom": ({}, b"\xef\xbb\xbfhello", KEPT, lambda r: r["text"] == "hello"),
    # video
    "probe_string": ({"kind": "video", "probe": "abc"}, None, [("failed", "bad_metadata")], bad("'probe'")),
    "probe_duration_string": ({"kind": "video", "probe": {"duration": "abc"}}, None, [("failed", "bad_metadata")],
                              bad("probe.duration")),
    "probe_huge_int": ({"kind": "video", "probe": {"width": 10 ** 30}}, None, [("failed", "bad_metadata")],
                       bad("probe.width")),
    "probe_negative": ({"kind": "video", "probe": {"height": -1}}, None, [("failed", "bad_metadata")], bad("height")),
    "probe_bool": ({"kind": "video", "probe": {"num_frames": True}}, None, [("failed", "bad_metadata")], None),
    "probe_fraction_frames": ({"kind": "video", "probe": {"num_frames": 2.5}}, None, [("failed", "bad_metadata")], None),
    "probe_overflow_float": (b'{"kind": "video", "probe": {"fps": 1e400}}', None, [("failed", "bad_metadata")],
                             bad("probe.fps")),
    "probe_codec_number": ({"kind": "video", "probe": {"codec": 5}}, None, [("failed", "bad_metadata")], bad("codec")),
    "probe_coerced": (b'{"kind": "video", "probe": {"duration": Infinity, "fps": 30, "width": 640.0, "codec": "h264"}}',
                      None, KEPT, lambda r: (r["duration"], r["fps"], r["width"], r["codec"]) == (None, 30.0, 640, "h264")
                      and isinstance(r["fps"], float) and isinstance(r["width"], int)),
    "video_no_sha256": ({"kind": "video", "probe": {"duration": 1.5}}, None, KEPT,
                        lambda r: r["sha256"] == hashlib.sha256(MP4).hexdigest() and r["duration"] == 1.5),
    "video_sha256_number": ({"kind": "video", "sha256": 12}, None, KEPT,
                            lambda r: r["sha256"] == hashlib.sha256(MP4).hexdigest()),
    # interleaved
    "missing_images_string": ({"kind": "interleaved", "missing_images": "x"}, None, [("failed", "bad_metadata")],
                              bad("missing_images")),
    "missing_images_numbers": ({"kind": "interleaved", "missing_images": [1]}, None, [("failed", "bad_metadata")], None),
    "items_not_list": ({"kind": "interleaved", "items": "abc"}, None, [("failed", "bad_metadata")], bad("items")),
    "items_not_objects": ({"kind": "interleaved", "items": [1, "a", None]}, None, [("failed", "bad_metadata")],
                          bad("items")),
    "doc_id_object": ({"kind": "interleaved", "doc_id": {"a": 1}}, None, [("failed", "bad_metadata")], bad("doc_id")),
    "doc_sha256_not_hex": ({"kind": "interleaved", "sha256": 123, "items": [{"type": "text", "text": "t"}]}, None, KEPT,
                           lambda r: len(r["doc_sha256"]) == 64 and r["num_images"] == 2),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_metadata(tmp_path, case):
    meta, txt, expected, check = META_CASES[case]
    kind = meta.get("kind") if isinstance(meta, dict) else ("video" if b'"video"' in meta else None)
    if kind == "video":
        members = sample("k", meta, image=False, txt=txt, kind_files=[("k.mp4", MP4)])
    elif kind == "interleaved":
        members = sample("k", meta, image=False, txt=txt, kind_files=[("k.0.jpg", JPG), ("k.1.png", JPG + b"2")])
    else:
        members = sample("k", meta, txt=txt)
    path = tmp_path / "s.tar"
    path.write_bytes(tar_of(members))
    out = read_all(path)
    assert outcome(out) == expected
    row, files = out[0]
    assert row["raw_key"] == "k" and row["raw_shard"] == "s.tar"
    if check is not None:
        assert check(row), row


# ------------------------------------------------------------------------- structure
def _two_samples_then(extra):
    return tar_of(sample("a", {"caption": "A"}) + list(extra) + sample("b", {"caption": "B"}))


def build_truncated(tmp_path, where, with_listing):
    keys = [f"{i:04d}" for i in range(5)]
    data = tar_of([m for k in keys for m in sample(k, {"caption": k})])
    off = offsets(data)
    cut = off["0002.json"][0] if where == "boundary" else off["0002.jpg"][1] + 20
    path = tmp_path / "t.tar"
    path.write_bytes(data[:cut])
    if with_listing:
        listing(path, keys + ["0009"], ["success"] * 5 + ["failed_to_download"])
    return path


def build_corrupt_gzip(tmp_path):
    keys = [f"{i:04d}" for i in range(4)]
    data = tar_of([m for k in keys for m in sample(k, {"caption": k})])
    cut = offsets(data)["0002.jpg"][0]
    path = tmp_path / "z.tar"
    path.write_bytes(gzip.compress(data[:cut]) + b"\x1f\x8b\x08\x00garbage-not-deflate" * 20)
    listing(path, keys)
    return path


def build_pax_bomb(tmp_path):
    pax = info("././@PaxHeader", 3 << 30, tarfile.XHDTYPE).tobuf(tarfile.USTAR_FORMAT)
    path = tmp_path / "p.tar"
    path.write_bytes(_strip_end(tar_of(sample("a", {}))) + pax + b"x" * 4096)
    return path


def _strip_end(data: bytes) -> bytes:
    """A tar without its end-of-archive blocks (and record padding)."""
    off = offsets(data)
    last = max(off.values())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        size = tar.getmembers()[-1].size
    return data[: last[1] + -(-size // 512) * 512]


def build_negative_size(tmp_path):
    hdr = bytearray(info("n.jpg", 10).tobuf(tarfile.GNU_FORMAT))
    hdr[124:136] = b"\xff" * 12  # base-256: -1
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    path = tmp_path / "n.tar"
    path.write_bytes(_strip_end(tar_of(sample("a", {}))) + bytes(hdr) + b"\0" * 2048)
    return path


def write(name, data):
    def build(tmp_path):
        path = tmp_path / name
        path.write_bytes(data() if callable(data) else data)
        return path
    return build


def with_listing(build, keys, statuses=None, col="key", uids=None):
    def wrapped(tmp_path):
        path = build(tmp_path)
        listing(path, keys, statuses, col, uids)
        return path
    return wrapped


GARBAGE = b"this is not a tar file\n" * 200
UID_A = "aaaaaaaaaaaaaaaa"
STRUCT_CASES = {
    # id: (build(tmp_path) -> path, caps, expected, check(rows))
    "symlink_only": (write("s.tar", tar_of([info("x.jpg", type_=tarfile.SYMTYPE, linkname="/etc/passwd")])),
                     None, [], None),
    "symlink_hardlink_beside_file": (
        write("s.tar", tar_of([("a.jpg", JPG), info("a.txt", type_=tarfile.SYMTYPE, linkname="../../etc/passwd"),
                               info("a.png", type_=tarfile.LNKTYPE, linkname="a.jpg")])),
        None, KEPT, lambda out: set(out[0][1]) == {"jpg"} and out[0][0]["text"] is None),
    "devices_fifos_dirs": (write("s.tar", tar_of([info("d.jpg", type_=tarfile.CHRTYPE), info("f.jpg", type_=tarfile.FIFOTYPE),
                                                  info("dir", type_=tarfile.DIRTYPE), info("b.jpg", type_=tarfile.BLKTYPE)])),
                           None, [], None),
    "path_tricks": (write("s.tar", tar_of([("../x.jpg", JPG), ("/abs/y.jpg", JPG), ("a/../../b.jpg", JPG)])),
                    None, KEPT * 3, lambda out: [r["raw_key"] for r, _ in out] == ["../x", "/abs/y", "a/../../b"]),
    "non_utf8_member_name": (write("s.tar", tar_of([("\udcff\udcfe.jpg", JPG)])), None, KEPT,
                             lambda out: out[0][0]["raw_key"] == "\\xff\\xfe"),
    "unicode_digit_image_names": (
        write("s.tar", tar_of([("k.\u00b2.jpg", JPG), ("k." + "9" * 5000 + ".jpg", JPG), ("k.1.jpg", JPG),
                               ("k.json", b'{"kind": "interleaved"}')], fmt=tarfile.PAX_FORMAT)),
        None, KEPT, lambda out: out[0][0]["media"] == ["1.jpg"]),
    "duplicate_key": (write("s.tar", tar_of(sample("a", {"uid": UID_A}) + sample("b", {}) + sample("a", {"uid": UID_A}))),
                      None, KEPT * 2 + [("failed", "duplicate_key")],
                      lambda out: len({r["uid"] for r, _ in out}) == 3 and out[0][0]["uid"] == UID_A
                      and out[2][0]["raw_key"] == "a" and out[2][1] == {}),
    "duplicate_member": (write("s.tar", tar_of([("a.jpg", JPG), ("a.jpg", JPG), ("a.json", b'{"uid": "%s"}' % UID_A.encode())])),
                         None, [("failed", "duplicate_member")], lambda out: out[0][0]["uid"] == UID_A),
    "member_too_large": (write("s.tar", _two_samples_then([("m.jpg", b"x" * 500), ("m.json", b'{"uid": "%s"}' % UID_A.encode())])),
                         ReadCaps(max_member_bytes=200), [("kept", None), ("failed", "member_too_large"), ("kept", None)],
                         lambda out: out[1][1] == {} and out[1][0]["uid"] == UID_A),
    "sample_too_large": (write("s.tar", _two_samples_then([("m.jpg", b"x" * 150), ("m.png", b"x" * 150)])),
                         ReadCaps(max_sample_bytes=250), [("kept", None), ("failed", "sample_too_large"), ("kept", None)],
                         None),
    "json_too_large": (write("s.tar", tar_of(sample("a", {"caption": "x" * 500}))), ReadCaps(max_json_bytes=100),
                       [("failed", "json_too_large")], None),
    "text_too_large": (write("s.tar", tar_of(sample("a", {}, txt=b"x" * 500))), ReadCaps(max_text_bytes=100),
                       [("failed", "text_too_large")], None),
    "too_many_members": (write("s.tar", tar_of([(f"a.{i}.jpg", JPG) for i in range(10)])),
                         ReadCaps(max_members_per_sample=4), [("failed", "too_many_members")], None),
    "truncated_boundary_no_listing": (lambda p: build_truncated(p, "boundary", False), None,
                                      KEPT * 2 + [("failed", "truncated_member")], None),
    "truncated_boundary_listing": (lambda p: build_truncated(p, "boundary", True), None,
                                   KEPT * 2 + [("failed", "truncated_member")] + [("failed", "missing_from_shard")] * 2,
                                   lambda out: [r["raw_key"] for r, _ in out] == ["0000", "0001", "0002", "0003", "0004"]),
    "truncated_mid_member_no_listing": (lambda p: build_truncated(p, "middle", False), None,
                                        KEPT * 2 + [("failed", "truncated_member")], None),
    "truncated_mid_member_listing": (lambda p: build_truncated(p, "middle", True), None,
                                     KEPT * 2 + [("failed", "truncated_member")] + [("failed", "missing_from_shard")] * 2,
                                     lambda out: "cut short" in out[3][0]["error"] or "end of data" in out[3][0]["error"]),
    "corrupt_gzip_listing": (build_corrupt_gzip, None,
                             KEPT + [("failed", "truncated_member")] + [("failed", "missing_from_shard")] * 2, None),
    "no_end_marker": (write("s.tar", lambda: _strip_end(tar_of(sample("a", {}) + sample("b", {})))), None,
                      KEPT + [("failed", "truncated_member")], None),
    "tar_shorter_than_listing": (with_listing(write("s.tar", tar_of(sample("a", {}))), ["a", "c", "b"]), None,
                                 KEPT + [("failed", "missing_from_shard")] * 2,
                                 lambda out: [r["raw_key"] for r, _ in out] == ["a", "b", "c"]),
    "listing_our_crawl_format": (
        with_listing(write("s.tar", tar_of(sample("0000000000", {}))), ["0000000000", None, "0000000002"],
                     ["kept", "failed", "kept"], col="raw_key", uids=["1111111111111111", "2222222222222222", UID_A]),
        None, KEPT + [("failed", "missing_from_shard")], lambda out: out[1][0]["uid"] == UID_A),
    "garbage_no_listing": (write("g.tar", GARBAGE), None, [("failed", "unreadable_shard")],
                           lambda out: out[0][0]["uid"] == make_uid(f"{SRC}/g.tar", "<shard>") and out[0][0]["raw_key"] is None),
    "garbage_with_listing": (with_listing(write("g.tar", GARBAGE), ["b", "a", "c"], ["success", "success", "failed_to_download"],
                                          uids=[None, UID_A, None]), None, [("failed", "unreadable_shard")] * 2,
                             lambda out: [r["raw_key"] for r, _ in out] == ["a", "b"] and out[0][0]["uid"] == UID_A
                             and out[1][0]["uid"] == make_uid(f"{SRC}/g.tar", "b")),
    "garbage_with_listing_of_nothing": (with_listing(write("g.tar", GARBAGE), ["a"], ["failed_to_download"]), None,
                                        [("failed", "unreadable_shard")], None),
    "garbage_listing_ignored": (lambda p: (write("s.tar", tar_of(sample("a", {})))(p),
                                           (p / "s.parquet").write_bytes(GARBAGE))[0], None, KEPT, None),
    "empty_file": (write("e.tar", b""), None, [("failed", "unreadable_shard")], None),
    "missing_file": (lambda p: p / "nope.tar", None, [("failed", "unreadable_shard")], None),
    "empty_tar": (write("s.tar", tar_of([])), None, [], None),
    "pax_header_claims_3gib": (build_pax_bomb, None, [("failed", "truncated_member")], None),
    "negative_size_header": (build_negative_size, None, [("failed", "truncated_member")],
                             lambda out: "negative size" in out[0][0]["error"]),
}


@pytest.mark.parametrize("case", list(STRUCT_CASES))
def test_structure(tmp_path, case):
    build, caps, expected, check = STRUCT_CASES[case]
    shards = tmp_path / "shards"
    shards.mkdir()
    path = build(shards)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = read_all(path, caps or ReadCaps())
    assert outcome(out) == expected
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted anywhere
    if check is not None:
        assert check(out), [r for r, _ in out]


# ----------------------------------------------------------------------- the others
def _gzip_tar_with_zeros(path, claimed: int, real: int, after: bool) -> None:
    """Sample a, then a member whose header claims `claimed` bytes and whose data is `real`
    zeros (gzip members concatenated: building costs nothing), then (if after) sample b."""
    zeros = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(_strip_end(tar_of(sample("a", {"caption": "A"})))))
        f.write(gzip.compress(info("bomb.mp4", claimed).tobuf(tarfile.GNU_FORMAT)))
        for _ in range(real // (16 << 20)):
            f.write(zeros)
        if after:
            f.write(gzip.compress(tar_of([("bomb.json", b'{"kind": "video"}')] + sample("b", {}))))


@pytest.mark.parametrize("claimed, real, caps, expected", [
    # the header claims 3 GiB (the stream ends after 64 MiB): refused from the header alone
    (3 << 30, 64 << 20, ReadCaps(), [("kept", None), ("failed", "member_too_large")]),
    # a real 64 MiB member over a 1 MiB cap: streamed through, the next sample is read
    (64 << 20, 64 << 20, ReadCaps(max_member_bytes=1 << 20), [("kept", None), ("failed", "member_too_large"), ("kept", None)]),
])
def test_gzip_bomb_is_skipped_in_bounded_memory(tmp_path, claimed, real, caps, expected):
    path = tmp_path / "bomb.tar.gz"
    _gzip_tar_with_zeros(path, claimed, real, after=claimed == real)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        out = read_all(path, caps)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome(out) == expected
    assert out[1][1] == {} and out[1][0]["raw_key"] == "bomb"
    assert peak < 50 << 20, peak


def _doc(key, images, text_items=()):
    items = [{"type": "image", "member": f"{i}.jpg"} for i in range(len(images))]
    items += [{"type": "text", "text": t} for t in text_items]
    return [(f"{key}.{i}.jpg", im) for i, im in enumerate(images)] + [
        (f"{key}.json", json.dumps({"kind": "interleaved", "items": items}).encode())]


def test_doc_sha256_covers_every_image_and_text(tmp_path):
    a, b, c = JPG + b"a", JPG + b"b", JPG + b"c"
    path = tmp_path / "d.tar"
    path.write_bytes(tar_of(_doc("d1", [a, b], ["t"]) + _doc("d2", [a, c], ["t"]) + _doc("d3", [a, b], ["t"])
                            + _doc("d4", [a, b], ["u"]) + _doc("d5", [b, a], ["t"])))
    out = read_all(path)
    assert outcome(out) == KEPT * 5
    digests = [r["doc_sha256"] for r, _ in out]
    assert all(isinstance(d, str) and len(d) == 64 for d in digests)
    assert digests[0] == digests[2]  # same content, same identity
    assert len({digests[0], digests[1], digests[3], digests[4]}) == 4  # a later image, the text, the order


def test_errors_do_not_leak_the_path(tmp_path, monkeypatch):
    secret = "s3cr3t-token-value"
    monkeypatch.setenv("CURATION_TEST_SECRET", secret)
    folder = tmp_path / secret
    folder.mkdir()
    (folder / "dir.tar").mkdir()  # opening it fails with an OSError that names the path
    (folder / "g.tar").write_bytes(GARBAGE)
    for name in ("dir.tar", "g.tar", "missing.tar"):
        out = read_all(folder / name)
        assert outcome(out) == [("failed", "unreadable_shard")]
        error = out[0][0]["error"]
        assert secret not in error and str(tmp_path) not in error and "\n" not in error and len(error) <= 300


def test_old_readers_are_strict(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(tar_of(sample("a", {}) + sample("b", {}, txt=b"t")))
    assert scan_keys(good) == ["a", "b"]
    assert [(k, sorted(f)) for k, f in iter_samples(good)] == [("a", ["jpg", "json"]), ("b", ["jpg", "json", "txt"])]
    dup = tmp_path / "dup.tar"
    dup.write_bytes(tar_of(sample("a", {}) + sample("b", {}) + sample("a", {})))
    with pytest.raises(InputError, match="not contiguous"):
        scan_keys(dup)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError):
        scan_keys(cut)
    with pytest.raises(InputError):
        list(iter_samples(cut))
