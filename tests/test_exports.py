"""`curate export FORMAT`: each format is read back by its trainer's documented rules
(LLaVA-NeXT's data YAML and conversations, LLaMA-Factory's dataset_info + sharegpt
checks, a `datasets` ImageFolder for chat messages, nanoVLM's Cauldron parquet), for a
tier and a stage of the demo, and for a tier full of hostile names."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from curation.errors import InputError
from curation.rawshards import iter_samples
from curation.tiers.export import FORMATS, export
from curation.tiers.export.core import Part, conversation, media_order

from .conftest import curate

PLACEHOLDER = {"llava": {"image": "<image>", "video": "<image>"}, "sharegpt": {"image": "<image>", "video": "<video>"}}


# --------------------------------------------------------------------------- reading back
def _relative_inside(rel: str, base: Path) -> Path:
    assert isinstance(rel, str) and not os.path.isabs(rel) and ".." not in Path(rel).parts, rel
    path = base / rel
    assert path.resolve().is_relative_to(base.resolve()) and path.is_file(), rel
    return path


def _alternates(roles: list[str], user: str, assistant: str) -> bool:
    return len(roles) >= 2 and len(roles) % 2 == 0 and roles == [user, assistant] * (len(roles) // 2)


def read_llava(out: Path, name: str, **_) -> list[dict]:
    """LLaVA-NeXT: the YAML's json_paths (relative to it), each a list of records whose
    `<image>` count is the number of images (or 1 for a video)."""
    data_yaml = yaml.safe_load((out / f"{name}.yaml").read_text())
    records = []
    for entry in data_yaml["datasets"]:
        assert set(entry) == {"json_path", "sampling_strategy"}
        for r in json.loads(_relative_inside(entry["json_path"], out).read_text()):
            turns = r["conversations"]
            assert _alternates([t["from"] for t in turns], "human", "gpt") and turns[-1]["value"]
            if "video" in r:
                media = [("video", _relative_inside(r["video"], out))]
            else:
                images = [r["image"]] if isinstance(r["image"], str) else r["image"]
                media = [("image", _relative_inside(rel, out)) for rel in images]
            assert sum(t["value"].count("<image>") for t in turns) == len(media) >= 1  # each <image> has its media
            records.append({"id": r["id"], "text": "\n".join(t["value"] for t in turns), "media": media})
    return records


def read_sharegpt(out: Path, name: str, cache: Path) -> list[dict]:
    """LLaMA-Factory: the dataset_info entry names a file in dataset_dir and columns that
    exist; turns alternate user/assistant by the entry's tags; `<image>` count ==
    len(images), `<video>` count == len(videos); media found under dataset_dir."""
    from datasets import load_dataset

    entry = json.loads((out / "dataset_info.json").read_text())[name]
    assert entry["formatting"] == "sharegpt"
    ds = load_dataset("json", data_files=str(_relative_inside(entry["file_name"], out)), split="train", cache_dir=str(cache))
    assert set(entry["columns"].values()) <= set(ds.column_names)
    cols, tags = entry["columns"], entry["tags"]
    records = []
    for r in ds:
        turns = r[cols["messages"]]
        assert _alternates([t[tags["role_tag"]] for t in turns], tags["user_tag"], tags["assistant_tag"])
        texts = [t[tags["content_tag"]] for t in turns]
        images, videos = r[cols["images"]] or [], r[cols["videos"]] or []
        assert sum(t.count("<image>") for t in texts) == len(images)
        assert sum(t.count("<video>") for t in texts) == len(videos) and len(images) + len(videos) >= 1
        media = [("image", _relative_inside(p, out)) for p in images] + [("video", _relative_inside(p, out)) for p in videos]
        records.append({"id": r["id"], "text": "\n".join(texts).replace("<video>", "<image>"), "media": media})
    return records


def read_messages(out: Path, name: str, cache: Path) -> list[dict]:
    """A datasets ImageFolder: `images` decode, one per {type: image} item, in order; the
    same rows read as plain JSON lines hold paths relative to metadata.jsonl."""
    from datasets import load_dataset

    folder = out / name
    ds = load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache / "if"))
    plain = load_dataset("json", data_files=str(folder / "metadata.jsonl"), split="train", cache_dir=str(cache / "js"))
    records = []
    for r, p in zip(ds, plain):
        assert r["id"] == p["id"] and _alternates([m["role"] for m in r["messages"]], "user", "assistant")
        items = [c for m in r["messages"] for c in m["content"]]
        assert sum(c["type"] == "image" for c in items) == len(r["images"]) == len(p["file_names"]) >= 1
        assert all(img.size[0] > 0 for img in r["images"])  # decoded PIL images
        text = "\n".join("\n".join(c["text"] if c["type"] == "text" else "<image>" for c in m["content"])
                         for m in r["messages"])
        records.append({"id": r["id"], "text": text,
                        "media": [("image", _relative_inside(f, folder)) for f in p["file_names"]]})
    return records


def read_cauldron(out: Path, name: str, cache: Path) -> list[dict]:
    """nanoVLM / Cauldron: `images` decode as a list of Image features; `texts` are
    {user, assistant} turns with no placeholder (the images go before the first one)."""
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out / name / "*.parquet"), split="train", cache_dir=str(cache))
    assert type(ds.features["images"]).__name__ in ("List", "Sequence", "list")
    records = []
    for r in ds:
        assert r["images"] and all(isinstance(img, Image.Image) and img.size[0] > 0 for img in r["images"])
        assert r["texts"] and all(t["user"] and t["assistant"] and "<image>" not in t["user"] + t["assistant"]
                                  for t in r["texts"])
        records.append({"id": r["id"], "text": "\n".join(t["user"] + "\n" + t["assistant"] for t in r["texts"]),
                        "media": [("image", img) for img in r["images"]]})
    return records


READERS = {"llava": read_llava, "sharegpt": read_sharegpt, "messages": read_messages, "cauldron": read_cauldron}
IMAGES_ONLY = {"messages", "cauldron"}


def test_every_format_has_a_reader():
    assert set(READERS) == set(FORMATS)


# --------------------------------------------------------------------------- conversations
DOC = {"items": [{"type": "text", "text": "Intro."}, {"type": "image", "member": "1.jpg"},
                  {"type": "image", "member": None},  # an image that never arrived
                  {"type": "text", "text": "About one <image> here."}, {"type": "image", "member": "0.jpg"},
                  {"type": "text", "text": "About zero."}, {"type": "text", "text": "More."}]}


def _flat(turns, tokens={"image": "<image>", "video": "<video>"}):
    return [(t.role, t.text(tokens)) for t in turns]


def test_a_document_keeps_its_order_and_text_cannot_add_placeholders():
    turns = conversation("interleaved", "whole text", None, DOC, ["0.jpg", "1.jpg"])
    assert _flat(turns) == [("user", "Intro.\n<image>"), ("assistant", "About one image here."),
                            ("user", "<image>"), ("assistant", "About zero.\nMore.")]
    assert media_order(turns) == [1, 0]  # the record lists media in placeholder order
    # formats that cannot place images inside text: media first, the sample's text answers
    flat = conversation("interleaved", "whole <video> text", None, DOC, ["0.jpg", "1.jpg"], interleave=False)
    assert _flat(flat) == [("user", "<image>\n<image>\nDescribe the images in order."), ("assistant", "whole video text")]


@pytest.mark.parametrize("items", [
    [{"type": "text", "text": "a"}, {"type": "image", "member": "0.jpg"}],  # ends with an image
    [{"type": "image", "member": "0.jpg"}, {"type": "text", "text": "a"}],  # 1.jpg never placed
    [{"type": "image", "member": "0.jpg"}, {"type": "image", "member": "0.jpg"}, {"type": "text", "text": "a"}],
    [{"type": "image", "member": "../x.jpg"}, {"type": "image", "member": "1.jpg"}, {"type": "text", "text": "a"}],
    ["not an item"],
])
def test_a_document_that_does_not_add_up_is_not_interleaved(items):
    turns = conversation("interleaved", "t", None, {"items": items}, ["0.jpg", "1.jpg"])
    assert _flat(turns) == [("user", "<image>\n<image>\nDescribe the images in order."), ("assistant", "t")]


def test_question_answer_pairs_become_turns_with_the_media_first():
    meta = json.dumps({"qa": json.dumps([{"q": "How many?", "a": "two"}, {"q": 3, "a": "x"}, {"q": "Colour?", "a": "red"}])})
    turns = conversation("video", "cap", meta, None, ["mp4"])
    assert _flat(turns) == [("user", "<video>\nHow many?"), ("assistant", "two"), ("user", "Colour?"), ("assistant", "red")]
    assert turns[0].parts[0] == Part("video", media=0)


# --------------------------------------------------------------------------- the demo
def _demo_tier(demo_out, tier) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((demo_out / "curated" / "tiers" / tier).glob("*.parquet")))


def _check_documents(fmt, records, demo_out):
    """Each document as the format holds it: its text and images in the document's order
    (or, where the format cannot place images, its text after its images in order), and
    the very bytes of its tar members."""
    docs = {r["uid"]: r for r in _demo_tier(demo_out, "documents").to_dict("records")}
    members = {}
    for tar in sorted((demo_out / "curated" / "tiers" / "documents").glob("*.tar")):
        members.update(dict(iter_samples(tar)))
    checked = 0
    for rec in records:
        if rec["id"] not in docs:
            continue
        row, files = docs[rec["id"]], members[docs[rec["id"]]["key"]]
        items = [it for it in row["doc"]["items"] if it["type"] == "text" or it.get("member")]
        if fmt == "cauldron":
            order = list(row["media"])
            assert rec["text"] == "Describe the images in order.\n" + row["text"]
        else:
            order = [it["member"] for it in items if it["type"] == "image"]
            assert rec["text"] == "\n".join(it["text"] if it["type"] == "text" else "<image>" for it in items)
        for (_, media), member in zip(rec["media"], order, strict=True):
            if isinstance(media, Path):
                assert media.read_bytes() == files[member]
            else:
                assert media.tobytes() == Image.open(io.BytesIO(files[member])).tobytes()
        checked += 1
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_tier_round_trips(demo_out, tmp_path, fmt):
    out = tmp_path / fmt
    for tier in ("alignment", "documents", "video"):
        result = export(fmt, demo_out, out, tier=tier)
        if fmt == "llava" and tier == "alignment":  # the CLI, with a strategy for LLaVA-NeXT to apply
            curate("export", "llava", "--root", demo_out, "--tier", tier, "--out", out, "--sampling-strategy", "random:50%")
            assert yaml.safe_load((out / "alignment.yaml").read_text()) == {
                "datasets": [{"json_path": "alignment.json", "sampling_strategy": "random:50%"}]}
        assert not result["skipped"]
        rows = _demo_tier(demo_out, tier)
        if fmt in IMAGES_ONLY and tier == "video":  # nothing to load: every clip is left out, and said so
            assert result["records"] == 0 and sum(result["left_out"].values()) == len(rows) > 0
            continue
        records = READERS[fmt](out, tier, cache=tmp_path / f"cache-{tier}")
        assert sorted(r["id"] for r in records) == sorted(rows["uid"])
        if tier == "alignment":  # the demo's question/answer pairs became multi-turn conversations
            assert any(r["text"].count("\n") > 2 for r in records)
        if tier == "video" and fmt in PLACEHOLDER:
            import av

            with av.open(str(records[0]["media"][0][1])) as container:
                assert next(container.decode(video=0)).width > 0
    documents = READERS[fmt](out, "documents", cache=tmp_path / "cache-docs")
    assert _check_documents(fmt, documents, demo_out) == len(_demo_tier(demo_out, "documents")) > 0
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and all(not p.is_symlink() and p.resolve().is_relative_to(out.resolve()) for p in written)
    assert not [p for p in written if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_stage_holds_the_pipelines_mix(demo_out, tmp_path, fmt):
    from curation import config
    from curation.tiers.plan import make_plan

    out = tmp_path / fmt
    proc = curate("export", fmt, "--root", demo_out, "--stage", "stage2_onevision", "--out", out)
    assert "stage stage2_onevision" in proc.stdout
    cfg = config.load("demo")
    stage = next(s for s in make_plan(cfg, demo_out)["stages"] if s["name"] == "stage2_onevision")
    records = READERS[fmt](out, "stage2_onevision", cache=tmp_path / "cache")
    if fmt == "llava":  # every tier whole; LLaVA-NeXT samples by the YAML's strategies
        data_yaml = yaml.safe_load((out / "stage2_onevision.yaml").read_text())
        assert data_yaml["datasets"] == [{"json_path": f"{m['tier']}.json", "sampling_strategy": m["strategy"]}
                                         for m in stage["mix"]]
        expected = [uid for m in stage["mix"] for uid in _demo_tier(demo_out, m["tier"])["uid"]]
    else:  # exactly the plan's selection, tier after tier
        expected = []
        for m in stage["mix"]:
            rows = _demo_tier(demo_out, m["tier"])
            if fmt in IMAGES_ONLY:
                rows = rows[rows["kind"] != "video"]
            for shard, keys in m["shards"].items():
                in_shard = rows[rows["shard"] == shard]
                expected += list(in_shard["uid"] if keys is None else in_shard.set_index("key").loc[keys, "uid"])
        videos = sum(m["samples"] for m in stage["mix"] if m["tier"] == "video") if fmt in IMAGES_ONLY else 0
        assert len(expected) == stage["totals"]["samples"] - videos
    assert sorted(r["id"] for r in records) == sorted(expected)
    assert _check_documents(fmt, records, demo_out) == len(_demo_tier(demo_out, "documents"))


# --------------------------------------------------------------------------- hostile tiers
def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def hostile_root(tmp_path):
    """A run output whose one tier mixes good samples (a real JPEG whose caption holds
    `<image>`, a two-image document, a clip) with names that climb out of any folder."""
    root = tmp_path / "run"
    tier = root / "tiers" / "alignment"
    tier.mkdir(parents=True)
    pd.DataFrame({"uid": ["u1"], "status": ["kept"]}).to_parquet(root / "ledger.parquet")
    doc = {"items": [{"type": "text", "text": "Doc."}, {"type": "image", "member": "0.jpg"},
                     {"type": "text", "text": "First."}, {"type": "image", "member": "1.jpg"},
                     {"type": "text", "text": "Second."}]}
    rows = [  # uid, key, kind, media, doc
        ("u1", "u1", "image_text", ["jpg"], None),
        ("d1", "d1", "interleaved", ["0.jpg", "1.jpg"], doc),
        ("u5", "../../evil", "image_text", ["jpg"], None),
        ("u6", "/tmp/abs_evil", "image_text", ["jpg"], None),
        ("u7", "k7", "interleaved", ["0.jpg", "../../../x.jpg"], None),
        ("u8", "k8", "image_text", ["jp\u0000g"], None),
        ("u9", "k9", "video", ["../../clip.mp4"], None),
        ("u10", "k10", "video", ["mp4"], None),
        ("u11", "k11", "image_text", [], None),
        ("u12", "k12", "image_text", ["jpg", "png"], None),
    ]
    pd.DataFrame({"uid": [r[0] for r in rows], "key": [r[1] for r in rows], "kind": [r[2] for r in rows],
                  "media": [r[3] for r in rows], "doc": [r[4] for r in rows], "tier": "alignment",
                  "shard": "alignment-000000.tar", "text": ["a <image> caption"] + ["a caption"] * (len(rows) - 1),
                  "source_meta": [None] * len(rows), "width": 16, "height": 12, "num_images": None, "num_frames": None}
                 ).to_parquet(tier / "alignment-000000.parquet")
    _tar(tier / "alignment-000000.tar", [
        ("u1.jpg", _jpeg("red")), ("d1.0.jpg", _jpeg("green")), ("d1.1.jpg", _jpeg("blue")),
        ("../../evil.jpg", b"EVIL"), ("/tmp/abs_evil.jpg", b"EVIL"), ("k7.0.jpg", _jpeg("red")),
        ("k7.../../../x.jpg", b"EVIL"), ("k8.jpg", b"JPEG8"), ("k9.mp4", b"EVIL"), ("k10.mp4", b"MP4"),
        ("k11.jpg", b"JPEG11"), ("k12.jpg", _jpeg("red")), ("k12.png", b"PNG"), ("stray.jpg", b"EVIL")])
    (tier / "manifest.json").write_text(json.dumps({"tier": "alignment", "config_hash": "abc", "shards": [
        {"name": "alignment-000000.tar", "sidecar": "alignment-000000.parquet", "samples": 10},
        {"name": "../../../../etc/passwd", "sidecar": "x.parquet", "samples": 0}]}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "name": "t", "ops": [{"op": "decode_image"}], "tiers": [{"name": "alignment", "where": "true"}],
        "stages": [{"name": "mixed", "mix": [{"tier": "alignment", "strategy": "all"}]},
                   {"name": "../escape", "mix": [{"tier": "alignment", "strategy": "first:1"}]}]}))
    return root


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_hostile_names_are_skipped_and_nothing_leaves_out(hostile_root, tmp_path, fmt):
    out = tmp_path / "deep" / "out"
    result = export(fmt, hostile_root, out, stage="mixed", pipeline=tmp_path / "pipeline.yaml")
    records = READERS[fmt](out, "mixed", cache=tmp_path / "cache")
    kept = {"u1", "d1"} | (set() if fmt in IMAGES_ONLY else {"u10"})
    assert sorted(r["id"] for r in records) == sorted(kept) and result["records"] == len(kept)
    u1 = next(r for r in records if r["id"] == "u1")
    assert "a image caption" in u1["text"]  # the caption's <image> is text, not a placeholder
    reasons = {s["key"]: s["reason"] for s in result["skipped"]}
    assert "unsafe key" in reasons["'../../evil'"] and "unsafe key" in reasons["'/tmp/abs_evil'"]
    assert "unsafe media name" in reasons["'k7'"] and "\\x00" in reasons["'k8'"]  # shown escaped, never raw
    assert "unsafe media name" in reasons["'k9'"] and "no media listed" in reasons["'k11'"]
    assert "lists 2 media" in reasons["'k12'"] and "not in the sidecar" in reasons["'stray'"]
    assert any(s["key"] is None and "unsafe shard name" in s["reason"] for s in result["skipped"])
    if fmt in IMAGES_ONLY:
        assert result["left_out"] == {f"video: the {fmt} format holds images only": 1}
    assert result["notes"]  # the tier's config hash is not the pipeline's
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - set(hostile_root.rglob("*"))
    written -= {tmp_path / "pipeline.yaml"} | set((tmp_path / "cache").rglob("*"))
    assert written and all(p.is_relative_to(out) for p in written), written
    assert not list(tmp_path.rglob("*evil*")) and not list(tmp_path.rglob("clip.mp4"))


@pytest.mark.parametrize("fmt, data_file", [("llava", "alignment.json"), ("sharegpt", "alignment.jsonl"),
                                            ("messages", "alignment/metadata.jsonl"),
                                            ("cauldron", "alignment/alignment-00000.parquet")])
def test_planted_symlinks_are_not_followed(hostile_root, tmp_path, fmt, data_file):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    (out / data_file).parent.mkdir(parents=True, exist_ok=True)
    (out / data_file).symlink_to(victim)  # a data file that points outside: replaced, never written through
    media_dir = out / ("alignment/images" if fmt == "messages" else "images")
    media_dir.mkdir(parents=True, exist_ok=True)
    (media_dir / "alignment").symlink_to(elsewhere, target_is_directory=True)  # a media folder that leaves out
    result = export(fmt, hostile_root, out, tier="alignment")
    assert victim.read_text() == "keep me" and sorted(p.name for p in elsewhere.iterdir()) == ["victim.txt"]
    assert not (out / data_file).is_symlink() and (out / data_file).is_file()
    # the images that would have gone through the planted folder are skipped; a clip (its own
    # folder) stays where the format holds clips, and cauldron keeps its images inside the parquet
    assert result["records"] == {"llava": 1, "sharegpt": 1, "messages": 0, "cauldron": 2}[fmt]
    if fmt != "cauldron":
        assert {s["key"]: s["reason"] for s in result["skipped"]}.keys() >= {"'u1'", "'d1'"}
        assert all("leaves" in s["reason"] for s in result["skipped"] if s["key"] in ("'u1'", "'d1'"))


def test_bad_requests_are_refused_before_anything_is_written(hostile_root, tmp_path):
    out = tmp_path / "o"
    pipeline = tmp_path / "pipeline.yaml"
    with pytest.raises(InputError, match="goes into llava's data YAML"):
        export("sharegpt", hostile_root, out, tier="alignment", sampling_strategy="random:10")
    with pytest.raises(InputError, match="no stage 'nope'.*'mixed'"):
        export("llava", hostile_root, out, stage="nope", pipeline=pipeline)
    with pytest.raises(InputError, match="cannot name a file"):
        export("messages", hostile_root, out, stage="../escape", pipeline=pipeline)
    with pytest.raises(InputError, match="not a tier name"):
        export("cauldron", hostile_root, out, tier="../alignment")
    with pytest.raises(InputError, match="exactly one of --tier or --stage"):
        export("llava", hostile_root, out, tier="alignment", stage="mixed", pipeline=pipeline)
    with pytest.raises(InputError, match="name the pipeline"):
        export("llava", hostile_root, out, stage="mixed")
    assert not out.exists()


def test_a_re_export_keeps_other_datasets_and_drops_stale_files(hostile_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    export("sharegpt", hostile_root, out, tier="alignment")
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"mine", "alignment"} and info["alignment"]["file_name"] == "alignment.jsonl"
    (out / "alignment").mkdir()
    (out / "alignment" / "alignment-00007.parquet").write_bytes(b"stale")  # from an earlier, larger export
    (out / "alignment" / "notes.parquet").write_bytes(b"not ours")
    export("cauldron", hostile_root, out, tier="alignment")
    assert sorted(p.name for p in (out / "alignment").iterdir()) == ["alignment-00000.parquet", "notes.parquet"]
    (out / "dataset_info.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        export("sharegpt", hostile_root, out, tier="alignment")
    assert re.fullmatch(r"\[1, 2\]", (out / "dataset_info.json").read_text())
