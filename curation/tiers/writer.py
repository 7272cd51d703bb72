"""Write tier shards: a WebDataset tar plus a parquet sidecar with the same rows in the
same order, and a manifest per tier.

Tars are written byte-for-byte reproducibly (fixed mtime, owner and mode; members in
sample order), so the same inputs and seed always give identical shards, and a resumed
run rewrites a half-written shard into exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from .. import __version__, schemas
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..rawshards import IMAGE_EXTS, iter_samples


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _as_jpeg(data: bytes, image_format: str | None) -> bytes:
    """Tier shards use the standard `jpg` key; non-JPEG sources are re-encoded."""
    if image_format == "JPEG":
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def sample_json(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()


def write_shard(tar_path: str, rows: list[dict], raw_dir: str) -> dict:
    """Write one shard. `rows` are sidecar rows (with raw_shard/raw_key for the media).
    Returns the manifest entry. Writes to temporary names, then renames tar, then
    sidecar: a shard counts as done only once its sidecar exists."""
    tar_path = Path(tar_path)
    wanted: dict[str, dict[str, str]] = {}
    for r in rows:
        wanted.setdefault(r["raw_shard"], {})[r["raw_key"]] = r["uid"]
    media: dict[str, bytes] = {}
    for raw_shard, keys in wanted.items():
        for key, files in iter_samples(Path(raw_dir) / raw_shard):
            if key in keys:
                media[keys[key]] = next((files[e] for e in IMAGE_EXTS if e in files), b"")

    sidecar_rows = [{c: r.get(c) for c in schemas.columns("sidecar")} for r in rows]
    table = schemas.to_table("sidecar", sidecar_rows)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, sc in zip(rows, sidecar_rows):
            key = sc["key"]
            members = [("jpg", _as_jpeg(media[row["uid"]], row.get("image_format")))]
            if sc.get("text") is not None:
                members.append(("txt", sc["text"].encode()))
            members.append(("json", sample_json(sc)))
            for ext, data in members:
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    data = buf.getvalue()

    atomic_write_bytes(tar_path, data)
    sidecar = tar_path.with_suffix(".parquet")
    tmp_side = sidecar.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp_side)
    os.replace(tmp_side, sidecar)
    return {"name": tar_path.name, "sidecar": sidecar.name, "samples": len(rows), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def shard_entry(tar_path: Path) -> dict:
    """Manifest entry for a shard already on disk."""
    h = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    samples = pq.ParquetFile(tar_path.with_suffix(".parquet")).metadata.num_rows
    return {"name": tar_path.name, "sidecar": tar_path.with_suffix(".parquet").name, "samples": samples,
            "bytes": tar_path.stat().st_size, "sha256": h.hexdigest()}


def write_manifest(tier_dir: Path, tier: str, pipeline: str, config_hash: str, seed: int, entries: list[dict]) -> dict:
    manifest = {
        "tier": tier,
        "pipeline": pipeline,
        "config_hash": config_hash,
        "curation_version": __version__,
        "seed": seed,
        "num_samples": sum(e["samples"] for e in entries),
        "num_bytes": sum(e["bytes"] for e in entries),
        "shards": sorted(entries, key=lambda e: e["name"]),
    }
    schemas.validate_document("manifest", manifest)
    atomic_write_text(tier_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
