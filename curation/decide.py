"""Stage B: whole-run decisions without a whole-run frame in one process.

The annotated rows of every raw shard (stage A's output, media excluded) are loaded
into an on-disk DuckDB database under `_work/`, which runs with a memory limit and
spills to disk, so the driver's memory is bounded by configuration, not by the run.
There the global operators update `status` / `reason` / `dup_of` with SQL, the kept
samples are cut into tier shards in their seeded order, and the results leave as
files the other stages read in parallel:

  _work/decide/picks/raw_idx=N/*.parquet         per raw shard: which keys go to which tier shard, at which position
  _work/decide/sidecars/shard_id=N/*.parquet     per tier shard: its sidecar rows, in order
  _work/decide/shards.json                       the tier shards (id, tier, name, samples, bytes) and counts; written last
  _work/decide/ledger.parquet                    every input once (stage 'curate'), ordered by uid

Everything here is deterministic (ties broken by uid), so recomputing it after a crash
gives the same files. Nothing here needs Ray: global operators that want parallel
tasks (semantic dedup) get them through `DecideContext.map_tasks`, which runs serially
when no cluster is given. That keeps this stage unit-testable in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import shutil
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .errors import AccountingError
from .fsutil import atomic_write_text

# Preference among duplicates: the largest image first, ties by uid (independent of row order).
PREFERENCE = "coalesce(width, 0)::BIGINT * coalesce(height, 0)::BIGINT DESC, uid"
# Per-sample overhead in a tar beyond its media: three 512-byte headers, padding, txt, json.
SAMPLE_OVERHEAD_BYTES = 3072
DEFAULT_MEMORY_LIMIT = "512MB"


def sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(paths: Iterable[Path | str]) -> str:
    return "[" + ", ".join(sql_str(str(p)) for p in paths) + "]"


def serial_map(fn: Callable, args: list[tuple]) -> list:
    return [fn(*a) for a in args]


@dataclass
class DecideContext:
    """What a global operator gets: the DuckDB connection holding table `samples`
    (one row per input, media excluded), where stage A's files are, a scratch folder,
    and a way to run functions as parallel tasks."""

    con: duckdb.DuckDBPyConnection
    annotated: list[Path]
    scratch: Path
    seed: int = 0
    map_tasks: Callable[[Callable, list[tuple]], list] = serial_map
    columns: set[str] = field(default_factory=set)

    def drop(self, table: str, reason: str) -> int:
        """Drop the live samples listed in temp table `table` (columns uid, dup_of)."""
        self.con.execute(f"""
            UPDATE samples SET status = 'dropped', reason = {sql_str(reason)}, dup_of = t.dup_of
            FROM {table} t WHERE samples.uid = t.uid AND samples.status = 'kept'""")
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def connect(db_path: Path, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh on-disk database that spills to `<db>.tmp/` beyond `memory_limit`."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (db_path, db_path.with_suffix(".duckdb.wal")):
        stale.unlink(missing_ok=True)
    spill = db_path.parent / (db_path.name + ".tmp")
    shutil.rmtree(spill, ignore_errors=True)
    con = duckdb.connect(str(db_path))
    con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
    con.execute(f"SET temp_directory = {sql_str(str(spill))}")
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def parquet_columns(paths: list[Path]) -> list[str]:
    """Union of the column names of `paths`, in first-seen order (reads footers only)."""
    seen: dict[str, None] = {}
    for p in paths:
        for name in pq.read_schema(p).names:
            seen.setdefault(name, None)
    return list(seen)


def load_samples(con: duckdb.DuckDBPyConnection, annotated: list[Path], binary_columns: tuple[str, ...]) -> set[str]:
    """Table `samples` from stage A's files, without media and embeddings (a flag says
    whether a row has an embedding). Returns the columns present."""
    columns = parquet_columns(annotated)
    keep = [c for c in columns if c not in binary_columns]
    select = ", ".join(f'"{c}"' for c in keep)
    flags = "".join(f', "{c}" IS NOT NULL AS "has_{c}"' for c in binary_columns if c in columns)
    con.execute(f"""CREATE TABLE samples AS SELECT {select}{flags}
                    FROM read_parquet({sql_list(annotated)}, union_by_name = true)""")
    for col in ("dup_of", "tier", "shard", "key", "tier_rank", "error", "reason", "stage"):
        if col not in keep:
            con.execute(f'ALTER TABLE samples ADD COLUMN "{col}" VARCHAR')
    return set(keep) | {"dup_of", "tier", "shard", "key", "tier_rank", "stage"}


def resolve_uid_conflicts(con: duckdb.DuckDBPyConnection) -> int:
    """Two raw samples claiming one uid are one input stored twice, or a producer's lie:
    the first (by raw shard, key) keeps the uid; each other gets a uid derived from where
    it lies and fails as `duplicate_uid`. Costs only those samples, never the run."""
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _conflicts AS
        SELECT raw_shard, raw_key, uid AS claimed, first_value(raw_shard || '/' || raw_key) OVER w AS holder,
               row_number() OVER w AS rn
        FROM samples
        WINDOW w AS (PARTITION BY uid ORDER BY raw_shard, raw_key)
        QUALIFY count(*) OVER (PARTITION BY uid) > 1""")
    n = con.execute("SELECT count(*) FROM _conflicts WHERE rn > 1").fetchall()[0][0]
    if n:
        con.execute("""
            UPDATE samples SET uid = substr(md5('duplicate_uid/' || c.raw_shard || '/' || c.raw_key), 1, 16),
                   status = 'failed', reason = 'duplicate_uid', stage = NULL,
                   error = 'uid ' || c.claimed || ' is also claimed by ' || c.holder
            FROM _conflicts c
            WHERE samples.raw_shard = c.raw_shard AND samples.raw_key = c.raw_key AND c.rn > 1""")
    return n


# ------------------------------------------------------------------ near-duplicate search
def block_scheme(max_hamming: int, n: int) -> tuple[list[tuple[int, int]], int]:
    """Split 64 bits into m blocks; two hashes within k bits differ in at most k blocks,
    so they agree on some m - k blocks (pigeonhole). Each choice of m - k blocks is one
    equality join, so the search is exact. m is chosen to minimise joins x candidates
    for n distinct hashes. Returns (block bit ranges, m - k)."""
    k = max_hamming
    best = None
    for m in range(k + 1, 65):
        edges = np.linspace(0, 64, m + 1).astype(int)
        sizes = sorted(int(b - a) for a, b in zip(edges[:-1], edges[1:]))
        key_bits = sum(sizes[: m - k])
        joins = math.comb(m, m - k)
        cost = joins * (n + n * n / 2.0 ** key_bits)
        if best is None or cost < best[0]:
            best = (cost, [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])])
        if joins > 5000:
            break
    blocks = best[1]
    return blocks, len(blocks) - k


def near_pairs_sql(con: duckdb.DuckDBPyConnection, hashes: str, max_hamming: int) -> str:
    """Fill temp table _pairs(a, b) with every pair of rows of `hashes` (columns
    grp, hid, h UBIGINT; hid unique) in the same grp within max_hamming bits, a < b."""
    n = con.execute(f"SELECT count(*) FROM {hashes}").fetchall()[0][0]
    con.execute("CREATE OR REPLACE TEMP TABLE _pairs (a BIGINT, b BIGINT)")
    if n < 2:
        return "_pairs"
    for mask in block_masks(max_hamming, n):
        con.execute(f"""
            INSERT INTO _pairs
            SELECT x.hid, y.hid FROM {hashes} x JOIN {hashes} y
              ON x.grp = y.grp AND (x.h & {mask}::UBIGINT) = (y.h & {mask}::UBIGINT) AND x.hid < y.hid
            WHERE bit_count(xor(x.h, y.h)) <= {max_hamming}""")
    con.execute("CREATE OR REPLACE TEMP TABLE _pairs AS SELECT DISTINCT a, b FROM _pairs")
    return "_pairs"


def block_masks(max_hamming: int, n: int) -> list[int]:
    """One 64-bit mask per equality join of block_scheme: hashes within max_hamming
    bits agree under at least one of them."""
    blocks, take = block_scheme(max_hamming, n)
    masks = []
    for chosen in combinations(blocks, take):
        mask = 0
        for lo, hi in chosen:
            mask |= ((1 << (hi - lo)) - 1) << lo
        masks.append(mask)
    return masks


def near_pairs_across_sql(con: duckdb.DuckDBPyConnection, left: str, right: str, max_hamming: int) -> str:
    """Fill temp table _cross_pairs(a, b) with every pair of a row of `left` and a row
    of `right` (columns hid, h UBIGINT) within max_hamming bits: the same banded
    equality joins as near_pairs_sql, out of core in DuckDB."""
    n = max(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in (left, right))
    con.execute("CREATE OR REPLACE TEMP TABLE _cross_pairs (a BIGINT, b BIGINT)")
    if n < 1:
        return "_cross_pairs"
    for mask in block_masks(max_hamming, n):
        con.execute(f"""
            INSERT INTO _cross_pairs
            SELECT x.hid, y.hid FROM {left} x JOIN {right} y ON (x.h & {mask}::UBIGINT) = (y.h & {mask}::UBIGINT)
            WHERE bit_count(xor(x.h, y.h)) <= {max_hamming}""")
    con.execute("CREATE OR REPLACE TEMP TABLE _cross_pairs AS SELECT DISTINCT a, b FROM _cross_pairs")
    return "_cross_pairs"


def star_claims(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Star clustering over an edge list of nodes numbered in preference order: the
    first unclaimed node becomes a representative and claims its unclaimed neighbours.
    Returns {claimed node: its representative}. Loops over nodes with edges only."""
    if len(a) == 0:
        return {}
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    nodes, starts = np.unique(src, return_index=True)
    ends = np.append(starts[1:], len(src))
    claimed: dict[int, int] = {}
    for node, lo, hi in zip(nodes.tolist(), starts.tolist(), ends.tolist()):
        if node in claimed:
            continue
        for other in dst[lo:hi].tolist():
            if other not in claimed and other != node:
                claimed[other] = node
        claimed.setdefault(node, node)
    return {k: v for k, v in claimed.items() if k != v}


# ------------------------------------------------------------------ shard cutting
def cut_shards(num_bytes: np.ndarray, max_samples: int, max_bytes: int | None, state: dict | None = None) -> tuple[np.ndarray, dict]:
    """Shard index per sample of one tier, in tier order: a shard closes at max_samples,
    or before a sample would push it past max_bytes (media bytes + overhead); a lone
    oversized sample still gets a shard of its own. Works chunk by chunk: `state`
    carries the open shard into the next chunk. Loops per shard, not per sample."""
    state = dict(state or {"shard": 0, "count": 0, "size": 0})
    b = num_bytes.astype(np.int64) + SAMPLE_OVERHEAD_BYTES
    csum = np.cumsum(b)
    out = np.empty(len(b), dtype=np.int64)
    p = 0
    while p < len(b):
        room = max_samples - state["count"]
        if room <= 0:
            state.update(shard=state["shard"] + 1, count=0, size=0)
            continue
        take = room
        if max_bytes:
            base = csum[p - 1] if p else 0
            fit = int(np.searchsorted(csum, base + (max_bytes - state["size"]), side="right")) - p
            if fit <= 0 and state["count"] > 0:
                state.update(shard=state["shard"] + 1, count=0, size=0)
                continue
            take = min(take, max(fit, 1))
        take = min(take, len(b) - p)
        out[p:p + take] = state["shard"]
        state["count"] += take
        state["size"] += int(csum[p + take - 1] - (csum[p - 1] if p else 0))
        p += take
        if state["count"] >= max_samples:
            state.update(shard=state["shard"] + 1, count=0, size=0)
    return out, state


CHUNK_ROWS = 1 << 18


def assign_shards(con: duckdb.DuckDBPyConnection, tiers: list[str], max_samples: int, max_bytes: int | None) -> None:
    """Give every kept, routed sample its tier shard (shard_id, shard name, position),
    tiers in rule order, each in seeded order (tier_rank, then uid). Streams each tier
    in chunks, so memory is bounded whatever the tier's size."""
    con.execute("CREATE OR REPLACE TABLE _assign (uid VARCHAR, shard_id BIGINT, pos BIGINT)")
    cursor = con.cursor()  # streams a tier while `con` inserts its assignments
    con.execute("CREATE OR REPLACE TABLE shards (shard_id BIGINT, tier VARCHAR, name VARCHAR, samples BIGINT, bytes BIGINT)")
    next_id = 0
    for tier in tiers:
        reader = cursor.sql(f"""SELECT uid, coalesce(num_bytes, 0)::BIGINT AS num_bytes FROM samples
                                WHERE status = 'kept' AND tier = {sql_str(tier)} ORDER BY tier_rank, uid""").to_arrow_reader(CHUNK_ROWS)
        state, pos = None, 0
        for batch in reader:
            idx, state = cut_shards(batch.column("num_bytes").to_numpy(zero_copy_only=False), max_samples, max_bytes, state)
            chunk = pa.table({"uid": batch.column("uid"), "shard_id": pa.array(idx + next_id),
                              "pos": pa.array(np.arange(pos, pos + len(idx), dtype=np.int64))})
            pos += len(idx)
            con.register("_chunk", chunk)
            con.execute("INSERT INTO _assign SELECT * FROM _chunk")
            con.unregister("_chunk")
        if state is not None:
            used = state["shard"] + (1 if state["count"] else 0)
            con.execute(f"""INSERT INTO shards SELECT a.shard_id, {sql_str(tier)},
                               {sql_str(tier)} || '-' || lpad((a.shard_id - {next_id})::VARCHAR, 6, '0'), count(*),
                               sum(coalesce(s.num_bytes, 0))
                            FROM _assign a JOIN samples s USING (uid) WHERE a.shard_id >= {next_id} GROUP BY a.shard_id""")
            next_id += used
    # Rebuilding the table is far cheaper in DuckDB than an UPDATE of most of its rows.
    con.execute("""CREATE OR REPLACE TABLE samples AS
                   SELECT s.* EXCLUDE (shard, key), a.shard_id, a.pos,
                          CASE WHEN a.shard_id IS NOT NULL THEN sh.name || '.tar' END AS shard,
                          CASE WHEN a.shard_id IS NOT NULL THEN s.uid END AS key
                   FROM samples s LEFT JOIN _assign a USING (uid) LEFT JOIN shards sh USING (shard_id)""")
    con.execute("DROP TABLE _assign")


# ------------------------------------------------------------------ the stage
@dataclass
class Decision:
    """What stage B leaves for stage C and the ledger."""

    folder: Path
    shards: list[dict]  # shard_id, tier, name, samples, bytes (media)
    counts: dict[str, int]  # inputs by status: they add up to the raw samples
    derived: dict[str, int] = field(default_factory=dict)  # samples the run made (video clips), by status

    @property
    def picks(self) -> Path:
        return self.folder / "picks"

    @property
    def sidecars(self) -> Path:
        return self.folder / "sidecars"

    @property
    def ledger(self) -> Path:
        return self.folder / "ledger.parquet"

    def sidecar_rows_path(self, shard_id: int) -> Path:
        return self.sidecars / f"shard_id={shard_id}"

    def picks_path(self, raw_idx: int) -> Path:
        return self.picks / f"raw_idx={raw_idx}"


def route_unrouted(con: duckdb.DuckDBPyConnection) -> None:
    """Stage A routed every row it kept; a sample still kept now but matching no tier is
    dropped as `unrouted`, and only kept samples keep a tier."""
    con.execute("UPDATE samples SET status = 'dropped', reason = 'unrouted' WHERE status = 'kept' AND tier IS NULL")
    con.execute("UPDATE samples SET tier = NULL WHERE status <> 'kept'")


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.float64(): "DOUBLE",
                 pa.bool_(): "BOOLEAN", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


def duckdb_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    if pa.types.is_struct(arrow_type):
        return "STRUCT(" + ", ".join(f'"{f.name}" {duckdb_type(f.type)}' for f in arrow_type) + ")"
    return _DUCKDB_TYPES[arrow_type]


def ledger_null(col: str) -> str:
    """A null of the ledger column's type: ledgers without the column (a crawl by an
    older version, the curate rows' fetch columns) union with those that have it."""
    return f"CAST(NULL AS {duckdb_type(schemas.arrow_schema('ledger').field(col).type)})"


def export(con: duckdb.DuckDBPyConnection, folder: Path, raw_names: list[str], lineage: dict[str, str],
           sidecar_columns: list[str], present: set[str]) -> Decision:
    """`lineage`: SQL expressions of the columns that are the same on every row."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    raw = pa.table({"raw_shard": raw_names, "raw_idx": pa.array(range(len(raw_names)), pa.int64())})
    con.register("_raw", raw)
    con.execute("CREATE OR REPLACE TEMP TABLE raw_index AS SELECT * FROM _raw")
    con.unregister("_raw")
    con.execute(f"""COPY (SELECT r.raw_idx, s.raw_key, s.shard_id, s.pos, s.uid FROM samples s JOIN raw_index r USING (raw_shard)
                          WHERE s.status = 'kept' ORDER BY s.raw_key)
                    TO {sql_str(str(folder / 'picks'))} (FORMAT parquet, PARTITION_BY (raw_idx))""")
    exprs = []
    for col in sidecar_columns:
        if col in lineage:
            exprs.append(f'{lineage[col]} AS "{col}"')
        elif col in present:
            exprs.append(f'"{col}"')
        else:
            exprs.append(f'NULL AS "{col}"')
    con.execute(f"""COPY (SELECT shard_id, pos, {', '.join(exprs)} FROM samples WHERE status = 'kept' ORDER BY shard_id, pos)
                    TO {sql_str(str(folder / 'sidecars'))} (FORMAT parquet, PARTITION_BY (shard_id))""")
    ledger_exprs = []
    for col in schemas.columns("ledger"):
        if col == "stage":  # the reader says "crawl" for a crawler's failure rows (rawshards rule 5)
            ledger_exprs.append("coalesce(stage, 'curate') AS stage")
        elif col in ("tier", "shard"):  # only kept samples sit in a tier shard
            ledger_exprs.append(f'CASE WHEN status = \'kept\' THEN "{col}" END AS "{col}"')
        elif col in present:
            ledger_exprs.append(f'"{col}"')
        else:
            ledger_exprs.append(f'{ledger_null(col)} AS "{col}"')
    con.execute(f"""COPY (SELECT {', '.join(ledger_exprs)} FROM samples ORDER BY uid)
                    TO {sql_str(str(folder / 'ledger.parquet'))} (FORMAT parquet)""")
    shards = [dict(zip(("shard_id", "tier", "name", "samples", "bytes"), r))
              for r in con.execute("SELECT shard_id, tier, name, samples, bytes FROM shards ORDER BY shard_id").fetchall()]
    # Inputs and the samples derived from them (parent_uid set) are counted apart, so
    # that inputs = kept + dropped + failed still holds.
    derived = "parent_uid IS NOT NULL" if "parent_uid" in present else "false"
    counts = {(d, k): int(v) for d, k, v in con.execute(
        f"SELECT {derived} AS d, status, count(*) FROM samples GROUP BY ALL ORDER BY ALL").fetchall()}
    decision = Decision(folder, shards, {k: v for (d, k), v in counts.items() if not d},
                        {k: v for (d, k), v in counts.items() if d})
    doc = {"shards": shards, "counts": decision.counts, **({"derived": decision.derived} if decision.derived else {})}
    atomic_write_text(folder / "shards.json", json.dumps(doc, indent=1) + "\n")
    return decision


def load_decision(folder: Path) -> Decision | None:
    done = folder / "shards.json"
    if not done.exists():
        return None
    doc = json.loads(done.read_text())
    return Decision(folder, doc["shards"], doc["counts"], doc.get("derived", {}))


@contextlib.contextmanager
def _step(name: str):
    """One progress line per step of stage B on stderr (it shows no bar)."""
    t = time.time()
    yield
    print(f"decide: {name} {time.time() - t:.1f} s", file=sys.stderr, flush=True)


def decide(cfg, annotated: list[Path], raw_names: list[str], work: Path, *, binary_columns: tuple[str, ...],
           memory_limit: str = DEFAULT_MEMORY_LIMIT, map_tasks: Callable = serial_map, threads: int | None = None) -> Decision:
    """Run stage B over stage A's files; returns where its outputs are. `shards.json`
    is written last, so a decision on disk is complete."""
    folder = work / "decide"
    con = connect(work / "decide.duckdb", memory_limit, threads)
    try:
        with _step("load"):
            present = load_samples(con, annotated, binary_columns)
            resolve_uid_conflicts(con)
        scratch = work / "decide_scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        ctx = DecideContext(con, annotated, scratch, cfg.seed, map_tasks, present)
        for spec in cfg.global_ops:
            with _step(spec.name):
                spec.build().decide(ctx)
        with _step("shard cuts"):
            route_unrouted(con)
            assign_shards(con, [r.name for r in cfg.tiers], cfg.shard.max_samples, cfg.shard.max_bytes)
        lineage = {"pipeline": sql_str(cfg.name), "config_hash": sql_str(cfg.config_hash),
                   "op_versions": f"CAST(json({sql_str(json.dumps(cfg.op_versions, sort_keys=True))}) AS MAP(VARCHAR, VARCHAR))"}
        with _step("export"):
            decision = export(con, folder, raw_names, lineage, schemas.columns("sidecar", cfg.declared_columns),
                              present | {"shard_id", "pos"})
        shutil.rmtree(scratch, ignore_errors=True)
        return decision
    finally:
        con.close()
        (work / "decide.duckdb").unlink(missing_ok=True)
        shutil.rmtree(work / "decide.duckdb.tmp", ignore_errors=True)


def apply_global_ops(frame, ops: list, seed: int = 0, binary_columns: tuple[str, ...] = ("image_bytes", "clip_embedding")):
    """Global operators over an in-memory pandas frame (rows with uid, kind, status,
    reason and whatever the operators read; embeddings as bytes); returns the frame with
    their decisions. For tests and notebooks: the job runs the same operators, the same
    way, over stage A's files in `decide`."""
    import tempfile

    import pandas as pd

    frame = frame.copy()
    for col in ("reason", "dup_of", "error"):
        frame[col] = (frame[col] if col in frame.columns else pd.Series(None, index=frame.index)).astype("string")
    if "raw_shard" not in frame.columns:
        frame["raw_shard"] = "memory"
    if "raw_key" not in frame.columns:
        frame["raw_key"] = frame["uid"]
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith("_")])
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.parquet"
        frame.to_parquet(part, index=False)
        con = duckdb.connect()
        columns = load_samples(con, [part], binary_columns)
        ctx = DecideContext(con, [part], Path(tmp), seed, serial_map, columns)
        before = set(columns)
        for op in ops:
            op.decide(ctx)
        # decisions, plus the ledger columns an operator added (decontaminate's contaminated_by)
        wanted = ["status", "reason", "dup_of", *sorted(c for c in set(ctx.columns) - before if c in schemas.columns("ledger"))]
        out = con.execute(f"SELECT uid, {', '.join(wanted)} FROM samples").df().set_index("uid")
    result = frame.set_index("uid")
    result[wanted] = out.loc[result.index, wanted].astype(object)
    return result.reset_index().astype(object).where(lambda f: f.notna(), None)


def check_accounting(counts: dict[str, int], n_raw: int) -> dict[str, int]:
    if sum(counts.values()) != n_raw:
        raise AccountingError(f"raw samples {n_raw} != kept + dropped + failed {counts}")
    return counts


def finalize_ledger(curate_ledger: Path, crawl_ledgers: list[Path], out: Path, batch_rows: int = 1 << 16,
                    memory_limit: str = DEFAULT_MEMORY_LIMIT) -> int:
    """The run's ledger: crawl rows that never reached a raw shard, plus every curated
    row, ordered by uid, checked against the contract batch by batch (streamed: memory
    is one batch plus DuckDB's sort within its limit, spilling beside `out`). The
    crawl's kept uids must be exactly the curated inputs (derived rows, with parent_uid,
    were never crawled)."""
    con = duckdb.connect()
    con.execute(f"SET memory_limit = {sql_str(memory_limit)}")
    con.execute(f"SET temp_directory = {sql_str(str(out.parent / '_work' / 'ledger.tmp'))}")
    con.execute("SET preserve_insertion_order = true")
    cur = f"read_parquet({sql_str(str(curate_ledger))})"
    parts = [f"SELECT * FROM {cur}"]
    if crawl_ledgers:
        crawl = f"read_parquet({sql_list(crawl_ledgers)}, union_by_name = true)"
        unknown, missing = con.execute(f"""SELECT
            (SELECT count(*) FROM (SELECT uid FROM {cur} WHERE reason IS DISTINCT FROM 'duplicate_uid'
                                   AND parent_uid IS NULL EXCEPT SELECT uid FROM {crawl} WHERE status = 'kept')),
            (SELECT count(*) FROM (SELECT uid FROM {crawl} WHERE status = 'kept' EXCEPT SELECT uid FROM {cur}))""").fetchall()[0]
        if unknown or missing:
            raise AccountingError(f"raw shards and the crawl ledger disagree: {unknown} curated samples the crawl did not keep, "
                                  f"{missing} kept by the crawl but missing from the raw shards")
        cols = ", ".join(f'"{c}"' if c in parquet_columns(crawl_ledgers) else f'{ledger_null(c)} AS "{c}"'
                         for c in schemas.columns("ledger"))
        parts.insert(0, f"SELECT {cols} FROM {crawl} WHERE status <> 'kept'")
    schema = schemas.arrow_schema("ledger")
    reader = con.sql(f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY uid, stage").to_arrow_reader(batch_rows)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in reader:
            table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
            schemas.validate_rows("ledger", schemas.plain_rows("ledger", table.to_pylist()))
            writer.write_table(table)
            n += len(table)
    tmp.replace(out)
    return n


def summary_rows(ledger_paths: list[Path]) -> list[dict[str, Any]]:
    """Counts by stage, status and reason over the ledger files, without loading them."""
    con = duckdb.connect()
    rows = con.execute(f"""SELECT stage, status, coalesce(reason, '') AS reason, count(*) FROM read_parquet({sql_list(ledger_paths)}, union_by_name = true)
                           GROUP BY ALL ORDER BY ALL""").fetchall()
    return [{"stage": s, "status": st, "reason": r, "count": int(n)} for s, st, r, n in rows]
