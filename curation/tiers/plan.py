"""Stage plans: which samples of which tiers a training stage reads, and what they cost.

Strategies follow LLaVA-NeXT's data YAML: `all`, `first:N`, `end:N`, `random:N`, with N a
count or a percentage of the tier. Tier order is the shards' seeded order; `random`
draws with a generator seeded from the pipeline seed and the stage and tier names, so a
plan is reproducible. `balanced:t` is MetaCLIP's concept balancing over the `concepts`
column (the `concepts` operator): see `balance`. The plan file lists, per stage, each tier's shards and (unless the
strategy takes everything) the keys to read from each shard: the trainer streams exactly
that.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import find_run_root
from ..config import PipelineConfig
from ..decide import DEFAULT_MEMORY_LIMIT
from ..errors import ConfigError, InputError
from ..fsutil import atomic_write_text
from ..tokens import text_tokens, visual_tokens


def sample_text_tokens(text: str | None, source_meta: str | None) -> int:
    """Text a trainer sees for a sample: its caption plus its question/answer pairs. Not
    the rest of `source_meta` (a crawl's metadata, e.g. MMC4's per-image records), which
    no trainer reads."""
    from .export.core import qa_pairs

    return text_tokens(text) + sum(text_tokens(q) + text_tokens(a) for q, a in qa_pairs(source_meta))


BALANCED = "balanced:"
NO_CONCEPT = "(no concept)"  # how the samples that match no entry are shown
CONCEPT_TOP = 10  # head entries listed per balanced tier in the plan


def strategy_count(rows: int, strategy: str) -> int:
    """How many of a tier's `rows` samples `strategy` selects (not for balanced:t, whose
    count depends on the samples' concepts: see `balance`)."""
    if strategy == "all":
        return rows
    if strategy.startswith(BALANCED):
        raise ValueError(f"{strategy}: the count depends on the samples' concepts; use plan.balance")
    n = strategy.split(":")[1]
    return round(rows * int(n[:-1]) / 100) if n.endswith("%") else min(int(n), rows)


def chosen_positions(rows: int, strategy: str, seed_text: str) -> np.ndarray | None:
    """Positions (in tier order, ascending) of the samples of a `rows`-sample tier that
    `strategy` chooses; None for `all` (every one). Not for balanced:t (see `balance`)."""
    if strategy == "all":
        return None
    count = strategy_count(rows, strategy)
    how = strategy.split(":")[0]
    if how == "first":
        return np.arange(count, dtype=np.int64)
    if how == "end":
        return np.arange(rows - count, rows, dtype=np.int64)
    seed = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "big")
    return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False)).astype(np.int64)


def select(frame: pd.DataFrame, strategy: str, seed_text: str) -> pd.DataFrame:
    """Rows of `frame` (in tier order) chosen by `strategy`."""
    if strategy.startswith(BALANCED):  # the frame needs uid and concepts
        con = duckdb.connect()
        con.register("balance_input", pa.table({
            "uid": pa.array(frame["uid"].astype(str).tolist(), pa.string()),
            "concepts": pa.array([None if c is None else [str(e) for e in c] for c in frame["concepts"]],
                                 pa.list_(pa.string()))}))
        kept, _ = balance(con, "balance_input", int(strategy[len(BALANCED):]), seed_text)
        return frame[frame["uid"].isin(kept)]
    positions = chosen_positions(len(frame), strategy, seed_text)
    return frame if positions is None else frame.iloc[positions]


def _balance_sql(relation: str, cap: int) -> str:
    """Per (sample, entry) pair: the entry's count in `relation` (uid, concepts) and
    whether the pair keeps its sample. A sample that matches no entry has one pair with a
    NULL entry: those samples are one more bucket, capped like an entry."""
    return f"""
        WITH sample_entries AS (
            SELECT uid, CASE WHEN len(coalesce(concepts, [])) = 0 THEN [NULL::VARCHAR]
                             ELSE list_distinct(concepts) END AS entries
            FROM {relation}),
        pairs AS (SELECT uid, unnest(entries) AS entry FROM sample_entries),
        counts AS (SELECT entry, count(*) AS n FROM pairs GROUP BY entry),
        decided AS (
            SELECT p.uid, p.entry, c.n,
                   c.n <= {cap} OR md5_number_lower($seed || chr(31) || p.uid || chr(31) || coalesce(p.entry, ''))
                                   / 18446744073709551616.0 < {cap} / c.n AS keeps
            FROM pairs p JOIN counts c ON p.entry IS NOT DISTINCT FROM c.entry),
        samples_kept AS (SELECT uid, bool_or(keeps) AS kept FROM decided GROUP BY uid)"""


def balance(con: duckdb.DuckDBPyConnection, relation: str, cap: int, seed_text: str,
            top: int = CONCEPT_TOP) -> tuple[set[str], dict]:
    """MetaCLIP's balancing of the samples of `relation` (a table or SQL source with
    `uid` and `concepts`): an entry matched by at most `cap` samples keeps all of them
    (the tail); a more frequent one keeps each of its samples with probability
    cap / count; a sample is kept when any of its entries keeps it. Samples with no
    entry are one more bucket, capped the same way (MetaCLIP drops them outright; a tier
    rule `len(concepts) > 0` does that). Each (sample, entry) draw is a hash of the seed
    text, uid and entry, so the result does not depend on row order and is the same on
    every run. Runs in DuckDB. Returns the kept uids and the concept distribution:
    samples before/after; the head (entries over `cap`), the `top` largest one by one;
    the tail; the no-concept bucket. Counts are (sample, entry) matches."""
    kept = {uid for (uid,) in con.execute(f"{_balance_sql(relation, cap)} SELECT uid FROM samples_kept WHERE kept",
                                          {"seed": seed_text}).fetchall()}
    return kept, balance_summary(con, relation, cap, seed_text, top)


def balance_summary(con: duckdb.DuckDBPyConnection, relation: str, cap: int, seed_text: str,
                    top: int = CONCEPT_TOP) -> dict:
    """`balance`'s concept distribution alone, without the kept uids."""
    base = _balance_sql(relation, cap)
    params = {"seed": seed_text}
    per_entry = con.execute(f"""{base}
        SELECT d.entry, count(*) AS before, count(*) FILTER (WHERE s.kept) AS after
        FROM decided d JOIN samples_kept s USING (uid) GROUP BY d.entry""", params).fetchall()
    total = con.execute(f"{base} SELECT count(*), count(*) FILTER (WHERE kept) FROM samples_kept", params).fetchall()[0]
    entries = sorted((r for r in per_entry if r[0] is not None), key=lambda r: (-r[1], r[0]))
    head = [r for r in entries if r[1] > cap]
    tail = [r for r in entries if r[1] <= cap]
    none = next(((b, a) for e, b, a in per_entry if e is None), (0, 0))
    return {
        "cap": cap, "samples": {"before": total[0], "after": total[1]},
        "entries": len(entries),
        "head": [{"entry": e, "before": b, "after": a} for e, b, a in head[:top]],
        "more_head": {"entries": len(head[top:]), "before": sum(b for _, b, _ in head[top:]),
                      "after": sum(a for _, _, a in head[top:])},
        "tail": {"entries": len(tail), "max_count": max((b for _, b, _ in tail), default=0),
                 "before": sum(b for _, b, _ in tail), "after": sum(a for _, _, a in tail)},
        "no_concept": {"before": none[0], "after": none[1]},
    }


def balanced_count(con: duckdb.DuckDBPyConnection, tier: str, strategy: str, seed_text: str) -> int:
    """How many samples of `tier` in view `samples` (curation.catalog) `strategy`
    (balanced:t) keeps: the report's bill when there is no plan.json. A run without the
    concepts column counts as all its samples unmatched."""
    columns = {row[0] for row in con.execute("DESCRIBE samples").fetchall()}
    concepts = "concepts" if "concepts" in columns else "NULL::VARCHAR[]"
    tier_sql = str(tier).replace("'", "''")
    relation = f"(SELECT uid, {concepts} AS concepts FROM samples WHERE tier = '{tier_sql}')"
    return con.execute(f"{_balance_sql(relation, int(strategy[len(BALANCED):]))} "
                       "SELECT count(*) FILTER (WHERE kept) FROM samples_kept", {"seed": seed_text}).fetchall()[0][0]


PLAN_BATCH_ROWS = 8192  # sidecar rows held at once while a plan reads a tier
PLAN_COLUMNS = ("key", "kind", "width", "height", "num_images", "num_frames", "text", "source_meta")


class _TierSidecars:
    """One tier's sidecars in tier order (shard by shard, row by row: the tars' order),
    read through DuckDB: counts and balancing out of core, rows in bounded batches."""

    def __init__(self, run_root: Path, tier: str, spill: Path):
        self.tier = tier
        # DuckDB's memory is capped like stage B's, spilling to `spill` beyond it; rows
        # stream in the order they are read (tier order)
        self.con = duckdb.connect(config={"memory_limit": DEFAULT_MEMORY_LIMIT, "temp_directory": str(spill),
                                          "preserve_insertion_order": True})
        files = [str(f) for f in sorted((run_root / "tiers" / tier).glob("*.parquet"))]
        counts = self.con.sql("SELECT filename, min(shard), max(shard), count(*) FROM read_parquet($files, "
                              "filename = true) GROUP BY filename", params={"files": files}).fetchall() if files else []
        # (shard, file, first position, rows); a sidecar holds one shard (tiers.writer), and an
        # empty one none
        self.sidecars: list[tuple[str, str, int, int]] = []
        position = 0
        for file, shard, last_shard, rows in sorted(counts, key=lambda r: (r[1], r[0])):
            if shard != last_shard:
                raise InputError(f"sidecar {file} holds rows of shards {shard} and {last_shard}; a sidecar is one shard")
            self.sidecars.append((shard, file, position, rows))
            position += rows
        self.rows = position

    def balanced_positions(self, cap: int, seed_text: str, where: str) -> tuple[np.ndarray, dict]:
        """`balance` over the tier: the kept samples' positions (ascending) and the summary."""
        if not self.rows:
            empty = "(SELECT NULL::VARCHAR AS uid, NULL::VARCHAR[] AS concepts WHERE false)"
            return np.empty(0, np.int64), balance_summary(self.con, empty, cap, seed_text)
        self.con.sql("SELECT * FROM read_parquet($files, union_by_name = true, filename = true, file_row_number = true)",
                     params={"files": [f for _, f, _, _ in self.sidecars]}).create_view("tier_samples")
        columns = {row[0] for row in self.con.execute("DESCRIBE tier_samples").fetchall()}
        if "concepts" not in columns or not self.con.sql("SELECT count(concepts) FROM tier_samples").fetchall()[0][0]:
            raise ConfigError(f"{where}: balanced:{cap} needs the samples' concepts, and tier {self.tier} has none: "
                              "add the `concepts` operator to the recipe (before the tiers are written)")
        self.con.register("sidecar_starts", pa.table({"filename": [f for _, f, _, _ in self.sidecars],
                                                      "start": [p for _, _, p, _ in self.sidecars]}))
        # the kept uids stay in DuckDB: joined back to their rows' positions
        positions = self.con.execute(f"""{_balance_sql("tier_samples", cap)}
            SELECT s.start + t.file_row_number AS position
            FROM tier_samples t JOIN sidecar_starts s USING (filename)
            WHERE t.uid IN (SELECT uid FROM samples_kept WHERE kept) ORDER BY position""",
                                     {"seed": seed_text}).fetchnumpy()["position"]
        return positions.astype(np.int64), balance_summary(self.con, "tier_samples", cap, seed_text)

    def tally(self, positions: np.ndarray | None, with_keys: bool) -> dict:
        """Samples and token costs of the chosen rows (`positions`; None: every row) and
        their shards: each shard's chosen keys, or None when `with_keys` is false."""
        totals = dict.fromkeys(("samples", "images", "frames", "visual_tokens", "text_tokens"), 0)
        shards: dict[str, list[str] | None] = {}
        wanted = [(shard, file, start) for shard, file, start, rows in self.sidecars if positions is None
                  or np.searchsorted(positions, start) < np.searchsorted(positions, start + rows)]
        if not wanted:
            return {**totals, "shards": shards}
        files = pa.array([file for _, file, _ in wanted], pa.string())
        starts = np.array([start for _, _, start in wanted], np.int64)
        source = "read_parquet($files, union_by_name = true, filename = true, file_row_number = true)"
        params = {"files": files.to_pylist()}
        present = {row[0] for row in self.con.sql(f"DESCRIBE SELECT * FROM {source}", params=params).fetchall()}
        picked = ", ".join(c if c in present else f"NULL AS {c}" for c in PLAN_COLUMNS)
        for batch in _record_batches(self.con, f"SELECT filename, file_row_number, {picked} FROM {source}", params):
            sidecar = pc.index_in(batch.column("filename"), value_set=files).to_numpy()
            if positions is not None:  # keep the chosen rows only, before any becomes Python objects
                at = starts[sidecar] + batch.column("file_row_number").to_numpy()
                found = positions[np.minimum(np.searchsorted(positions, at), len(positions) - 1)] == at
                batch, sidecar = batch.filter(pa.array(found)), sidecar[found]
            rows = batch.to_pydict()
            for i, (kind, width, height, num_images, num_frames) in enumerate(zip(
                    rows["kind"], rows["width"], rows["height"], rows["num_images"], rows["num_frames"])):
                images, frames, tokens = visual_tokens(kind, width, height, num_images, num_frames)
                totals["images"] += images
                totals["frames"] += frames
                totals["visual_tokens"] += tokens
                totals["text_tokens"] += sample_text_tokens(rows["text"][i], rows["source_meta"][i])
                keys = shards.setdefault(wanted[sidecar[i]][0], [] if with_keys else None)
                if with_keys:
                    keys.append(rows["key"][i])
            totals["samples"] += batch.num_rows
        return {**totals, "shards": shards}


def _record_batches(con: duckdb.DuckDBPyConnection, sql: str, params: dict):
    """The rows of `sql` in order, PLAN_BATCH_ROWS at a time (never the whole result)."""
    yield from con.sql(sql, params=params).to_arrow_reader(PLAN_BATCH_ROWS)


def make_plan(cfg: PipelineConfig, root: str | Path) -> dict:
    """The stages' selections over a run's tiers. Memory is a batch of sidecar rows plus
    the plan itself (its key lists): each tier is counted and balanced in DuckDB and its
    rows streamed in PLAN_BATCH_ROWS batches, once per mix entry."""
    if not cfg.stages:
        raise ConfigError(f"{cfg.path} defines no 'stages'; add stages: [{{name, mix: [{{tier, strategy}}]}}]")
    run_root = find_run_root(root)
    with tempfile.TemporaryDirectory(prefix="curate-plan-") as spill:
        stages = _plan_stages(cfg, run_root, Path(spill))
    return {"pipeline": cfg.name, "config_hash": cfg.config_hash, "recipe_version": cfg.version, "seed": cfg.seed,
            "root": str(run_root.resolve()), "stages": stages}


def _plan_stages(cfg: PipelineConfig, run_root: Path, spill: Path) -> list[dict]:
    tiers: dict[str, _TierSidecars] = {}
    stages = []
    for stage in cfg.stages:
        mix = []
        for entry in stage.mix:
            if entry.tier not in tiers:
                tiers[entry.tier] = _TierSidecars(run_root, entry.tier, spill)
            tier = tiers[entry.tier]
            seed_text = f"{cfg.seed}/{stage.name}/{entry.tier}"
            concepts = None
            if entry.strategy.startswith(BALANCED):
                positions, concepts = tier.balanced_positions(int(entry.strategy[len(BALANCED):]), seed_text,
                                                              f"stage {stage.name}, tier {entry.tier}")
            else:
                positions = chosen_positions(tier.rows, entry.strategy, seed_text)
            tally = tier.tally(positions, with_keys=entry.strategy != "all")
            mix.append({"tier": entry.tier, "strategy": entry.strategy, **tally,
                        **({"concepts": concepts} if concepts is not None else {})})
        totals = {k: sum(m[k] for m in mix) for k in ("samples", "images", "frames", "visual_tokens", "text_tokens")}
        stages.append({"name": stage.name, "mix": mix, "totals": totals})
    return stages


def write_plan(plan: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(plan, indent=1) + "\n")


def format_bill(plan: dict) -> str:
    lines = [f"{'stage':<22} {'tier':<18} {'strategy':<12} {'samples':>8} {'images':>7} {'frames':>7} "
             f"{'visual tok':>12} {'text tok':>10}"]
    for st in plan["stages"]:
        for m in st["mix"]:
            lines.append(f"{st['name']:<22} {m['tier']:<18} {m['strategy']:<12} {m['samples']:>8} {m['images']:>7} "
                         f"{m['frames']:>7} {m['visual_tokens']:>12,} {m['text_tokens']:>10,}")
        t = st["totals"]
        lines.append(f"{st['name']:<22} {'= total':<18} {'':<12} {t['samples']:>8} {t['images']:>7} {t['frames']:>7} "
                     f"{t['visual_tokens']:>12,} {t['text_tokens']:>10,}")
    for st in plan["stages"]:
        for m in st["mix"]:
            if m.get("concepts"):
                lines += ["", *format_concepts(st["name"], m["tier"], m["concepts"])]
    return "\n".join(lines)


def format_concepts(stage: str, tier: str, c: dict) -> list[str]:
    """A balanced tier's concept distribution: samples per entry before and after."""
    n = c["samples"]
    lines = [f"concepts of {tier} in {stage} (balanced:{c['cap']}): {n['before']} -> {n['after']} samples, "
             f"{c['entries']} entries matched",
             f"  {'entry':<28} {'before':>8} {'after':>8}"]
    lines += [f"  {e['entry'][:28]:<28} {e['before']:>8} {e['after']:>8}" for e in c["head"]]
    tail, none, more = c["tail"], c["no_concept"], c["more_head"]
    if more["entries"]:
        lines.append(f"  {'other head: ' + str(more['entries']) + ' entries':<28} {more['before']:>8} {more['after']:>8}")
    lines.append(f"  {'tail: ' + str(tail['entries']) + ' entries <= ' + str(c['cap']):<28} {tail['before']:>8} "
                 f"{tail['after']:>8}  (largest tail entry: {tail['max_count']})")
    lines.append(f"  {NO_CONCEPT:<28} {none['before']:>8} {none['after']:>8}")
    return lines
