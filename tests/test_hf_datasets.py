"""Every tier folder loads in Hugging Face `datasets` by its path alone, through the
dataset card (README.md) the run writes beside the manifest: the media come from the
tars (never the parquet sidecars), with images as PIL, a document's images in order,
and a video's clip bytes."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.tiers.card import CARD_NAME, card_text, write_card
from curation.tiers.verify import verify
from curation.tiers.writer import tier_media, write_shard

datasets = pytest.importorskip("datasets")


def tar_members(tier_dir: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    """{sample key: {member name: bytes}} of every shard, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(tier_dir / shard["name"]) as tf:
            for m in tf.getmembers():
                key, _, name = m.name.partition(".")
                samples.setdefault(key, {})[name] = tf.extractfile(m).read()
    return samples


def load(tier_dir: Path, cache: Path):
    return datasets.load_dataset(str(tier_dir), split="train", cache_dir=str(cache))


@pytest.fixture(scope="module")
def tiers(demo_out, tmp_path_factory) -> dict[str, tuple[Path, dict, object]]:
    """{tier: (folder, manifest, the loaded train split)} for every tier of the demo."""
    cache = tmp_path_factory.mktemp("hf_cache")
    out = {}
    for tier_dir in sorted(p for p in (demo_out / "curated" / "tiers").iterdir() if p.is_dir()):
        manifest = json.loads((tier_dir / "manifest.json").read_text())
        out[tier_dir.name] = (tier_dir, manifest, load(tier_dir, cache) if manifest["num_samples"] else None)
    return out


def kinds_of(tier):
    _, manifest, ds = tier
    return {row["kind"] for row in ds["json"]} if ds is not None else set()


def test_every_tier_loads_its_tars_by_path_with_the_manifests_count(tiers):
    assert {"documents", "video", "alignment"} <= set(tiers)
    for name, (tier_dir, manifest, ds) in tiers.items():
        assert (tier_dir / CARD_NAME).is_file(), name
        if ds is None:
            continue
        assert ds.num_rows == manifest["num_samples"], name
        # The media rows, not the sidecar's columns at top level.
        assert {"json", "txt", "__key__"} <= set(ds.column_names) and "uid" not in ds.column_names, name
        sidecar_keys = [k for s in manifest["shards"] for k in pq.read_table(tier_dir / s["sidecar"], columns=["key"])
                        .column("key").to_pylist()]
        assert ds["__key__"] == sidecar_keys, name  # shard order, then tar order
        assert all(r["tier"] == name for r in ds["json"]), name


def test_image_tiers_decode_to_pil_with_the_tars_pixels(tiers):
    seen = 0
    for name, tier in tiers.items():
        tier_dir, manifest, ds = tier
        if kinds_of(tier) != {"image_text"}:
            continue
        assert isinstance(ds.features["jpg"], datasets.Image) and isinstance(ds.features["webp"], datasets.Image)
        members = tar_members(tier_dir, manifest)
        for row in ds.select(range(min(10, ds.num_rows))):
            (ext,) = row["json"]["media"]
            assert [e for e in ("jpg", "png", "webp") if row[e] is not None] == [ext], (name, row["__key__"])
            image = row[ext]
            assert isinstance(image, Image.Image)
            assert image.size == (row["json"]["width"], row["json"]["height"])
            assert image.tobytes() == Image.open(io.BytesIO(members[row["__key__"]][ext])).tobytes()
            assert row["txt"] == members[row["__key__"]]["txt"].decode()
            seen += 1
    assert seen


def test_documents_give_their_images_in_order_with_the_json(tiers):
    tier_dir, manifest, ds = tiers["documents"]
    assert kinds_of(tiers["documents"]) == {"interleaved"}
    members = tar_members(tier_dir, manifest)
    declared_images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    most = 0
    for row in ds:
        names = row["json"]["media"]
        assert names == [f"{i}.{n.split('.', 1)[1]}" for i, n in enumerate(names)]  # 0.<ext>, 1.<ext>, ...
        assert len(names) == row["json"]["num_images"]
        images = [row[m] for m in names]
        assert all(isinstance(im, Image.Image) for im in images)
        for member, image in zip(names, images):
            assert image.tobytes() == Image.open(io.BytesIO(members[row["__key__"]][member])).tobytes()
        # Columns of other documents' members are None here, never stale images.
        assert all(row[c] is None for c in declared_images if c not in names)
        # The document's image items name the members, in the same order.
        items = row["json"]["doc"]["items"]
        assert [it["member"] for it in items if it.get("type") == "image" and it.get("member")] == names
        most = max(most, len(names))
    assert most >= 2  # the demo has multi-image documents: variable member sets load


def test_video_rows_give_the_clip_bytes(tiers):
    tier_dir, manifest, ds = tiers["video"]
    assert kinds_of(tiers["video"]) == {"video"}
    assert isinstance(ds.features["mp4"], datasets.Video) and isinstance(ds.features["webm"], datasets.Video)
    members = tar_members(tier_dir, manifest)
    for row in ds:
        (ext,) = row["json"]["media"]
        clip = row[ext]
        assert clip["bytes"] == members[row["__key__"]][ext]
        assert clip["path"] == f"{row['__key__']}.{ext}"
        assert row["mp4" if ext == "webm" else "webm"] is None
        assert row["json"]["duration"] > 0


def test_card_is_deterministic_and_verify_ignores_it(demo_out, tiers):
    for name, (tier_dir, manifest, _) in tiers.items():
        text = (tier_dir / CARD_NAME).read_text()
        assert text == card_text(tier_dir, manifest), name  # derived from manifest + sidecars only
        assert f"{manifest['num_samples']} samples" in text and manifest["pipeline"] in text
    checked, problems = verify(demo_out / "curated")
    assert checked and problems == []


def _image(fmt: str, colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, fmt)
    return buf.getvalue()


def _webm(frames: int = 6) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=6)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_image(Image.new("RGB", (32, 24), (i * 40, 90, 200)))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _row(key: str, kind: str, names: list[str], text: str | None = None) -> dict:
    row = {"uid": key, "key": key, "kind": kind, "source": "test", "status": "kept", "tier": "mixed",
           "shard": "mixed-000000", "sha256": "0" * 64, "width": 6, "height": 4, "pipeline": "p",
           "config_hash": "0123456789abcdef", "op_versions": {"decode_image": "1"}, "text": text, "media": names,
           "source_meta": '{"license": "cc-by"}'}
    if kind == "interleaved":
        row["doc"] = {"doc_id": None, "items": [{"type": "image", "member": n} for n in names]}
    return row


def test_mixed_member_sets_and_webm_load_and_an_empty_tier_says_so(tmp_path):
    """One tier, written by the tier writer, mixing kinds and formats: documents with
    different member sets (png+jpg, then jpg+webp+jpg), a PNG image and a WebM clip."""
    raw = {"00000000000000d1": ("interleaved", {"a.png": _image("PNG", "red"), "b.jpg": _image("JPEG", "blue")}),
           "00000000000000d2": ("interleaved", {"a.jpg": _image("JPEG", "red"), "b.webp": _image("WEBP", "green"),
                                  "c.jpg": _image("JPEG", "blue")}),
           "00000000000000a1": ("image_text", {"png": _image("PNG", "white")}),
           "00000000000000b1": ("video", {"webm": _webm()})}
    tier_dir = tmp_path / "mixed"
    tier_dir.mkdir()
    rows, media = [], []
    for key, (kind, files) in raw.items():
        row = _row(key, kind, list(files), text=f"about {key}")
        media.append(tier_media(row, files))
        rows.append(row)
    entry = write_shard(tier_dir / "mixed-000000.tar", rows, media)
    manifest = {"tier": "mixed", "pipeline": "p", "config_hash": "0123456789abcdef", "recipe_version": 1,
                "curation_version": "0", "seed": 0, "num_samples": entry["samples"], "num_bytes": entry["bytes"], "shards": [entry]}
    write_card(tier_dir, manifest)

    ds = load(tier_dir, tmp_path / "cache")
    assert ds.num_rows == 4 and ds["__key__"] == list(raw)
    media_columns = [c for c in ds.column_names if c not in ("txt", "json", "__key__", "__url__")]
    assert media_columns == ["jpg", "png", "webp", "mp4", "webm", "0.jpg", "0.png", "1.jpg", "1.webp", "2.jpg"]
    for row, members in zip(ds, media):
        assert {c for c in media_columns if row[c] is not None} == {name for name, _ in members}
        assert row["json"]["media"] == [name for name, _ in members]  # the order to read them in
        # maps and JSON columns come back decoded (datasets' Json feature)
        assert row["json"]["op_versions"] == {"decode_image": "1"} and row["json"]["source_meta"] == {"license": "cc-by"}
        for name, data in members:
            if name == "webm":
                assert row[name]["bytes"] == data
            else:
                assert row[name].tobytes() == Image.open(io.BytesIO(data)).tobytes()
        assert row["txt"] == f"about {row['__key__']}"
    assert ds[3]["json"]["codec"] == "vp8" and ds[3]["json"]["num_frames"] == 6
    first = (tier_dir / CARD_NAME).read_bytes()
    write_card(tier_dir, manifest)
    assert (tier_dir / CARD_NAME).read_bytes() == first  # same inputs, same bytes

    empty = tmp_path / "empty"
    empty.mkdir()
    write_card(empty, {**manifest, "tier": "empty", "num_samples": 0, "num_bytes": 0, "shards": []})
    assert "no samples" in (empty / CARD_NAME).read_text()
