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
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from ..catalog import find_run_root
from ..config import PipelineConfig
from ..errors import ConfigError
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


def select(frame: pd.DataFrame, strategy: str, seed_text: str) -> pd.DataFrame:
    """Rows of `frame` (in tier order) chosen by `strategy`."""
    if strategy == "all":
        return frame
    how = strategy.split(":")[0]
    if how == "balanced":  # the frame needs uid and concepts
        con = duckdb.connect()
        con.register("balance_input", pa.table({
            "uid": pa.array(frame["uid"].astype(str).tolist(), pa.string()),
            "concepts": pa.array([None if c is None else [str(e) for e in c] for c in frame["concepts"]],
                                 pa.list_(pa.string()))}))
        kept, _ = balance(con, "balance_input", int(strategy.split(":")[1]), seed_text)
        return frame[frame["uid"].isin(kept)]
    count = strategy_count(len(frame), strategy)
    if how == "first":
        return frame.head(count)
    if how == "end":
        return frame.tail(count) if count else frame.head(0)
    seed = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "big")
    picked = np.random.default_rng(seed).choice(len(frame), size=count, replace=False)
    return frame.iloc[np.sort(picked)]


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
    base = _balance_sql(relation, cap)
    params = {"seed": seed_text}
    kept = {uid for (uid,) in con.execute(f"{base} SELECT uid FROM samples_kept WHERE kept", params).fetchall()}
    per_entry = con.execute(f"""{base}
        SELECT d.entry, count(*) AS before, count(*) FILTER (WHERE s.kept) AS after
        FROM decided d JOIN samples_kept s USING (uid) GROUP BY d.entry""", params).fetchall()
    total = con.execute(f"{base} SELECT count(*), count(*) FILTER (WHERE kept) FROM samples_kept", params).fetchone()
    entries = sorted((r for r in per_entry if r[0] is not None), key=lambda r: (-r[1], r[0]))
    head = [r for r in entries if r[1] > cap]
    tail = [r for r in entries if r[1] <= cap]
    none = next(((b, a) for e, b, a in per_entry if e is None), (0, 0))
    summary = {
        "cap": cap, "samples": {"before": total[0], "after": total[1]},
        "entries": len(entries),
        "head": [{"entry": e, "before": b, "after": a} for e, b, a in head[:top]],
        "more_head": {"entries": len(head[top:]), "before": sum(b for _, b, _ in head[top:]),
                      "after": sum(a for _, _, a in head[top:])},
        "tail": {"entries": len(tail), "max_count": max((b for _, b, _ in tail), default=0),
                 "before": sum(b for _, b, _ in tail), "after": sum(a for _, _, a in tail)},
        "no_concept": {"before": none[0], "after": none[1]},
    }
    return kept, summary


def balanced_count(con: duckdb.DuckDBPyConnection, tier: str, strategy: str, seed_text: str) -> int:
    """How many samples of `tier` in view `samples` (curation.catalog) `strategy`
    (balanced:t) keeps: the report's bill when there is no plan.json. A run without the
    concepts column counts as all its samples unmatched."""
    columns = {row[0] for row in con.execute("DESCRIBE samples").fetchall()}
    concepts = "concepts" if "concepts" in columns else "NULL::VARCHAR[]"
    tier_sql = str(tier).replace("'", "''")
    relation = f"(SELECT uid, {concepts} AS concepts FROM samples WHERE tier = '{tier_sql}')"
    return len(balance(con, relation, int(strategy[len(BALANCED):]), seed_text)[0])


def _balance_tier(run_root: Path, tier: str, cap: int, seed_text: str, where: str) -> tuple[set[str], dict]:
    """`balance` over one tier's sidecars, out of core in DuckDB."""
    files = sorted((run_root / "tiers" / tier).glob("*.parquet"))
    if not files:
        return set(), balance(duckdb.connect(), "(SELECT NULL::VARCHAR AS uid, NULL::VARCHAR[] AS concepts "
                                                "WHERE false)", cap, seed_text)[1]
    con = duckdb.connect()
    paths = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE VIEW tier_samples AS SELECT * FROM read_parquet([{paths}], union_by_name = true)")
    columns = {row[0] for row in con.execute("DESCRIBE tier_samples").fetchall()}
    if "concepts" not in columns or not con.execute("SELECT count(concepts) FROM tier_samples").fetchone()[0]:
        raise ConfigError(f"{where}: balanced:{cap} needs the samples' concepts, and tier {tier} has none: add the "
                          "`concepts` operator to the recipe (before the tiers are written)")
    return balance(con, "tier_samples", cap, seed_text)


def make_plan(cfg: PipelineConfig, root: str | Path) -> dict:
    if not cfg.stages:
        raise ConfigError(f"{cfg.path} defines no 'stages'; add stages: [{{name, mix: [{{tier, strategy}}]}}]")
    run_root = find_run_root(root)
    samples = _ordered_samples(run_root)
    stages = []
    for stage in cfg.stages:
        mix = []
        for entry in stage.mix:
            tier_rows = samples[samples["tier"] == entry.tier]
            seed_text = f"{cfg.seed}/{stage.name}/{entry.tier}"
            concepts = None
            if entry.strategy.startswith(BALANCED):
                kept, concepts = _balance_tier(run_root, entry.tier, int(entry.strategy[len(BALANCED):]), seed_text,
                                               f"stage {stage.name}, tier {entry.tier}")
                chosen = tier_rows[tier_rows["uid"].isin(kept)]
            else:
                chosen = select(tier_rows, entry.strategy, seed_text)
            costs = [visual_tokens(k, w, h, ni, nf) for k, w, h, ni, nf in
                     zip(chosen["kind"], chosen["width"], chosen["height"], chosen["num_images"], chosen["num_frames"])]
            shards = {}
            for shard, keys in chosen.groupby("shard", sort=True)["key"]:
                shards[shard] = None if entry.strategy == "all" else keys.tolist()
            mix.append({
                "tier": entry.tier, "strategy": entry.strategy, "samples": len(chosen),
                "images": int(sum(c[0] for c in costs)), "frames": int(sum(c[1] for c in costs)),
                "visual_tokens": int(sum(c[2] for c in costs)),
                "text_tokens": int(sum(sample_text_tokens(t, m) for t, m in zip(chosen["text"], chosen["source_meta"]))),
                "shards": shards,
                **({"concepts": concepts} if concepts is not None else {}),
            })
        totals = {k: sum(m[k] for m in mix) for k in ("samples", "images", "frames", "visual_tokens", "text_tokens")}
        stages.append({"name": stage.name, "mix": mix, "totals": totals})
    return {"pipeline": cfg.name, "config_hash": cfg.config_hash, "recipe_version": cfg.version, "seed": cfg.seed,
            "root": str(run_root.resolve()), "stages": stages}


def _ordered_samples(run_root: Path) -> pd.DataFrame:
    """Every sidecar row in tier order: shard by shard, row by row (the tar's order)."""
    sidecars = str(run_root / "tiers" / "*" / "*.parquet").replace("'", "''")
    return duckdb.sql(f"""
        SELECT tier, shard, key, uid, kind, width, height, num_images, num_frames, text, source_meta
        FROM read_parquet('{sidecars}', union_by_name = true, file_row_number = true)
        ORDER BY tier, shard, file_row_number""").df()


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
