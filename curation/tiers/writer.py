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
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from .. import __version__, schemas
from ..fsutil import atomic_write_bytes, atomic_write_parquet, atomic_write_text, file_sha256
from ..wds import tar_bytes


def tier_media(row: dict, files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The media members a tier sample carries (curation.media.tier_members), with the
    row updated in place to describe them. Raises curation.media.MediaError."""
    from ..media import tier_members

    members, updates = tier_members(row, files)
    row.update(updates)
    return members


def sample_json(row: dict) -> bytes:
    """The tar's json member: the sidecar row, lists and structs as JSON arrays and
    objects (source_meta stays its JSON text, as the sidecar holds it)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()


def write_shard(tar_path: str | Path, rows: list[dict], media: list[list[tuple[str, bytes]]],
                embeddings: list[bytes | None] | None = None, declared: schemas.Declared = ()) -> dict:
    """Write one shard from its sidecar rows (in order), each row's media members and
    (optionally) its embedding; `declared`: the run's own sidecar columns. Returns the manifest entry. Writes to temporary names,
    then renames tar, embeddings, then sidecar: a shard is done once its sidecar exists."""
    tar_path = Path(tar_path)
    columns = schemas.columns("sidecar", declared)
    sidecar_rows = schemas.plain_rows("sidecar", [{c: r.get(c) for c in columns} for r in rows], declared)
    table = schemas.to_table("sidecar", sidecar_rows, declared)
    samples = []
    for sc, members in zip(sidecar_rows, media):
        members = list(members)
        if sc.get("text") is not None:
            members.append(("txt", sc["text"].encode()))
        members.append(("json", sample_json(sc)))
        samples.append((sc["key"], members))
    atomic_write_bytes(tar_path, tar_bytes(samples))
    matrix = _embedding_matrix(embeddings or [])
    if matrix is not None:
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        atomic_write_bytes(embeddings_path(tar_path), buf.getvalue())
    atomic_write_parquet(table, tar_path.with_suffix(".parquet"))  # last: a shard is done once its sidecar exists
    return shard_entry(tar_path)


def embeddings_path(tar_path: Path) -> Path:
    """`<shard>.clip.npy`: the shard's CLIP image embeddings, one row per sample in
    sidecar order (float16; NaN rows for samples that have none)."""
    return tar_path.with_suffix(".clip.npy")


def _embedding_matrix(vectors: list[bytes | None]) -> np.ndarray | None:
    present = [np.frombuffer(v, dtype=np.float16) for v in vectors if v is not None]
    if not present:
        return None
    out = np.full((len(vectors), present[0].shape[0]), np.nan, dtype=np.float16)
    for i, v in enumerate(vectors):
        if v is not None:
            out[i] = np.frombuffer(v, dtype=np.float16)
    return out


def shard_entry(tar_path: Path) -> dict:
    """Manifest entry for a shard on disk."""
    samples = pq.ParquetFile(tar_path.with_suffix(".parquet")).metadata.num_rows
    entry = {"name": tar_path.name, "sidecar": tar_path.with_suffix(".parquet").name, "samples": samples,
             "bytes": tar_path.stat().st_size, "sha256": file_sha256(tar_path)}
    if embeddings_path(tar_path).exists():
        entry["embeddings"] = embeddings_path(tar_path).name
    return entry


def write_manifest(tier_dir: Path, tier: str, cfg, entries: list[dict]) -> dict:
    manifest = {
        "tier": tier,
        "pipeline": cfg.name,
        "config_hash": cfg.config_hash,
        "recipe_version": cfg.version,
        "curation_version": __version__,
        "seed": cfg.seed,
        "num_samples": sum(e["samples"] for e in entries),
        "num_bytes": sum(e["bytes"] for e in entries),
        "shards": sorted(entries, key=lambda e: e["name"]),
    }
    schemas.validate_document("manifest", manifest)
    atomic_write_text(tier_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
