"""Exact and perceptual-hash near-duplicate removal over the whole run.

Both keep one representative per group and drop the rest with reason duplicate_exact /
duplicate_near and dup_of = the representative's uid. Groups never mix kinds: a document
whose first image looks like a single image is not a redundant sample. The representative is the
largest image (most pixels), ties broken by uid, so the choice never depends on the
order in which Ray delivered the rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

import pyarrow as pa

from ..decide import PREFERENCE, near_pairs_sql, sql_list, sql_str, star_claims
from ..errors import ConfigError
from .base import LIVE, GlobalOp, register


def _dedup_groups(ctx, source: str, reason: str) -> int:
    """Drop all but the preferred member of each group. `source` is a query with columns
    uid, kind, grp, width, height over live rows; groups never mix kinds."""
    ctx.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _dups AS
        SELECT uid, first_value(uid) OVER w AS dup_of FROM ({source})
        WINDOW w AS (PARTITION BY kind, grp ORDER BY {PREFERENCE})
        QUALIFY row_number() OVER w > 1""")
    return ctx.drop("_dups", reason)


@register
class ExactDedup(GlobalOp):
    """Byte-identical media (same sha256; a document's hash covers all its images)."""

    name = "exact_dedup"
    reasons = ("duplicate_exact",)
    version = "1"
    requires = ("sha256",)

    def decide(self, ctx) -> None:
        _dedup_groups(ctx, "SELECT uid, kind, sha256 AS grp, width, height FROM samples "
                           "WHERE status = 'kept' AND sha256 IS NOT NULL", "duplicate_exact")


@register
class NearDedup(GlobalOp):
    """Perceptual near-duplicates: phash within max_hamming bits (of 64).

    Star clustering, not connected components: samples are visited in preference order
    (most pixels, then uid); an unclaimed sample becomes a representative and claims
    every unclaimed neighbour within max_hamming of *itself*. So every dropped sample is
    truly close to the uid in its dup_of, and chains A~B~C never merge A with C.
    Samples with one hash share their neighbours, so the search runs over distinct
    hashes: exact block-equality joins in DuckDB (see decide.block_scheme), then star
    clustering over the pairs found (nodes with a neighbour only).
    Run after exact_dedup so byte-identical copies say so."""

    name = "near_dedup"
    reasons = ("duplicate_near",)
    version = "1"
    requires = ("phash",)

    @dataclasses.dataclass
    class Params:
        max_hamming: int = 6

    @classmethod
    def check_params(cls, params, where):
        if not 0 <= params.max_hamming <= 32:
            raise ConfigError(f"{where} (near_dedup): max_hamming must be in 0..32")

    def decide(self, ctx) -> None:
        con = ctx.con
        if "phash" not in ctx.columns:
            return  # no operator hashed anything (video-only input): nothing to compare
        # Distinct hashes per kind, numbered in the preference order of their best member.
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _hashed AS
            SELECT uid, kind, width, height, ('0x' || phash)::UBIGINT AS h,
                   row_number() OVER (ORDER BY {PREFERENCE}) AS pref
            FROM samples WHERE status = 'kept' AND phash IS NOT NULL AND regexp_full_match(phash, '[0-9a-f]{{16}}')""")
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _distinct AS
            SELECT kind AS grp, h, row_number() OVER (ORDER BY min(pref)) - 1 AS hid FROM _hashed GROUP BY kind, h""")
        near_pairs_sql(con, "_distinct", self.params.max_hamming)
        a, b = (np.asarray(c, dtype=np.int64) for c in zip(*con.execute("SELECT a, b FROM _pairs").fetchall())) \
            if con.execute("SELECT count(*) FROM _pairs").fetchall()[0][0] else (np.empty(0, np.int64),) * 2
        claims = star_claims(a, b)
        con.register("_claims_arrow", pa.table({"hid": pa.array(list(claims), pa.int64()),
                                                "rep": pa.array(list(claims.values()), pa.int64())}))
        _dedup_groups(ctx, """SELECT x.uid, x.kind, coalesce(c.rep, d.hid) AS grp, x.width, x.height
                              FROM _hashed x JOIN _distinct d ON d.grp = x.kind AND d.h = x.h
                              LEFT JOIN _claims_arrow c ON c.hid = d.hid""", "duplicate_near")
        con.unregister("_claims_arrow")


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Spherical k-means (cosine) on unit rows; returns a cluster label per row."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)]
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = np.argmax(x @ centroids.T, axis=1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
    return labels


@register
class SemanticDedup(GlobalOp):
    """SemDeDup-style semantic near-duplicates on CLIP image embeddings (needs
    `clip_score` with `keep_embeddings: true`): spherical k-means into clusters, then
    within each cluster every pair with cosine similarity >= `threshold` is a duplicate.
    Star clustering in preference order, as near_dedup: a dropped sample's dup_of is a
    representative it is itself that close to. Clusters only bound the pairwise work
    (SemDeDup's trick); a pair split across clusters is missed, as in the paper.

    At scale: k-means is fitted on a seeded sample (`sample_size` rows) on the driver;
    assigning every row to its centroid runs as one task per annotated file; DuckDB then
    gathers each cluster's live rows into buckets (out of core), and each bucket's
    within-cluster comparisons run as one task."""

    name = "semantic_dedup"
    reasons = ("duplicate_semantic",)
    version = "1"
    requires = ("clip_embedding",)  # clip.EMBEDDING_COLUMN: clip_score with keep_embeddings: true

    @dataclasses.dataclass
    class Params:
        threshold: float = 0.95
        clusters: int = 0  # 0: about sqrt(n / 2)
        seed: int = 0
        sample_size: int = 50000  # rows the k-means is fitted on
        bucket_rows: int = 100000  # rows per comparison task (whole clusters, so a bucket may hold more)

    @classmethod
    def check_params(cls, params, where):
        if not 0 < params.threshold <= 1 or params.clusters < 0 or params.sample_size < 1 or params.bucket_rows < 1:
            raise ConfigError(f"{where} (semantic_dedup): need 0 < threshold <= 1, clusters >= 0, sample_size >= 1, bucket_rows >= 1")

    def decide(self, ctx) -> None:
        from .clip import EMBEDDING_COLUMN

        flag = f"has_{EMBEDDING_COLUMN}"
        if flag not in ctx.columns and not ctx.con.execute(
                f"SELECT count(*) FROM information_schema.columns WHERE table_name = 'samples' AND column_name = '{flag}'").fetchall()[0][0]:
            raise ConfigError("semantic_dedup needs image embeddings: set keep_embeddings: true on clip_score")
        con, p = ctx.con, self.params
        live = f"status = 'kept' AND {flag}"
        kinds = con.execute(f"SELECT kind, count(*) FROM samples WHERE {live} GROUP BY kind ORDER BY kind").fetchall()
        if not kinds:
            return
        scratch = ctx.scratch / "semantic_dedup"
        scratch.mkdir(parents=True, exist_ok=True)
        annotated = sql_list(ctx.annotated)
        centroids = {}
        for kind, n in kinds:
            k = min(p.clusters or max(1, int(np.sqrt(n / 2))), n)
            rows = con.execute(f"""
                SELECT e.{EMBEDDING_COLUMN} FROM read_parquet({annotated}, union_by_name = true) e
                JOIN (SELECT raw_shard, raw_key, uid FROM samples WHERE {live} AND kind = {sql_str(kind)}
                      ORDER BY md5(uid || '/' || {int(p.seed)}) LIMIT {int(p.sample_size)}) s USING (raw_shard, raw_key)
                ORDER BY s.uid""").fetchall()
            centroids[kind] = fit_centroids(_unit_rows([r[0] for r in rows]), k, p.seed)
        np.savez(scratch / "centroids.npz", **{f"k{i}": centroids[kind] for i, (kind, _) in enumerate(kinds)})
        kind_index = {kind: f"k{i}" for i, (kind, _) in enumerate(kinds)}
        (scratch / "assign").mkdir(exist_ok=True)
        ctx.map_tasks(assign_clusters, [(str(path), str(scratch / "centroids.npz"), kind_index,
                                         str(scratch / "assign" / f"{i:06d}.parquet")) for i, path in enumerate(ctx.annotated)])
        total = sum(n for _, n in kinds)
        buckets = max(1, int(np.ceil(total / p.bucket_rows)))
        con.execute(f"""
            COPY (SELECT s.uid, s.kind, a.cluster, s.width, s.height, a.embedding,
                         hash(s.kind, a.cluster) % {buckets} AS bucket
                  FROM samples s JOIN read_parquet({sql_str(str(scratch / 'assign' / '*.parquet'))}) a
                    ON s.raw_shard = a.raw_shard AND s.raw_key = a.raw_key AND s.kind = a.kind
                  WHERE s.{live})
            TO {sql_str(str(scratch / 'buckets'))} (FORMAT parquet, PARTITION_BY (bucket))""")
        (scratch / "dups").mkdir(exist_ok=True)
        bucket_dirs = sorted((scratch / "buckets").glob("bucket=*"))
        ctx.map_tasks(dedup_bucket, [(str(d), p.threshold, str(scratch / "dups" / f"{d.name}.parquet")) for d in bucket_dirs])
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _dups AS
                        SELECT * FROM read_parquet({sql_str(str(scratch / 'dups' / '*.parquet'))})""")
        ctx.drop("_dups", "duplicate_semantic")


def _unit_rows(blobs: list[bytes]) -> np.ndarray:
    x = np.stack([np.frombuffer(b, dtype=np.float16) for b in blobs]).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_centroids(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Spherical k-means (cosine) on unit rows; returns the unit centroids."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=min(k, len(x)), replace=False)].copy()
    for _ in range(iters):
        labels = np.argmax(x @ centroids.T, axis=1)
        for c in range(len(centroids)):
            members = x[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
    return centroids


def assign_clusters(annotated: str, centroids_path: str, kind_index: dict[str, str], out: str) -> int:
    """Task: every row of one annotated file that has an embedding -> its nearest centroid."""
    import pyarrow.parquet as pq

    from .clip import EMBEDDING_COLUMN

    names = pq.read_schema(annotated).names
    if EMBEDDING_COLUMN not in names:
        table = None
    else:
        table = pq.read_table(annotated, columns=["raw_shard", "raw_key", "kind", EMBEDDING_COLUMN])
    centroids = np.load(centroids_path)
    parts = []
    if table is not None:
        frame = table.to_pandas()
        frame = frame[frame[EMBEDDING_COLUMN].notna() & frame["kind"].isin(list(kind_index))]
        for kind, rows in frame.groupby("kind"):
            labels = np.argmax(_unit_rows(list(rows[EMBEDDING_COLUMN])) @ centroids[kind_index[kind]].T, axis=1)
            parts.append(pa.table({"raw_shard": rows["raw_shard"].tolist(), "raw_key": rows["raw_key"].tolist(),
                                   "kind": rows["kind"].tolist(), "cluster": pa.array(labels, pa.int64()),
                                   "embedding": pa.array(rows[EMBEDDING_COLUMN].tolist(), pa.binary())}))
    schema = pa.schema([("raw_shard", pa.string()), ("raw_key", pa.string()), ("kind", pa.string()),
                        ("cluster", pa.int64()), ("embedding", pa.binary())])
    result = pa.concat_tables(parts) if parts else schema.empty_table()
    pq.write_table(result.cast(schema), out)
    return len(result)


def dedup_bucket(bucket_dir: str, threshold: float, out: str, chunk: int = 2048) -> int:
    """Task: star clustering inside every cluster of one bucket; writes (uid, dup_of)."""
    import pyarrow.parquet as pq

    frame = pq.read_table(bucket_dir).to_pandas()
    pixels = frame["width"].fillna(0).astype("int64") * frame["height"].fillna(0).astype("int64")
    frame = frame.assign(_pixels=pixels).sort_values(["kind", "cluster", "_pixels", "uid"], ascending=[True, True, False, True])
    uids, reps = [], []
    for _, members in frame.groupby(["kind", "cluster"], sort=True):
        if len(members) < 2:
            continue
        x = _unit_rows(list(members["embedding"]))
        a_list, b_list = [], []
        for lo in range(0, len(x), chunk):  # similarities a chunk of rows at a time
            sims = x[lo:lo + chunk] @ x.T
            a, b = np.nonzero(sims >= threshold)
            a = a + lo
            keep = a < b
            a_list.append(a[keep])
            b_list.append(b[keep])
        claims = star_claims(np.concatenate(a_list), np.concatenate(b_list))
        member_uids = members["uid"].tolist()
        for node, rep in sorted(claims.items()):
            uids.append(member_uids[node])
            reps.append(member_uids[rep])
    pq.write_table(pa.table({"uid": pa.array(uids, pa.string()), "dup_of": pa.array(reps, pa.string())}), out)
    return len(uids)
