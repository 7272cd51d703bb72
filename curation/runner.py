"""`curate run`: the Ray Data curation job.

Stage A (Ray Data, parallel): raw shards -> map operators in actor pools -> one
  annotated parquet per raw shard under OUT/_work/annotated/, committed atomically
  as soon as all of that shard's samples are back. A re-run skips committed shards.
Stage B (driver): global operators (dedup...) over the whole run, then tier routing
  and shard assignment. Deterministic, so recomputing it after a crash is harmless.
Stage C (Ray tasks): write tier shards (tar + sidecar), skipping shards already
  complete; then manifests, the ledger (every input exactly once), summary, _SUCCESS.

A SIGKILL at any point followed by a re-run gives the same ledger and the same bytes
in every tier shard as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .config import OpSpec, PipelineConfig
from .crawl import CRAWL_LEDGER_GLOB
from .errors import AccountingError, ConfigError, InputError
from .fsutil import atomic_write_parquet, atomic_write_text
from .ids import seeded_rank
from .ops.clip import EMBEDDING_COLUMN
from .runtime.ray_env import READ_TASK_CPUS
from .rawshards import READ_COLUMNS, iter_samples, list_raw_shards, sample_row, scan_keys
from .tiers import routing
from .tiers.writer import shard_entry, write_manifest, write_shard

WORK = "_work"
INT_COLUMNS = ("width", "height", "num_bytes", "num_images", "num_frames")
# Working columns that are bytes, never sidecar columns: media, and embeddings (saved as .npy).
BINARY_COLUMNS = ("image_bytes", EMBEDDING_COLUMN)


# ---------------------------------------------------------------------------- stage A
READ_BLOCK_ROWS = 64  # rows per block out of a raw shard: enough blocks to keep every actor busy


def read_raw_shards(batch: dict) -> Iterator[pa.Table]:
    """map_batches function: raw shard paths -> their sample rows (with media bytes), as
    Arrow tables of READ_BLOCK_ROWS rows. One block per shard would give a pool's
    second actor nothing to do until the next shard, and no overlap between stages."""
    schema = _stage_schema(list(READ_COLUMNS))
    rows: list[dict] = []
    for path, source in zip(batch["path"], batch["source"]):
        for key, files in iter_samples(Path(path)):
            rows.append(sample_row(Path(path).name, key, files, source))
            if len(rows) == READ_BLOCK_ROWS:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def _stage_schema(columns: list[str]) -> pa.Schema:
    sidecar = schemas.arrow_schema("sidecar")
    fields = []
    for col in columns:
        if col in BINARY_COLUMNS:
            fields.append(pa.field(col, pa.binary()))
        elif col in sidecar.names:
            fields.append(sidecar.field(col))
        else:
            fields.append(pa.field(col, pa.string()))
    return pa.schema(fields)


class StageActor:
    """One actor of a fused stage: builds its operators once, then runs them in order
    on every batch. Returns Arrow with a fixed schema so blocks always concatenate."""

    def __init__(self, specs: list[OpSpec]):
        self.ops = [s.build() for s in specs]

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        for op in self.ops:
            batch = op(batch)
        batch = batch.drop(columns=[c for c in batch.columns if c.startswith("_")])
        for col in INT_COLUMNS:
            if col in batch.columns:
                batch[col] = pd.array(batch[col].map(lambda v: None if pd.isna(v) else int(v)), dtype="Int64")
        return pa.Table.from_pandas(batch, schema=_stage_schema(list(batch.columns)), preserve_index=False)


def fuse(specs: tuple[OpSpec, ...]) -> list[list[OpSpec]]:
    """Group consecutive fusable CPU operators with identical resources into one stage."""
    stages: list[list[OpSpec]] = []
    for spec in specs:
        prev = stages[-1][-1] if stages else None
        if prev and spec.cls.fusable and prev.cls.fusable and spec.resources == prev.resources:
            stages[-1].append(spec)
        else:
            stages.append([spec])
    return stages


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def run_stage_a(cfg: PipelineConfig, shards: list[Path], counts: dict[str, int], work: Path, source: str) -> None:
    import ray.data

    from .runtime.ray_env import cluster_cpus, cluster_gpus, node_cpus, plan_pools

    annotated = work / "annotated"
    annotated.mkdir(parents=True, exist_ok=True)
    todo = [p for p in shards if not (annotated / f"{p.stem}.parquet").exists()]
    for p in [p for p in todo if counts[p.name] == 0]:  # nothing will come back for an empty shard
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in READ_COLUMNS if c != "image_bytes"})
        _commit_annotated(annotated / f"{p.stem}.parquet", empty)
    todo = [p for p in todo if counts[p.name] > 0]
    if not todo:
        return
    ds = ray.data.from_items([{"path": str(p), "source": source} for p in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(read_raw_shards, batch_size=1, num_cpus=READ_TASK_CPUS)
    stages = fuse(cfg.map_ops)
    gpus = cluster_gpus()
    # A model operator's GPU share applies where there are GPUs; elsewhere it runs on CPU.
    wanted = [s[0].resources if gpus else dataclasses.replace(s[0].resources, num_gpus=0) for s in stages]
    pools = plan_pools(wanted, cluster_cpus(), gpus, heavy=[not s[0].cls.fusable for s in stages], nodes=node_cpus())
    for stage, res, (size, num_cpus) in zip(stages, wanted, pools):
        ds = ds.map_batches(
            StageActor, fn_constructor_kwargs={"specs": stage}, batch_format="pandas",
            batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=num_cpus, num_gpus=res.num_gpus,
        )
    ds = ds.drop_columns(["image_bytes"])

    pending: dict[str, list[pd.DataFrame]] = defaultdict(list)
    got: dict[str, int] = defaultdict(int)
    bar = _progress(sum(counts[p.name] for p in todo), "curate")
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        for name, part in batch.groupby("raw_shard", sort=False):
            pending[name].append(part)
            got[name] += len(part)
            if got[name] == counts[name]:
                _commit_annotated(annotated / f"{Path(name).stem}.parquet", pd.concat(pending.pop(name)))
            elif got[name] > counts[name]:
                raise AccountingError(f"raw shard {name}: got {got[name]} rows back for {counts[name]} samples")
        bar.update(len(batch))
    bar.close()
    missing = [p.name for p in todo if not (annotated / f"{p.stem}.parquet").exists()]
    if missing:
        raise AccountingError(f"samples missing after stage A for raw shards {missing}")


def _commit_annotated(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_parquet(frame.sort_values("raw_key", kind="stable").reset_index(drop=True), path)


# ---------------------------------------------------------------------------- stage B
@dataclass
class ShardPlan:
    tier: str
    name: str
    rows: list[dict]


def run_stage_b(cfg: PipelineConfig, table: pd.DataFrame) -> tuple[pd.DataFrame, list[ShardPlan]]:
    table = table.sort_values("uid", kind="stable").reset_index(drop=True)
    for col in ("dup_of", "tier", "shard", "key"):
        if col not in table.columns:
            table[col] = None
    for spec in cfg.global_ops:
        table = spec.build().apply(table)
    live = table["status"] == "kept"
    tiers = routing.route(table[live], cfg.tiers)
    table.loc[live, "tier"] = tiers
    unrouted = live & table["tier"].isna()
    table.loc[unrouted, "status"] = "dropped"
    table.loc[unrouted, "reason"] = "unrouted"

    lineage = {"pipeline": cfg.name, "config_hash": cfg.config_hash,
               "op_versions": json.dumps(cfg.op_versions, sort_keys=True)}
    plans: list[ShardPlan] = []
    kept = table[table["status"] == "kept"]
    for rule in cfg.tiers:
        members = kept[kept["tier"] == rule.name]
        # Seeded order mixes sources, so every shard of a tier is statistically alike.
        order = sorted(members.index, key=lambda i: seeded_rank(cfg.seed, members.at[i, "uid"]))
        for n, idx in enumerate(cut_shards(order, members["num_bytes"], cfg.shard)):
            name = f"{rule.name}-{n:06d}"
            table.loc[idx, "shard"] = f"{name}.tar"
            table.loc[idx, "key"] = table.loc[idx, "uid"]
            rows = [{**{k: schemas.plain_value(v) for k, v in table.loc[i].items()}, **lineage} for i in idx]
            plans.append(ShardPlan(rule.name, name, rows))
    return table, plans


# Per-sample overhead in a tar beyond its media: three 512-byte headers, padding, txt, json.
SAMPLE_OVERHEAD_BYTES = 3072


def cut_shards(order: list, num_bytes: pd.Series, policy) -> list[list]:
    """Consecutive groups of `order` closing at max_samples, or before a sample would push
    the shard past max_bytes (estimated from media bytes); a lone oversized sample still
    gets a shard of its own."""
    shards, current, size = [], [], 0
    for i in order:
        b = int(num_bytes.get(i) or 0) + SAMPLE_OVERHEAD_BYTES
        full = len(current) >= policy.max_samples or (policy.max_bytes and current and size + b > policy.max_bytes)
        if full:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += b
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------------------- stage C
def _shard_done(tar: Path, plan: ShardPlan) -> bool:
    sidecar = tar.with_suffix(".parquet")
    if not (tar.exists() and sidecar.exists()):
        return False
    uids = pq.read_table(sidecar, columns=["uid"]).column("uid").to_pylist()
    return uids == [r["uid"] for r in plan.rows]


def run_stage_c(cfg: PipelineConfig, plans: list[ShardPlan], out: Path, raw_dir: Path) -> dict[str, dict]:
    import ray

    tiers_dir = out / "tiers"
    remote_write = ray.remote(num_cpus=0.5)(write_shard)
    entries: dict[str, list] = {r.name: [] for r in cfg.tiers}
    futures, owners = [], []
    for plan in plans:
        tier_dir = tiers_dir / plan.tier
        tier_dir.mkdir(parents=True, exist_ok=True)
        tar = tier_dir / f"{plan.name}.tar"
        if _shard_done(tar, plan):
            entries[plan.tier].append(shard_entry(tar))
        else:
            futures.append(remote_write.remote(str(tar), plan.rows, str(raw_dir)))
            owners.append(plan.tier)
    bar = _progress(sum(len(p.rows) for p in plans), "write tiers")
    bar.update(sum(e["samples"] for es in entries.values() for e in es))
    remaining = dict(zip(futures, owners))
    while remaining:
        ready, _ = ray.wait(list(remaining), num_returns=1)
        for ref in ready:
            entry = ray.get(ref)
            entries[remaining.pop(ref)].append(entry)
            bar.update(entry["samples"])
    bar.close()
    manifests = {}
    for rule in cfg.tiers:
        tier_dir = tiers_dir / rule.name
        tier_dir.mkdir(parents=True, exist_ok=True)
        manifests[rule.name] = write_manifest(tier_dir, rule.name, cfg, entries[rule.name])
    return manifests


# ---------------------------------------------------------------------------- driver
def _check_run_identity(work: Path, cfg: PipelineConfig, shards: list[Path], raw_dir: Path) -> None:
    identity = {"pipeline": cfg.name, "pipeline_path": str(Path(cfg.path).resolve()),
                "config_hash": cfg.config_hash, "input": str(raw_dir.resolve()),
                "raw_shards": {p.name: p.stat().st_size for p in shards}}
    marker = work / "run.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("config_hash") != cfg.config_hash:
            raise ConfigError(f"{work.parent} was written by another pipeline config (hash {previous.get('config_hash')}, "
                              f"now {cfg.config_hash}); use a new --out folder")
        if previous.get("raw_shards") != identity["raw_shards"]:
            raise InputError(f"{work.parent} was written from other raw shards than {raw_dir}; use a new --out folder")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(identity, indent=2) + "\n")


def build_ledger(table: pd.DataFrame, raw_dir: Path) -> pd.DataFrame:
    curate = table.assign(stage="curate")
    frames = [curate]
    crawl_paths = sorted(raw_dir.glob(CRAWL_LEDGER_GLOB))
    if crawl_paths:  # one ledger per crawled kind
        crawl = pd.concat([pd.read_parquet(p) for p in crawl_paths], ignore_index=True)
        crawl_kept = set(crawl.loc[crawl["status"] == "kept", "uid"])
        seen = set(curate["uid"])
        if crawl_kept != seen:
            raise AccountingError(f"raw shards hold {len(seen)} samples but the crawl ledger kept {len(crawl_kept)} "
                                  f"({len(seen - crawl_kept)} unknown, {len(crawl_kept - seen)} missing)")
        not_kept = crawl[crawl["status"] != "kept"]
        if not not_kept.empty:
            frames.insert(0, not_kept)
    ledger = pd.concat(frames, ignore_index=True)
    for col in schemas.columns("ledger"):
        if col not in ledger.columns:
            ledger[col] = None
    ledger.loc[ledger["status"] != "kept", ["tier", "shard"]] = None
    return ledger[schemas.columns("ledger")].sort_values("uid", kind="stable").reset_index(drop=True)


def _check_unique_uids(table: pd.DataFrame) -> None:
    """Two raw samples with one uid are one input stored twice (overlapping shards)."""
    dup = table["uid"].duplicated(keep=False)
    if dup.any():
        first = table.loc[dup, "uid"].iloc[0]
        where = sorted(set(table.loc[table["uid"] == first, "raw_shard"]))
        raise AccountingError(f"{int(dup.sum())} raw samples share a uid with another (e.g. {first} in {where}): "
                              "the raw shards overlap; give each input once")


def check_accounting(ledger: pd.DataFrame, n_raw: int) -> dict:
    if ledger["uid"].duplicated().any():
        dup = ledger.loc[ledger["uid"].duplicated(), "uid"].iloc[0]
        raise AccountingError(f"uid {dup} appears more than once in the ledger")
    cur = ledger[ledger["stage"] == "curate"]
    by_status = cur["status"].value_counts().to_dict()
    if len(cur) != n_raw or sum(by_status.values()) != n_raw:
        raise AccountingError(f"raw samples {n_raw} != kept + dropped + failed {by_status}")
    return by_status


def run_pipeline(cfg: PipelineConfig, raw_dir: str | Path, out: str | Path, ray_address: str | None = None) -> dict:
    """Run (or resume) the curation job; returns the summary also written to summary.json."""
    from .runtime.ray_env import start_ray

    t0 = time.time()
    raw_dir, out = Path(raw_dir), Path(out)
    shards = list_raw_shards(raw_dir)
    counts = {p.name: len(scan_keys(p)) for p in shards}  # also proves every shard is readable
    work = out / WORK
    _check_run_identity(work, cfg, shards, raw_dir)
    if (out / "_SUCCESS").exists():
        return json.loads((out / "summary.json").read_text())

    start_ray(ray_address)
    run_stage_a(cfg, shards, counts, work, source=raw_dir.name)
    parts = [pd.read_parquet(work / "annotated" / f"{p.stem}.parquet") for p in shards if counts[p.name]]
    if not parts:
        raise InputError(f"the raw shards in {raw_dir} hold no samples")
    table = pd.concat(parts, ignore_index=True)
    _check_unique_uids(table)
    table, plans = run_stage_b(cfg, table)
    manifests = run_stage_c(cfg, plans, out, raw_dir)

    ledger = build_ledger(table, raw_dir)
    by_status = check_accounting(ledger, sum(counts.values()))
    atomic_write_parquet(schemas.to_table("ledger", ledger), out / "ledger.parquet")

    summary = {
        "pipeline": cfg.name,
        "config_hash": cfg.config_hash,
        "raw_samples": sum(counts.values()),
        "curate": by_status,
        "ledger_rows": len(ledger),
        "by_stage_status_reason": [
            {"stage": s, "status": st, "reason": r, "count": int(n)}
            for (s, st, r), n in ledger.fillna({"reason": ""}).groupby(["stage", "status", "reason"]).size().items()
        ],
        "tiers": {t: {"samples": m["num_samples"], "shards": len(m["shards"]), "bytes": m["num_bytes"]} for t, m in manifests.items()},
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "_SUCCESS", "")
    return summary
