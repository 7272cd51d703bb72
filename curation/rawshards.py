"""Read raw shards: WebDataset tars (from our crawl, img2dataset, or any producer).

Members are grouped into samples by key (the basename up to the first dot). Metadata
is read with json.loads only: nothing from a shard is ever unpickled or evaluated.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from .errors import InputError
from .ids import make_uid

# Columns every raw sample starts with, whatever its kind, so Ray blocks from shards of
# different kinds share one schema. Operators add their outputs to these.
READ_COLUMNS = ("uid", "kind", "source", "url", "text", "source_meta", "raw_shard", "raw_key", "status", "reason",
                "error", "media", "image_bytes", "num_images", "missing_images", "doc", "doc_sha256", "duration",
                "fps", "num_frames", "codec", "width", "height", "sha256", "num_bytes")
KINDS = ("image_text", "interleaved", "video")
UID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm")
TEXT_EXTS = ("txt", "caption")


def ordered_images(files: dict[str, bytes]) -> list[str]:
    """Members "0.jpg", "1.png", ... of a multi-image sample, in their order."""
    numbered = [e for e in files if "." in e and e.split(".", 1)[0].isdigit() and e.split(".", 1)[1] in IMAGE_EXTS]
    return sorted(numbered, key=lambda e: int(e.split(".", 1)[0]))


def media_members(kind: str, files: dict[str, bytes]) -> list[str]:
    """The sample's media member names in order, by kind."""
    if kind == "interleaved":
        return ordered_images(files)
    if kind == "video":
        return [e for e in VIDEO_EXTS if e in files][:1]
    return [e for e in IMAGE_EXTS if e in files][:1]


def list_raw_shards(raw_dir: str | Path) -> list[Path]:
    raw_dir = Path(raw_dir)
    if not raw_dir.exists():
        raise InputError(f"input folder not found: {raw_dir}")
    if not raw_dir.is_dir():
        raise InputError(f"input must be a folder of raw shards (.tar), got a file: {raw_dir}")
    shards = sorted(raw_dir.glob("*.tar"))
    if not shards:
        raise InputError(f"no raw shards (*.tar) in {raw_dir}")
    return shards


def split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext.lower()


def scan_keys(path: Path) -> list[str]:
    """Sample keys in tar order. Reads headers only; raises InputError if unreadable."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    key, _ = split_member(member.name)
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"raw shard {path} is not a readable tar: {exc}") from None
    if len(set(keys)) != len(keys):
        raise InputError(f"raw shard {path}: a sample's files are not contiguous (key repeats); not a WebDataset tar")
    return keys


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order."""
    with tarfile.open(path, "r:*") as tar:
        current, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if key != current and current is not None:
                yield current, files
                files = {}
            current = key
            files[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current, files


def sample_row(shard_name: str, key: str, files: dict[str, bytes], default_source: str) -> dict:
    """One raw sample -> the row the curation job starts from."""
    row = {"raw_shard": shard_name, "raw_key": key, "status": "kept", "reason": None, "error": None}
    meta: dict = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
        except ValueError as exc:
            meta = {}
            row.update(status="failed", reason="bad_metadata", error=f"{type(exc).__name__}: {exc}")  # no addresses in ValueError text
    uid = meta.get("uid")
    row["uid"] = uid if isinstance(uid, str) and UID_PATTERN.match(uid) else make_uid(f"{default_source}/{shard_name}", key)
    row["kind"] = meta.get("kind") or "image_text"
    if row["kind"] not in KINDS:
        row.update(kind="image_text", status="failed", reason="unknown_kind",
                   error=f"kind {str(meta.get('kind'))[:50]!r} is not one of {list(KINDS)}")
    row["source"] = meta.get("source") or default_source
    row["url"] = meta.get("url")
    text = next((files[e] for e in TEXT_EXTS if e in files), None)
    row["text"] = text.decode("utf-8", errors="replace") if text is not None else meta.get("caption")
    row["source_meta"] = meta.get("meta") if isinstance(meta.get("meta"), str) else None
    media = media_members(row["kind"], files)
    row["media"] = json.dumps(media)
    row["num_bytes"] = sum(len(files[m]) for m in media)  # all media: what a tier shard will carry
    # The media the operators look at: the image, a document's first image, or the clip
    # (video operators decode frames from it; image operators do not take video rows).
    row["image_bytes"] = files[media[0]] if media else b""
    if row["kind"] == "interleaved":
        row["num_images"] = len(media)
        row["missing_images"] = json.dumps(meta.get("missing_images") or [])
        row["doc"] = json.dumps({"doc_id": meta.get("doc_id"), "items": meta.get("items") or []})
        row["doc_sha256"] = meta.get("sha256")
    elif row["kind"] == "video":
        probe = meta.get("probe") or {}
        row.update({k: probe.get(k) for k in ("duration", "fps", "num_frames", "codec", "width", "height")})
        row["sha256"] = meta.get("sha256")
        if not media and row["status"] == "kept":
            row.update(status="failed", reason="no_video", error="sample has no mp4/webm member")
    return row

