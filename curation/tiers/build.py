"""Stage C: write the tier shards, reading each raw shard once.

A tier's order is a seeded shuffle, so every tier shard draws from nearly every raw
shard: reading the raw data once per tier shard costs (tier shards) x (raw data). Here
one Ray Data task per raw shard reads it once and emits the media of its picked
samples, keyed by tier shard; Ray Data's distributed shuffle (groupby) brings each tier
shard's samples together, and one task per tier shard writes its tar, sidecar and
embeddings, in parallel across the cluster. Memory per task is one raw shard's block
or one tier shard, both bounded by configuration (shard caps).

Shards are written reproducibly and atomically; each finished shard leaves its
manifest entry under `_work/entries/`. A re-run writes only the shards without an
entry, reading only the raw shards that feed them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..annotate import progress_bar
from ..decide import Decision, sql_str
from ..errors import NO_SPACE_ERRNOS, DiskFullError
from ..fsutil import atomic_write_text
from ..ops.clip import EMBEDDING_COLUMN
from ..ops.clips import CLIP_BYTES_COLUMN
from ..rawshards import as_shard
from .card import write_card
from .writer import write_manifest, write_shard

MEDIA_SCHEMA = pa.schema([("shard_id", pa.int64()), ("pos", pa.int64()), ("names", pa.list_(pa.string())),
                          ("datas", pa.list_(pa.binary())), ("embedding", pa.binary())])
BLOCK_BYTES = 64 << 20  # a read task yields its media in blocks of about this size
PARTITION_BYTES = 256 << 20  # media per shuffle partition (a reduce task holds one)


def read_picked(batch: dict, pending_path: str | None, stats_dir: str) -> Iterator[pa.Table]:
    """map_batches function, one raw shard per call: read it once and emit the tier
    media of every picked sample (the same bytes stage A validated: media.tier_members
    is deterministic), plus its embedding from stage A's parts. Derived samples (video
    clips) take their media from the parts too."""
    from .. import rawshards
    from ..media import tier_members

    raw_path, picks_dir, source = batch["raw_path"][0], batch["picks"][0], batch["source"][0]
    shard = rawshards.as_shard(raw_path)  # a shard token (inputs.ShardRef)
    parts = json.loads(batch["parts"][0])
    picks = pq.read_table(picks_dir).to_pandas()
    if pending_path:
        pending = set(pq.read_table(pending_path).column("shard_id").to_pylist())
        picks = picks[picks["shard_id"].isin(pending)]
    wanted = {k: (int(s), int(p)) for k, s, p in zip(picks["raw_key"], picks["shard_id"], picks["pos"])}
    vectors: dict[str, bytes] = {}
    rows, size = [], 0
    for part in parts:
        names = pq.read_schema(part).names
        if EMBEDDING_COLUMN in names:
            t = pq.read_table(part, columns=["raw_key", EMBEDDING_COLUMN])
            for k, v in zip(t.column("raw_key").to_pylist(), t.column(EMBEDDING_COLUMN).to_pylist()):
                if k in wanted and v is not None:
                    vectors[k] = v
        if CLIP_BYTES_COLUMN in names:  # derived samples (video clips): their media are in the part, not the raw shard
            t = pq.read_table(part, columns=["uid", "raw_key", "media", CLIP_BYTES_COLUMN])
            picked = {u for u in picks["uid"]}
            for uid, key, media, data in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                if data is not None and uid in picked and key in wanted:
                    where = wanted.pop(key)
                    rows.append({"shard_id": where[0], "pos": where[1], "names": media[:1], "datas": [data],
                                 "embedding": vectors.get(key)})
                    size += len(data)
                    if size >= BLOCK_BYTES:  # a shard's clips can add up: blocks stay bounded
                        yield pa.Table.from_pylist(rows, schema=MEDIA_SCHEMA)
                        rows, size = [], 0
    for row, files in (rawshards.read_shard(shard, source) if wanted else ()):
        # Only a sample the reader kept can have been picked (a later duplicate of a key fails)
        where = wanted.get(row["raw_key"]) if row["status"] == "kept" else None
        if where is None:
            continue
        members, _ = tier_members(row, files)
        rows.append({"shard_id": where[0], "pos": where[1], "names": [m[0] for m in members],
                     "datas": [m[1] for m in members], "embedding": vectors.get(row["raw_key"])})
        size += sum(len(m[1]) for m in members)
        if size >= BLOCK_BYTES:
            yield pa.Table.from_pylist(rows, schema=MEDIA_SCHEMA)
            rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=MEDIA_SCHEMA)
    read = max(shard.size, 0) if wanted else 0  # a shard that feeds only clips is not read
    atomic_write_text(Path(stats_dir) / f"{shard.name}.json", json.dumps({"raw_bytes_read": read}))


def write_group(group: pa.Table, sidecars_dir: str, tiers_dir: str, entries_dir: str, declared: tuple = ()) -> pa.Table:
    """map_groups function: one tier shard's media rows -> its tar, sidecar, embeddings."""
    group = group.sort_by("pos")
    shard_id = group.column("shard_id")[0].as_py()
    rows = pq.read_table(Path(sidecars_dir) / f"shard_id={shard_id}").sort_by("pos").to_pylist()
    positions = group.column("pos").to_pylist()
    if positions != [r["pos"] for r in rows]:
        raise RuntimeError(f"tier shard {shard_id}: media for positions {positions[:5]}... do not match its "
                           f"{len(rows)} planned samples")
    media = [list(zip(n, d)) for n, d in zip(group.column("names").to_pylist(), group.column("datas").to_pylist())]
    embeddings = group.column("embedding").to_pylist()
    tier, name = rows[0]["tier"], rows[0]["shard"]
    tier_dir = Path(tiers_dir) / tier
    tier_dir.mkdir(parents=True, exist_ok=True)
    try:
        entry = write_shard(tier_dir / name, rows, media, embeddings, declared=declared)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise DiskFullError(f"no space left while writing tier shard {tier}/{name} ({exc.strerror}); nothing partial "
                                "was left; free space, then run the same command again to resume") from None
        raise
    atomic_write_text(Path(entries_dir) / f"{name.removesuffix('.tar')}.json", json.dumps(entry, sort_keys=True) + "\n")
    return pa.table({"shard_id": [shard_id], "samples": [entry["samples"]]})


def build_tiers(cfg, decision: Decision, raw_shards: list, parts: dict[str, list[Path]], out: Path,
                work: Path, source: str) -> tuple[dict[str, dict], int]:
    """Write every planned tier shard not yet written, then the manifests. Returns the
    manifests and the raw bytes read."""
    import ray.data

    from ..runtime.ray_env import READ_TASK_CPUS, cluster_cpus

    tiers_dir, entries_dir, stats_dir = out / "tiers", work / "entries", work / "read_stats"
    entries_dir.mkdir(parents=True, exist_ok=True)
    stats_dir.mkdir(parents=True, exist_ok=True)
    for f in stats_dir.glob("*.json"):
        f.unlink()
    done = {p.name.removesuffix(".json") for p in entries_dir.glob("*.json")}
    pending = [s for s in decision.shards if s["name"] not in done]
    raw_read = 0
    if pending:
        pending_path = None
        con = duckdb.connect()
        picks_glob = sql_str(str(decision.picks / "*" / "*.parquet"))
        if len(pending) < len(decision.shards):
            pending_path = work / "pending_shards.parquet"
            pq.write_table(pa.table({"shard_id": pa.array([s["shard_id"] for s in pending], pa.int64())}), pending_path)
            needed = con.execute(f"""SELECT DISTINCT raw_idx FROM read_parquet({picks_glob}, hive_partitioning = true)
                                     WHERE shard_id IN (SELECT shard_id FROM read_parquet({sql_str(str(pending_path))}))
                                     ORDER BY raw_idx""").fetchall()
        else:
            needed = con.execute(f"SELECT DISTINCT raw_idx FROM read_parquet({picks_glob}, hive_partitioning = true) ORDER BY raw_idx").fetchall()
        items = [{"raw_path": as_shard(raw_shards[i]).token(), "picks": str(decision.picks_path(i)), "source": source,
                  "parts": json.dumps([str(p) for p in parts[raw_shards[i].name]])} for (i,) in needed]
        # The shuffle's map side coalesces its input up to this many bytes per task before
        # partitioning (Ray's default, 1 GiB, made one worker's heap grow with the run up
        # to that size); one read block per map task keeps it at BLOCK_BYTES.
        ray.data.DataContext.get_current().shuffle_input_batch_bytes = BLOCK_BYTES
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(read_picked, batch_size=1, num_cpus=READ_TASK_CPUS,
                            fn_kwargs={"pending_path": str(pending_path) if pending_path else None, "stats_dir": str(stats_dir)})
        # Reduce partitions hold whole tier shards: enough of them that each stays near
        # PARTITION_BYTES, and at least one per CPU so writing runs in parallel.
        media_bytes = sum(s["bytes"] for s in pending)
        partitions = max(1, min(len(pending), max(int(cluster_cpus()) * 2, -(-media_bytes // PARTITION_BYTES))))
        ds = ds.groupby("shard_id", num_partitions=partitions).map_groups(
            write_group, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"sidecars_dir": str(decision.sidecars), "tiers_dir": str(tiers_dir), "entries_dir": str(entries_dir),
                       "declared": cfg.declared_columns})
        with progress_bar(sum(s["samples"] for s in decision.shards), "write tiers") as bar:
            bar.update(sum(s["samples"] for s in decision.shards) - sum(s["samples"] for s in pending))
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                bar.update(sum(batch.column("samples").to_pylist()))
        raw_read = sum(json.loads(f.read_text())["raw_bytes_read"] for f in stats_dir.glob("*.json"))
    entries: dict[str, list] = {r.name: [] for r in cfg.tiers}
    for s in decision.shards:
        entries[s["tier"]].append(json.loads((entries_dir / f"{s['name']}.json").read_text()))
    manifests = {}
    for rule in cfg.tiers:
        tier_dir = tiers_dir / rule.name
        tier_dir.mkdir(parents=True, exist_ok=True)
        manifests[rule.name] = write_manifest(tier_dir, rule.name, cfg, entries[rule.name])
        write_card(tier_dir, manifests[rule.name])  # README.md: `datasets.load_dataset(tier_dir)` loads the tars
    return manifests, raw_read

