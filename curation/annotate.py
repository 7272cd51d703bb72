"""Stage A: raw shards -> annotated rows, committed per raw shard by the workers.

Ray Data reads each raw shard once (blocks of READ_BLOCK_ROWS rows, media validated
for the tier on the way), runs the map operators in actor pools, and a last task writes
each batch's rows as parquet "parts" under `_work/annotated/<raw shard>/` after routing
them to tiers (tier predicates are row-local, so they run here, in parallel, on real
rows as early as possible). The driver receives only (raw shard, part, rows) triples;
when every sample of a raw shard is in acknowledged parts it writes the shard's commit
marker `<raw shard>.done.json` naming them. A re-run skips committed shards and
deletes whatever an interrupted attempt left for the others, so a SIGKILL at any
point loses or duplicates nothing.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa

from . import rawshards, schemas
from .config import OpSpec, PipelineConfig
from .errors import AccountingError
from .fsutil import atomic_write_parquet, atomic_write_text
from .ids import seeded_rank
from .ops.clip import EMBEDDING_COLUMN
from .ops.clips import CLIP_BYTES_COLUMN, NUM_CLIPS_COLUMN
from .tiers import routing

INT_COLUMNS = ("width", "height", "num_bytes", "num_images", "num_frames", NUM_CLIPS_COLUMN)
# Working columns that are bytes, never sidecar columns: media, embeddings (saved as
# .npy), and a derived sample's media (in no raw shard: stage C takes them from the parts).
BINARY_COLUMNS = ("image_bytes", EMBEDDING_COLUMN, CLIP_BYTES_COLUMN)
# What media.tier_members tells about the tier's copy of the media (kept through stage A).
MEDIA_COLUMNS = ("image_format", "source_format", "conversion")
READ_BLOCK_ROWS = 64  # rows per block out of a raw shard: enough blocks to keep every actor busy
PART_ROWS = 1024  # rows per part file a worker writes (parts never mix raw shards)
# After a node loss, how long stage A may return nothing before it is planned again for
# the nodes that remain (a model stage's batch can take minutes on a slow CPU node).
STALL_SECONDS = float(os.environ.get("CURATION_STALL_SECONDS", "300"))


def stage_schema(columns: list[str], declared: schemas.Declared = ()) -> pa.Schema:
    sidecar = schemas.arrow_schema("sidecar", declared)
    fields = []
    for col in columns:
        if col in BINARY_COLUMNS:
            fields.append(pa.field(col, pa.binary()))
        elif col in sidecar.names:
            fields.append(sidecar.field(col))
        elif col in INT_COLUMNS:
            fields.append(pa.field(col, pa.int64()))
        else:
            fields.append(pa.field(col, pa.string()))
    return pa.schema(fields)


def validate_media(row: dict, files: dict[str, bytes]) -> None:
    """Check now that the writer will be able to carry this sample (every image of a
    document under the pixel cap and decodable, a video that opens), and record what
    the tier will hold. A sample that cannot be written fails here, in the ledger,
    instead of stopping stage C."""
    from .media import MediaError, tier_members

    if row["status"] != "kept":
        return
    try:
        _, updates = tier_members(row, files)
    except MediaError as exc:
        # Over the pixel cap is policy (dropped, as decode_image does); broken media failed.
        row.update(status="dropped" if exc.reason == "too_many_pixels" else "failed", reason=exc.reason,
                   error=str(exc)[:300])
        return
    row.update(updates)


def read_raw_shards(batch: dict) -> Iterator[pa.Table]:
    """map_batches function: raw shard paths -> their sample rows (with media bytes), as
    Arrow tables of READ_BLOCK_ROWS rows. One block per shard would give a pool's
    second actor nothing to do until the next shard, and no overlap between stages."""
    schema = stage_schema([*rawshards.READ_COLUMNS, *(c for c in MEDIA_COLUMNS if c not in rawshards.READ_COLUMNS)])
    rows: list[dict] = []
    for path, source in zip(batch["path"], batch["source"]):
        for row, files in rawshards.read_shard(path, source):  # a shard token, url or path
            validate_media(row, files)
            rows.append({c: row.get(c) for c in schema.names})
            if len(rows) == READ_BLOCK_ROWS:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


class StageActor:
    """One actor of a fused stage: builds its operators once, then runs them in order
    on every batch. Returns Arrow with a fixed schema so blocks always concatenate."""

    def __init__(self, specs: list[OpSpec], declared: schemas.Declared = ()):
        self.ops = [s.build() for s in specs]
        self.declared = declared  # the run's own columns (any stage's): typed as declared

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        schemas.plain_columns(batch, "sidecar", self.declared)  # lists and dicts, not numpy arrays, for the operators
        for op in self.ops:
            batch = op(batch)
        batch = batch.drop(columns=[c for c in batch.columns if c.startswith("_")])
        for col in INT_COLUMNS:
            if col in batch.columns:
                batch[col] = pd.array(batch[col].map(lambda v: None if pd.isna(v) else int(v)), dtype="Int64")
        return pa.Table.from_pandas(batch, schema=stage_schema(list(batch.columns), self.declared), preserve_index=False)


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


def write_parts(batch: pa.Table, parts_root: str, tiers, seed: int, declared: schemas.Declared = ()) -> pa.Table:
    """Last task of stage A: route the batch's kept rows to tiers, give every row its
    seeded tier-order rank, and write one part per raw shard in the batch. Returns
    only (raw_shard, part, rows, derived, derived_expected) for the driver: input rows,
    derived rows (video clips) written, and derived rows its inputs announced."""
    if "parent_uid" in batch.column_names:  # a kept derived sample's media are in no raw shard: they go in the part
        import pyarrow.compute as pc

        carry = pc.and_(pc.is_valid(batch["parent_uid"]), pc.equal(batch["status"], "kept"))
        batch = batch.append_column(CLIP_BYTES_COLUMN, pc.if_else(carry, batch["image_bytes"].cast(pa.binary()),
                                                                  pa.scalar(None, pa.binary())))
    frame = schemas.plain_columns(batch.drop_columns([c for c in ("image_bytes",) if c in batch.column_names]).to_pandas(),
                                  "sidecar", declared)
    frame["tier_rank"] = [seeded_rank(seed, u) for u in frame["uid"]]
    live = frame["status"] == "kept"
    frame["tier"] = None
    if live.any():
        tiers_of, errors = routing.route_rows(frame[live], tiers, declared)
        frame.loc[live, "tier"] = tiers_of
        bad = errors.notna()
        if bad.any():
            idx = errors[bad].index
            frame.loc[idx, "status"] = "failed"
            frame.loc[idx, "reason"] = "routing_error"
            frame.loc[idx, "error"] = errors[bad]
    out = {"raw_shard": [], "part": [], "rows": [], "derived": [], "derived_expected": []}
    for name, part in frame.groupby("raw_shard", sort=False):
        folder = Path(parts_root) / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.parquet"
        table = pa.Table.from_pandas(part.reset_index(drop=True), schema=stage_schema(list(part.columns), declared),
                                     preserve_index=False)
        atomic_write_parquet(table, path)
        out["raw_shard"].append(name)
        out["part"].append(path.name)
        derived = part["parent_uid"].notna() if "parent_uid" in part.columns else pd.Series(False, index=part.index)
        out["rows"].append(int((~derived).sum()))
        out["derived"].append(int(derived.sum()))
        announced = part.loc[~derived, NUM_CLIPS_COLUMN] if NUM_CLIPS_COLUMN in part.columns else pd.Series([], dtype=float)
        out["derived_expected"].append(int(announced.fillna(0).sum()))
    return pa.table({"raw_shard": pa.array(out["raw_shard"], pa.string()), "part": pa.array(out["part"], pa.string()),
                     **{c: pa.array(out[c], pa.int64()) for c in ("rows", "derived", "derived_expected")}})


def marker_path(annotated: Path, raw_shard) -> Path:
    """raw_shard: a ShardRef, a Path or a shard name."""
    return annotated / f"{Path(getattr(raw_shard, 'name', raw_shard)).stem}.done.json"


def committed_parts(annotated: Path, raw_shard: Path) -> list[Path]:
    doc = json.loads(marker_path(annotated, raw_shard).read_text())
    return [annotated / raw_shard.stem / p for p in doc["parts"]]


def _commit(annotated: Path, raw_shard: str, parts: list[str], rows: int) -> None:
    atomic_write_text(marker_path(annotated, raw_shard), json.dumps({"parts": sorted(parts), "rows": rows}) + "\n")


def progress_bar(total: int, desc: str):
    """The one progress bar style of the job's stages (samples, on stderr)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def run_stage_a(cfg: PipelineConfig, shards: list[Path], counts: dict[str, int], annotated: Path, source: str) -> int:
    """Annotate every raw shard not yet committed. Returns the raw bytes it read."""
    import ray.data

    from .runtime.ray_env import cluster_cpus, cluster_gpus, node_cpus, plan_pools

    annotated.mkdir(parents=True, exist_ok=True)
    shards = [rawshards.as_shard(p) for p in shards]
    todo = [p for p in shards if not marker_path(annotated, p).exists()]
    for p in todo:  # whatever an interrupted attempt left behind is not acknowledged: start clean
        shutil.rmtree(annotated / p.stem, ignore_errors=True)
    for p in [p for p in todo if counts[p.name] == 0]:
        _commit(annotated, p.name, [], 0)
    todo = [p for p in todo if counts[p.name] > 0]
    if not todo:
        return 0
    ds = ray.data.from_items([{"path": p.token(), "source": source} for p in todo], override_num_blocks=len(todo))
    nodes = node_cpus()
    # Readers claim no CPU: the fixed-size pools may take every CPU (e.g. a dead node's
    # actors restarted on the survivors), and a reader waiting for CPU would hang the job.
    # No more readers than nodes, so that reads stay bounded in memory.
    ds = ds.map_batches(read_raw_shards, batch_size=1, num_cpus=0, concurrency=max(1, sum(c > 0 for c in nodes)))
    stages = fuse(cfg.map_ops)
    gpus = cluster_gpus()
    # A model operator's GPU share applies where there are GPUs; elsewhere it runs on CPU.
    import dataclasses

    wanted = [s[0].resources if gpus else dataclasses.replace(s[0].resources, num_gpus=0) for s in stages]
    pools = plan_pools(wanted, cluster_cpus(), gpus, heavy=[not s[0].cls.fusable for s in stages], nodes=nodes)
    for stage, res, (size, num_cpus) in zip(stages, wanted, pools):
        ds = ds.map_batches(
            StageActor, fn_constructor_kwargs={"specs": stage, "declared": cfg.declared_columns}, batch_format="pandas",
            batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=num_cpus, num_gpus=res.num_gpus,
        )
    # num_cpus=0 too: a part writer that waited for CPU would stall stage A behind reads
    # piling up in the object store.
    ds = ds.map_batches(write_parts, batch_format="pyarrow", batch_size=PART_ROWS, num_cpus=0,
                        fn_kwargs={"parts_root": str(annotated), "tiers": cfg.tiers, "seed": cfg.seed,
                                   "declared": cfg.declared_columns})

    with progress_bar(sum(counts[p.name] for p in todo), "curate") as bar:
        _collect(ds, counts, annotated, bar, planned_cpus=sum(nodes), cpus_now=lambda: sum(node_cpus()))
    missing = [p.name for p in todo if not marker_path(annotated, p).exists()]
    if missing:
        raise AccountingError(f"samples missing after stage A for raw shards {missing[:5]}")
    for p in todo:  # a retried task may have left a part nobody acknowledged
        listed = {f.name for f in committed_parts(annotated, p)}
        for stray in (annotated / p.stem).glob("*"):
            if stray.name not in listed:
                stray.unlink()
    return sum(max(p.size, 0) for p in todo)


class ClusterShrank(Exception):
    """Stage A made no progress for a while after the cluster lost CPUs: the actors of a
    lost node may be waiting for CPU that the fixed-size pools on the survivors hold. The
    runner starts stage A again, planned for the nodes that remain; committed raw shards
    are kept."""


def _results(ds, stop: threading.Event, out: queue.Queue) -> None:
    """Thread body: stage A's result batches into `out`, then ("end", None) or ("error", exc)."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if not put(("batch", batch)):
                return
        put(("end", None))
    except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread as is
        put(("error", exc))


def _batches(ds, planned_cpus: float, cpus_now, stall_s: float) -> Iterator[pa.Table]:
    """Stage A's result batches. A node lost mid-run is survivable while the pools still
    progress; if the cluster has fewer CPUs than planned and nothing arrived for
    `stall_s` seconds, raise ClusterShrank instead of waiting forever."""
    stop, out = threading.Event(), queue.Queue(maxsize=4)
    thread = threading.Thread(target=_results, args=(ds, stop, out), daemon=True, name="stage-a-results")
    thread.start()
    last = time.monotonic()
    try:
        while True:
            try:
                kind, item = out.get(timeout=min(5.0, stall_s / 4))
            except queue.Empty:
                if time.monotonic() - last >= stall_s:
                    now = cpus_now()
                    if now < planned_cpus - 1e-9:
                        raise ClusterShrank(f"the cluster has {now:g} of the {planned_cpus:g} CPUs stage A was planned "
                                            f"for, and no rows came back for {stall_s:g} s") from None
                continue
            last = time.monotonic()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def _collect(ds, counts: dict[str, int], annotated: Path, bar, planned_cpus: float = 0.0, cpus_now=None,
             stall_s: float = STALL_SECONDS) -> None:
    """The driver's whole share of stage A: count acknowledged rows per raw shard and
    commit a shard once all of its samples, and every sample derived from them (video
    clips, which Ray may write in another part than their parent), are in parts."""
    acked: dict[str, list[str]] = defaultdict(list)
    got: dict[str, int] = defaultdict(int)
    derived: dict[str, int] = defaultdict(int)  # derived rows written minus announced
    for batch in _batches(ds, planned_cpus, cpus_now or (lambda: planned_cpus), stall_s):
        zeros = [0] * batch.num_rows
        columns = [batch.column(c).to_pylist() if c in batch.column_names else zeros
                   for c in ("raw_shard", "part", "rows", "derived", "derived_expected")]
        for name, part, n, made, announced in zip(*columns):
            acked[name].append(part)
            got[name] += n
            derived[name] += made - announced
            if got[name] == counts[name] and derived[name] == 0:
                _commit(annotated, name, acked.pop(name), got[name])
            elif got[name] > counts[name]:
                raise AccountingError(f"raw shard {name}: got {got[name]} rows back for {counts[name]} samples")
            bar.update(n)
