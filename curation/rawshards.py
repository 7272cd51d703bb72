"""Read raw shards: WebDataset tars (from our crawl, img2dataset, or any producer).

Members are grouped into samples by key (the basename up to the first dot). Metadata
is read with json.loads only: nothing from a shard is ever unpickled or evaluated.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from .errors import InputError
from .ids import make_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")


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
    row["uid"] = uid if isinstance(uid, str) and len(uid) == 16 else make_uid(f"{default_source}/{shard_name}", key)
    row["kind"] = meta.get("kind") or "image_text"
    row["source"] = meta.get("source") or default_source
    row["url"] = meta.get("url")
    text = next((files[e] for e in TEXT_EXTS if e in files), None)
    row["text"] = text.decode("utf-8", errors="replace") if text is not None else meta.get("caption")
    row["source_meta"] = meta.get("meta") if isinstance(meta.get("meta"), str) else None
    row["image_bytes"] = next((files[e] for e in IMAGE_EXTS if e in files), b"")
    return row

