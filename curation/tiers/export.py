"""`curate export llava`: a tier as LLaVA-NeXT training data.

Writes, under OUT:
  <tier>.json            [{id, image | video, conversations: [{from: human|gpt, value}]}]
  <tier>.yaml            datasets: [{json_path, sampling_strategy}] (what LLaVA-NeXT's scripts read)
  images/<tier>/...      the images, where the JSON points (pass OUT/images as image_folder)
  videos/<tier>/...      the clips (pass OUT/videos as video_folder)

Conversations: a sample's question/answer pairs when its source carried them (the demo's
`qa`), else the caption as the answer to a describe prompt. A document gets one
`<image>` per image, in order; a video gets one `<image>` for the clip.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..catalog import find_run_root
from ..errors import InputError
from ..fsutil import atomic_write_text
from ..rawshards import iter_samples

IMAGE = "<image>"
DESCRIBE = {"image_text": "Describe the image briefly.", "interleaved": "Describe the images in order.",
            "video": "Describe what happens in the video."}

# Every path written is built from names that come from data (tar member names, sidecar
# keys and media lists, manifest entries). Each must be one plain file name: no
# separators, no `..`, no NUL, nothing absolute; and the result must resolve inside
# its output folder. A sample that fails is skipped and reported, never written.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TIER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")  # as config.TIER_NAME, bounded
IMAGE_MEDIA = re.compile(r"^(?:[0-9]{1,6}\.)?(?:jpg|jpeg|png|webp)$")
VIDEO_MEDIA = re.compile(r"^(?:mp4|webm)$")
STRATEGY = re.compile(r"^(all|(first|end|random):(\d+%?))$")


class UnsafeSample(ValueError):
    """A sample whose names would leave the output folder, or that does not add up."""


def _safe(value, what: str, pattern: re.Pattern = SAFE_NAME) -> str:
    if not isinstance(value, str) or ".." in value or not pattern.match(value):
        raise UnsafeSample(f"unsafe {what} {_shown(value)}")
    return value


def _shown(value) -> str:
    """A name from data, printable whatever it holds (ascii() escapes control characters)."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _inside(root: Path, rel: str) -> Path:
    """root/rel, after checking that it resolves (symlinks included) inside root."""
    target = root / rel
    resolved, base = target.resolve(), root.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise UnsafeSample(f"path {_shown(rel)} leaves {root}")
    return target


def _qa(source_meta: str | None) -> list[dict]:
    if not source_meta:
        return []
    try:
        meta = json.loads(source_meta)
        qa = meta.get("qa") if isinstance(meta, dict) else None
        qa = json.loads(qa) if isinstance(qa, str) else qa
    except ValueError:  # metadata from a crawl is data: a bad field means no pairs, not a crash
        return []
    if not isinstance(qa, list):
        return []
    return [p for p in qa if isinstance(p, dict) and p.get("q") and p.get("a")]


def conversations(kind: str, text: str | None, source_meta: str | None, n_images: int) -> list[dict]:
    placeholders = "\n".join([IMAGE] * n_images)
    pairs = _qa(source_meta)
    if not pairs:
        pairs = [{"q": DESCRIBE[kind], "a": text or ""}]
    turns = []
    for i, pair in enumerate(pairs):
        turns.append({"from": "human", "value": f"{placeholders}\n{pair['q']}" if i == 0 else pair["q"]})
        turns.append({"from": "gpt", "value": pair["a"]})
    return turns


def _sample(tier: str, key: str, files: dict[str, bytes], row: dict, out: Path) -> tuple[dict, list[tuple[Path, bytes]]]:
    """One sample's record and the files to write, or UnsafeSample. Nothing is written here."""
    _safe(key, "key")
    if row.get("key") != key:
        raise UnsafeSample("the sidecar row's key differs from the tar's")
    kind = row.get("kind")
    if kind not in DESCRIBE:
        raise UnsafeSample(f"unknown kind {_shown(kind)}")
    try:
        media = json.loads(row.get("media") or "[]")
    except ValueError:
        raise UnsafeSample("media is not JSON") from None
    if not isinstance(media, list) or not media:
        raise UnsafeSample("no media listed")
    record: dict = {"id": row.get("uid")}
    writes = []
    if kind == "video":
        name = _safe(media[0], "media name", VIDEO_MEDIA)
        rel = f"{tier}/{key}.{name}"
        writes.append((_inside(out / "videos", rel), name))
        record["video"] = rel
        n_images = 1
    else:
        rels = []
        for m in media:
            name = _safe(m, "media name", IMAGE_MEDIA)
            rel = f"{tier}/{key}" + ("" if name == "jpg" else "_" + name.split(".")[0]) + ".jpg"
            writes.append((_inside(out / "images", rel), name))
            rels.append(rel)
        record["image"] = rels[0] if kind == "image_text" else rels
        n_images = len(rels)
    if len({path for path, _ in writes}) != len(writes):
        raise UnsafeSample("two media members map to one file name")
    missing = [name for _, name in writes if not isinstance(files.get(name), bytes)]
    if missing:
        raise UnsafeSample(f"media {_shown(missing[0])} is not in the tar")
    record["conversations"] = conversations(kind, row.get("text"), row.get("source_meta"), n_images)
    return record, [(path, files[name]) for path, name in writes]


def export_llava(root: str | Path, tier: str, out: str | Path, sampling_strategy: str = "all") -> dict:
    run_root = find_run_root(root)
    if not isinstance(tier, str) or ".." in tier or not TIER_NAME.match(tier):
        raise InputError(f"--tier {_shown(tier)} is not a tier name (lower-case letters, digits, _ . -)")
    if not STRATEGY.match(sampling_strategy):
        raise InputError(f"--sampling-strategy {_shown(sampling_strategy)} must be all, first:N, end:N or random:N")
    tier_dir = run_root / "tiers" / tier
    if not (tier_dir / "manifest.json").exists():
        known = sorted(p.name for p in (run_root / "tiers").iterdir() if p.is_dir()) if (run_root / "tiers").is_dir() else []
        raise InputError(f"no tier '{tier}' under {run_root / 'tiers'}; tiers are {known}")
    out = Path(out)
    try:
        manifest = json.loads((tier_dir / "manifest.json").read_text())
        shards = list(manifest["shards"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{tier_dir / 'manifest.json'} is not a tier manifest: {exc}") from None
    records, n_files, skipped, taken = [], 0, [], set()
    try:
        for shard in shards:
            try:
                tar = _inside(tier_dir, _safe(shard.get("name") if isinstance(shard, dict) else None, "shard name"))
                sidecar = _inside(tier_dir, _safe(shard.get("sidecar"), "sidecar name"))
                if not (tar.is_file() and sidecar.is_file()):
                    raise UnsafeSample("its tar or sidecar is missing")
            except UnsafeSample as exc:
                skipped.append({"shard": _shown(shard), "key": None, "reason": str(exc)})
                continue
            try:
                rows = {r.get("key"): r for r in pq.read_table(sidecar).to_pylist()}
                for key, files in iter_samples(tar):
                    try:
                        if key not in rows:
                            raise UnsafeSample("not in the sidecar")
                        record, writes = _sample(tier, key, files, rows[key], out)
                        if any(path in taken for path, _ in writes):
                            raise UnsafeSample("its file names repeat an earlier sample's")
                    except UnsafeSample as exc:
                        skipped.append({"shard": tar.name, "key": _shown(key), "reason": str(exc)})
                        continue
                    for path, data in writes:
                        _write(path, data, out)
                        taken.add(path)
                    n_files += len(writes)
                    records.append(record)
            except (EOFError, tarfile.TarError, pa.ArrowException) as exc:
                skipped.append({"shard": tar.name, "key": None, "reason": f"unreadable shard (rest skipped): {exc}"})
        json_path = out / f"{tier}.json"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
        atomic_write_text(out / f"{tier}.yaml", yaml.safe_dump(
            {"datasets": [{"json_path": str(json_path.resolve()), "sampling_strategy": sampling_strategy}]}, sort_keys=False))
    except OSError as exc:
        raise InputError(f"cannot export to {out}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")) from None
    return {"records": len(records), "files": n_files, "json": str(json_path), "yaml": str(out / f"{tier}.yaml"),
            "skipped": skipped}


def _write(path: Path, data: bytes, out: Path) -> None:
    """Write one media file: its folder is checked again once it exists, and the file is
    opened without following a symlink, so nothing planted in OUT redirects a write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.resolve().is_relative_to(out.resolve()):
        raise InputError(f"{path.parent} leaves {out}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
