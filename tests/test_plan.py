"""`curate plan` (curation.tiers.plan.make_plan) over sidecars written here with pyarrow:
the same plan as the whole-run pandas frame it replaced, read in bounded batches."""

import hashlib
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import config
from curation.errors import InputError
from curation.tiers import plan as plan_module
from curation.tiers.plan import balance, make_plan, sample_text_tokens, strategy_count, write_plan
from curation.tokens import visual_tokens

KINDS = ("image_text", "video", "interleaved")
WORDS = ("red", "circle", "open", "sale", "tree", "bakery")
# tier -> rows per shard (shard names sort otherwise than they were written; 0: an empty sidecar)
SHARDS = {"alpha": {"s-03": 7, "s-01": 9, "s-02": 0, "s-10": 5}, "beta": {"b-0": 11, "b-1": 13, "b-2": 3},
          "gamma": {"g-0": 20, "g-1": 17}}


def _write_run(root):
    rng = np.random.default_rng(7)
    pq.write_table(pa.table({"uid": pa.array([], pa.string())}), root / "ledger.parquet")
    n = 0
    for tier, shards in SHARDS.items():
        (root / "tiers" / tier).mkdir(parents=True)
        for shard, rows in shards.items():
            kinds = [KINDS[int(k)] for k in rng.integers(0, 3, rows)]
            meta = [json.dumps({"qa": [{"q": "what is it?" * int(k), "a": "a sign"}]}) if k else None
                    for k in rng.integers(0, 3, rows)]
            pq.write_table(pa.table({
                "uid": [f"{n + i:016x}" for i in range(rows)], "tier": [tier] * rows, "shard": [shard] * rows,
                "key": [f"{shard}-{i:04d}" for i in range(rows)], "kind": kinds,
                "width": rng.integers(50, 3000, rows), "height": rng.integers(50, 3000, rows),
                "num_images": pa.array([int(rng.integers(1, 5)) if k == "interleaved" else None for k in kinds], pa.int64()),
                "num_frames": pa.array([int(rng.integers(1, 64)) if k == "video" else None for k in kinds], pa.int64()),
                "text": pa.array([None if i % 5 == 0 else "x" * int(rng.integers(1, 300)) for i in range(rows)], pa.string()),
                "source_meta": pa.array(meta, pa.string()),
                "concepts": pa.array([list(rng.choice(WORDS, int(rng.integers(0, 3)), replace=False)) for _ in range(rows)],
                                     pa.list_(pa.string())),
            }), root / "tiers" / tier / f"{shard}.parquet")
            n += rows


def _config(stages):
    return config.parse({"name": "p", "seed": 3, "ops": [{"op": "decode_image"}, {"op": "concepts"}],
                         "tiers": [{"name": t, "where": "true"} for t in SHARDS], "stages": stages})


STAGES = [
    {"name": "one", "mix": [{"tier": "alpha", "strategy": "all"}, {"tier": "beta", "strategy": "random:40%"},
                            {"tier": "gamma", "strategy": "first:25%"}]},
    {"name": "two", "mix": [{"tier": "alpha", "strategy": "end:8"}, {"tier": "gamma", "strategy": "balanced:3"},
                            {"tier": "beta", "strategy": "random:5"}, {"tier": "alpha", "strategy": "first:100"}]},
    {"name": "three", "mix": [{"tier": "gamma", "strategy": "balanced:2"}, {"tier": "beta", "strategy": "end:0"}]},
]


def _whole_run_plan(cfg, run_root) -> dict:
    """The plan as make_plan made it before it streamed: every sidecar row in one frame."""
    samples = duckdb.sql(f"""
        SELECT tier, shard, key, uid, kind, width, height, num_images, num_frames, text, source_meta, concepts
        FROM read_parquet('{run_root}/tiers/*/*.parquet', union_by_name = true, file_row_number = true)
        ORDER BY tier, shard, file_row_number""").df()
    stages = []
    for stage in cfg.stages:
        mix = []
        for entry in stage.mix:
            rows = samples[samples["tier"] == entry.tier]
            seed_text = f"{cfg.seed}/{stage.name}/{entry.tier}"
            how, _, n = entry.strategy.partition(":")
            concepts = None
            if how == "balanced":
                con = duckdb.connect()
                con.register("t", pa.table({"uid": rows["uid"].tolist(),
                                            "concepts": pa.array(rows["concepts"].map(list).tolist(), pa.list_(pa.string()))}))
                kept, concepts = balance(con, "t", int(n), seed_text)
                chosen = rows[rows["uid"].isin(kept)]
            elif how == "all":
                chosen = rows
            else:
                count = strategy_count(len(rows), entry.strategy)
                if how == "first":
                    chosen = rows.head(count)
                elif how == "end":
                    chosen = rows.tail(count) if count else rows.head(0)
                else:
                    seed = int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=8).digest(), "big")
                    chosen = rows.iloc[np.sort(np.random.default_rng(seed).choice(len(rows), size=count, replace=False))]
            costs = [visual_tokens(k, w, h, ni, nf) for k, w, h, ni, nf in
                     zip(chosen["kind"], chosen["width"], chosen["height"], chosen["num_images"], chosen["num_frames"])]
            shards = {shard: None if entry.strategy == "all" else keys.tolist()
                      for shard, keys in chosen.groupby("shard", sort=True)["key"]}
            mix.append({"tier": entry.tier, "strategy": entry.strategy, "samples": len(chosen),
                        "images": int(sum(c[0] for c in costs)), "frames": int(sum(c[1] for c in costs)),
                        "visual_tokens": int(sum(c[2] for c in costs)),
                        "text_tokens": int(sum(sample_text_tokens(t, m) for t, m in zip(chosen["text"], chosen["source_meta"]))),
                        "shards": shards, **({"concepts": concepts} if concepts is not None else {})})
        totals = {k: sum(m[k] for m in mix) for k in ("samples", "images", "frames", "visual_tokens", "text_tokens")}
        stages.append({"name": stage.name, "mix": mix, "totals": totals})
    return {"pipeline": cfg.name, "config_hash": cfg.config_hash, "recipe_version": cfg.version, "seed": cfg.seed,
            "root": str(run_root.resolve()), "stages": stages}


def test_the_streamed_plan_is_the_whole_run_frames_byte_for_byte(tmp_path):
    _write_run(tmp_path)
    cfg = _config(STAGES)
    plan = make_plan(cfg, tmp_path)
    write_plan(plan, tmp_path / "new.json")
    write_plan(_whole_run_plan(cfg, tmp_path), tmp_path / "old.json")
    assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    one, two, three = plan["stages"]
    assert list(one["mix"][0]["shards"]) == ["s-01", "s-03", "s-10"]  # shard order; the empty sidecar has no rows
    assert one["mix"][0]["shards"]["s-01"] is None and one["mix"][0]["samples"] == 21
    assert two["mix"][0]["shards"] == {"s-03": [f"s-03-{i:04d}" for i in (4, 5, 6)],  # end:8, across two shards
                                       "s-10": [f"s-10-{i:04d}" for i in range(5)]}
    assert two["mix"][3]["samples"] == 21 and (three["mix"][1]["samples"], three["mix"][1]["shards"]) == (0, {})
    assert 0 < two["mix"][1]["samples"] < 37 and two["mix"][1]["concepts"]["samples"]["after"] == two["mix"][1]["samples"]


def test_the_plan_holds_one_batch_of_rows_at_a_time(tmp_path, monkeypatch):
    _write_run(tmp_path)
    cfg = _config(STAGES)
    whole = make_plan(cfg, tmp_path)
    batches = []
    stream = plan_module._record_batches

    def spy(*args):
        for batch in stream(*args):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(plan_module, "PLAN_BATCH_ROWS", 4)
    monkeypatch.setattr(plan_module, "_record_batches", spy)
    assert make_plan(cfg, tmp_path) == whole  # the batch size changes nothing but the memory
    assert max(batches) <= 4 and len(batches) > 30
    # Only the sidecars holding a chosen row are read: first:3 of gamma reads g-0's 20 rows
    batches.clear()
    small = make_plan(_config([{"name": "s", "mix": [{"tier": "gamma", "strategy": "first:3"}]}]), tmp_path)
    assert sum(batches) == 20 and small["stages"][0]["mix"][0]["shards"] == {"g-0": ["g-0-0000", "g-0-0001", "g-0-0002"]}


def test_a_sidecar_of_two_shards_is_refused(tmp_path):
    _write_run(tmp_path)
    pq.write_table(pa.table({"uid": ["a", "b"], "shard": ["x-0", "x-1"], "key": ["k0", "k1"]}),
                   tmp_path / "tiers" / "beta" / "mixed.parquet")
    with pytest.raises(InputError, match="holds rows of shards x-0 and x-1"):
        make_plan(_config(STAGES), tmp_path)
