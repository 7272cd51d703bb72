"""Stage plans: which samples of which tiers a training stage reads, and what they cost.

Strategies follow LLaVA-NeXT's data YAML: `all`, `first:N`, `end:N`, `random:N`, with N a
count or a percentage of the tier. Tier order is the shards' seeded order; `random`
draws with a generator seeded from the pipeline seed and the stage and tier names, so a
plan is reproducible. The plan file lists, per stage, each tier's shards and (unless the
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


def strategy_count(rows: int, strategy: str) -> int:
    """How many of a tier's `rows` samples `strategy` selects."""
    if strategy == "all":
        return rows
    n = strategy.split(":")[1]
    return round(rows * int(n[:-1]) / 100) if n.endswith("%") else min(int(n), rows)


def select(frame: pd.DataFrame, strategy: str, seed_text: str) -> pd.DataFrame:
    """Rows of `frame` (in tier order) chosen by `strategy`."""
    if strategy == "all":
        return frame
    how = strategy.split(":")[0]
    count = strategy_count(len(frame), strategy)
    if how == "first":
        return frame.head(count)
    if how == "end":
        return frame.tail(count) if count else frame.head(0)
    seed = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "big")
    picked = np.random.default_rng(seed).choice(len(frame), size=count, replace=False)
    return frame.iloc[np.sort(picked)]


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
            chosen = select(tier_rows, entry.strategy, f"{cfg.seed}/{stage.name}/{entry.tier}")
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
            })
        totals = {k: sum(m[k] for m in mix) for k in ("samples", "images", "frames", "visual_tokens", "text_tokens")}
        stages.append({"name": stage.name, "mix": mix, "totals": totals})
    return {"pipeline": cfg.name, "config_hash": cfg.config_hash, "recipe_version": cfg.version, "seed": cfg.seed,
            "root": str(run_root.resolve()), "stages": stages}


def _ordered_samples(run_root: Path) -> pd.DataFrame:
    """Every sidecar row in tier order: shard by shard, row by row (the tar's order)."""
    sidecars = str(run_root / "tiers" / "*" / "*.parquet").replace("'", "''")
    return duckdb.sql(f"""
        SELECT tier, shard, key, kind, width, height, num_images, num_frames, text, source_meta
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
    return "\n".join(lines)
