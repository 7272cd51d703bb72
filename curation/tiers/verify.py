"""`curate verify`: recheck every tier shard against its manifest and sidecar.

Names each mismatch: a missing or unlisted shard, a size or sha256 that differs from the
manifest (a flipped byte), a sidecar whose rows are not the tar's samples in the tar's
order, a tier whose counts disagree with the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from .. import schemas
from ..catalog import find_run_root
from ..errors import InputError
from ..fsutil import file_sha256
from ..rawshards import scan_keys


def verify(root: str | Path) -> tuple[int, list[str]]:
    """(shards checked, problems). No problems means every shard is as its manifest says."""
    run_root = find_run_root(root)
    problems: list[str] = []
    checked = 0
    kept_per_tier = pd.read_parquet(run_root / "ledger.parquet", columns=["status", "tier"]).query(
        "status == 'kept'")["tier"].value_counts().to_dict()
    for tier_dir in sorted(p for p in (run_root / "tiers").iterdir() if p.is_dir()):
        manifest_path = tier_dir / "manifest.json"
        if not manifest_path.exists():
            problems.append(f"{tier_dir.name}: no manifest.json")
            continue
        manifest = json.loads(manifest_path.read_text())
        try:
            schemas.validate_document("manifest", manifest)
        except schemas.SchemaViolation as exc:
            problems.append(f"{tier_dir.name}/manifest.json: {exc}")
            continue
        listed = {s["name"] for s in manifest["shards"]}
        for extra in sorted({p.name for p in tier_dir.glob("*.tar")} - listed):
            problems.append(f"{tier_dir.name}/{extra}: not listed in manifest.json")
        if manifest["num_samples"] != kept_per_tier.get(tier_dir.name, 0):
            problems.append(f"{tier_dir.name}: manifest has {manifest['num_samples']} samples, "
                            f"ledger keeps {kept_per_tier.get(tier_dir.name, 0)} in this tier")
        for shard in manifest["shards"]:
            checked += 1
            tar, sidecar = tier_dir / shard["name"], tier_dir / shard["sidecar"]
            where = f"{tier_dir.name}/{shard['name']}"
            if not tar.exists() or not sidecar.exists():
                problems.append(f"{where}: {'tar' if not tar.exists() else 'sidecar'} missing")
                continue
            if tar.stat().st_size != shard["bytes"]:
                problems.append(f"{where}: {tar.stat().st_size} bytes, manifest says {shard['bytes']}")
            if file_sha256(tar) != shard["sha256"]:
                problems.append(f"{where}: sha256 differs from the manifest (content changed)")
                continue
            problems += [f"{where}: {p}" for p in sidecar_type_problems(pq.read_schema(sidecar))]
            keys = pq.read_table(sidecar, columns=["key"]).column("key").to_pylist()
            if len(keys) != shard["samples"]:
                problems.append(f"{where}: sidecar has {len(keys)} rows, manifest says {shard['samples']}")
            try:
                if scan_keys(tar) != keys:
                    problems.append(f"{where}: sidecar rows are not the tar's samples in the tar's order")
            except InputError as exc:
                problems.append(f"{where}: {exc}")
    return checked, problems


def sidecar_type_problems(schema) -> list[str]:
    """Contract columns whose stored type is not the contract's (a sidecar written by
    another version, say with JSON text where lists belong). A run's declared columns
    are its own, not checked here."""
    contract = schemas.arrow_schema("sidecar")
    return [f"sidecar column {f.name} is {f.type}, the contract says {contract.field(f.name).type}"
            for f in schema if f.name in contract.names and not f.type.equals(contract.field(f.name).type)]
