"""Tier mechanics: shard cutting, sampling strategies, token arithmetic, stage plans."""

import json

import numpy as np
import pandas as pd
import pytest

from curation import config
from curation.errors import ConfigError
from curation.decide import SAMPLE_OVERHEAD_BYTES, cut_shards
from curation.tiers.plan import select
from curation.tokens import anyres_grid, anyres_tokens, visual_tokens

from .conftest import curate


def _sizes(shard_index) -> list[int]:
    return pd.Series(shard_index).value_counts(sort=False).sort_index().tolist()


def test_cut_by_samples_and_bytes():
    sizes = np.full(10, 1000)
    assert _sizes(cut_shards(sizes, 4, None)[0]) == [4, 4, 2]
    budget = 3 * (1000 + SAMPLE_OVERHEAD_BYTES)
    assert _sizes(cut_shards(sizes, 100, budget)[0]) == [3, 3, 3, 1]
    assert cut_shards(np.array([10**9, 5]), 9, 100)[0].tolist() == [0, 1]  # a lone giant still ships


def test_cut_in_chunks_equals_cut_at_once():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 50_000, 5000)
    whole, _ = cut_shards(sizes, 37, 400_000)
    state, parts = None, []
    for lo in range(0, len(sizes), 333):
        idx, state = cut_shards(sizes[lo:lo + 333], 37, 400_000, state)
        parts.append(idx)
    assert np.concatenate(parts).tolist() == whole.tolist()
    # the reference: close before a sample would pass max_bytes, or at max_samples
    expected, shard, count, size = [], 0, 0, 0
    for b in sizes + SAMPLE_OVERHEAD_BYTES:
        if count >= 37 or (count and size + b > 400_000):
            shard, count, size = shard + 1, 0, 0
        expected.append(shard)
        count, size = count + 1, size + b
    assert whole.tolist() == expected


@pytest.mark.parametrize("strategy, expected", [
    ("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:2", [8, 9]), ("first:50%", [0, 1, 2, 3, 4]),
    ("end:0", []), ("first:100", list(range(10))),
])
def test_strategies(strategy, expected):
    frame = pd.DataFrame({"i": range(10)})
    assert select(frame, strategy, "s")["i"].tolist() == expected


def test_random_strategy_is_seeded_and_ordered():
    frame = pd.DataFrame({"i": range(100)})
    a, b = select(frame, "random:10%", "seed/stage/tier"), select(frame, "random:10%", "seed/stage/tier")
    c = select(frame, "random:10%", "other")
    assert a["i"].tolist() == b["i"].tolist() != c["i"].tolist()
    assert len(a) == 10 and a["i"].is_monotonic_increasing


def test_anyres_tokens():
    assert anyres_grid(384, 384) == (1, 1) and anyres_tokens(384, 384) == 729 + 27 + 729
    assert anyres_grid(768, 384) == (2, 1)
    assert anyres_grid(1920, 1080) == (5, 3)
    big = anyres_tokens(2304, 2304)  # 6x6 grid, downsampled to 9 tiles' worth
    assert 729 * 10 <= big <= 729 * 10 + 100
    assert all(anyres_tokens(w, h) <= 729 * 10 + 100 for w in (100, 1000, 5000) for h in (100, 1000, 5000))
    assert visual_tokens("interleaved", 10, 10, 3, None) == (3, 0, 3 * 729)
    assert visual_tokens("video", 96, 96, None, 100) == (0, 32, 32 * 196)


def test_bad_stage_strategy_is_a_config_error(tmp_path):
    from curation.paths import bundled_pipeline

    doc = bundled_pipeline("demo").read_text().replace('strategy: "random:25%"', 'strategy: "some:25%"')
    path = tmp_path / "p.yaml"
    path.write_text(doc)
    with pytest.raises(ConfigError, match="strategy 'some:25%'"):
        config.load(path)
    path.write_text(bundled_pipeline("demo").read_text().replace("{tier: video,", "{tier: videos,"))
    with pytest.raises(ConfigError, match="unknown tier 'videos'"):
        config.load(path)


@pytest.mark.slow
def test_plan_on_the_demo(demo_out, tmp_path):
    out = tmp_path / "plan.json"
    proc = curate("plan", "--root", demo_out, "--out", out)
    assert "stage2_onevision" in proc.stdout and "visual tok" in proc.stdout
    plan = json.loads(out.read_text())
    again = json.loads(curate("plan", "--root", demo_out, "--out", tmp_path / "again.json") and
                       (tmp_path / "again.json").read_text())
    assert plan == again  # deterministic
    stages = {s["name"]: s for s in plan["stages"]}
    ov = {m["tier"]: m for m in stages["stage2_onevision"]["mix"]}
    kept = pd.read_parquet(demo_out / "curated" / "ledger.parquet").query("status == 'kept'")["tier"].value_counts()
    assert ov["captioned_detail"]["samples"] == round(kept["captioned_detail"] * 0.25)
    assert sum(len(keys) for keys in ov["captioned_detail"]["shards"].values()) == ov["captioned_detail"]["samples"]
    assert ov["documents"]["shards"] and all(v is None for v in ov["documents"]["shards"].values())  # all: whole shards
    # every video (strategy all), each its frames up to 32: the demo's 2 s videos have 16, its multi-scene ones 32-40
    videos = pd.concat([pd.read_parquet(p) for p in sorted((demo_out / "curated" / "tiers" / "video").glob("*.parquet"))])
    assert ov["video"]["samples"] == len(videos) and ov["video"]["frames"] == videos["num_frames"].clip(upper=32).sum()
    assert ov["video"]["visual_tokens"] == 196 * ov["video"]["frames"]
    assert ov["documents"]["visual_tokens"] == 729 * ov["documents"]["images"]


def test_actor_pools_always_fit_the_cluster():
    from curation.errors import CurationError
    from curation.ops.base import Resources
    from curation.runtime.ray_env import plan_pools

    def fits(pools, cpus):
        return sum(n * c for n, c in pools) <= cpus + 1e-9 and min(n for n, _ in pools) >= 1

    three = [Resources(num_cpus=0.5)] * 3  # the case that used to hang on 2 CPUs
    assert fits(plan_pools(three, cpus=2, gpus=0), 2)
    assert plan_pools([Resources(num_cpus=0.5)], cpus=16, gpus=0) == [(32, 0.5)]
    # a shape like the demo's on 2 CPUs: fused CPU ops, OCR (a model), language (cheap)
    demo = [Resources(num_cpus=0.5), Resources(num_cpus=0.5), Resources(num_cpus=0.25)]
    assert [n for n, _ in plan_pools(demo, cpus=2, gpus=0, heavy=[False, True, False])] == [1, 2, 2]
    assert plan_pools([Resources(num_cpus=0.25), Resources(num_cpus=1, num_gpus=0.5)], cpus=8, gpus=2)[1] == (4, 1)
    # more model stages than a laptop's CPUs: shares shrink to fit, every stage still starts
    seven = [Resources(num_cpus=0.5)] * 7
    pools = plan_pools(seven, cpus=2, gpus=0, heavy=[True] * 7)
    assert fits(pools, 2) and all(n == 1 and c == pools[0][1] < 0.5 for n, c in pools)
    # the demo's stages: scaled shares must not exceed the CPUs, even by a rounding error
    # (Ray would never place the last actor, and the job would wait forever)
    mixed = [Resources(num_cpus=c) for c in (0.5, 0.5, 0.5, 0.25, 0.25, 0.5, 0.25)]
    pools = plan_pools(mixed, cpus=2, gpus=0, heavy=[False, True, True, True, True, True, False])
    assert sum(n * c for n, c in pools) <= 2
    # two 1-CPU nodes (the cluster test): every actor must fit whole on one node
    from curation.runtime.ray_env import _packs

    pools = plan_pools(mixed, cpus=2, gpus=0, heavy=[False, True, True, True, True, True, False], nodes=[1.0, 1.0])
    assert _packs([c for n, c in pools for _ in range(n)], [1.0, 1.0])
    assert not _packs([0.6, 0.6, 0.6], [1.0, 1.0])
    with pytest.raises(CurationError, match="need 3 CPUs at once"):
        plan_pools([Resources(num_cpus=1, concurrency=3)], cpus=2, gpus=0)


@pytest.mark.slow
def test_llava_onevision_recipe_fills_the_four_stage_tiers(onevision_out):
    import duckdb

    sidecars = str(onevision_out / "tiers" / "*" / "*.parquet")
    kinds = dict(duckdb.sql(f"""SELECT tier, list(DISTINCT kind ORDER BY kind) FROM read_parquet('{sidecars}')
                              GROUP BY tier""").fetchall())
    assert kinds == {
        "stage1_alignment": ["image_text"], "stage1.5_knowledge": ["image_text"],
        "stage2_single_image": ["image_text"], "stage2_onevision": ["interleaved", "video"],
    }
    facts = duckdb.sql(f"""SELECT tier, max(len(string_split(text, ' '))) AS longest,
                                  avg(CASE WHEN length(coalesce(ocr_text, '')) >= 3 THEN 1 ELSE 0 END) AS ocr_share,
                                  bool_and(json_extract_string(source_meta, '$.qa') IS NOT NULL) AS all_qa,
                                  bool_and(clip_score IS NOT NULL OR kind <> 'image_text') AS scored
                           FROM read_parquet('{sidecars}') GROUP BY tier""").df().set_index("tier")
    assert facts.at["stage1_alignment", "longest"] < 14  # short pairs only
    assert facts.at["stage1.5_knowledge", "ocr_share"] > 0  # text-rich images land in knowledge
    assert facts.at["stage2_single_image", "all_qa"]  # instruction data has its questions
    assert facts["scored"].all()  # every image pair passed the CLIP filter


@pytest.mark.slow
def test_llava_onevision_plan_bills_every_stage(onevision_out):
    proc = curate("plan", "--root", onevision_out)
    plan = json.loads((onevision_out / "plan.json").read_text())
    stages = {s["name"]: s for s in plan["stages"]}
    assert list(stages) == ["stage1_alignment", "stage1.5_knowledge", "stage2_single_image", "stage2_onevision",
                            "stage1.5_balanced"]
    assert all(s["totals"]["samples"] > 0 and s["totals"]["visual_tokens"] > 0 for s in stages.values())
    onevision = {m["tier"]: m for m in stages["stage2_onevision"]["mix"]}
    assert onevision["stage2_onevision"]["frames"] > 0  # video frames billed at 196 tokens
    assert 0 < onevision["stage2_single_image"]["samples"] < plan["stages"][2]["mix"][0]["samples"]  # a 30% replay
    assert "stage2_onevision" in proc.stdout and "visual tok" in proc.stdout


def test_the_token_bill_counts_what_a_trainer_reads():
    import json

    from curation.tiers.plan import sample_text_tokens
    from curation.tokens import text_tokens

    caption = "a red square on a blue field"
    qa = [{"q": "What colour is the square?", "a": "red"}]
    crawl_meta = {"doc_url": "https://example.org/" + "x" * 400, "images": [{"raw_url": "u" * 300, "matched_sim": 0.3}]}
    bare = sample_text_tokens(caption, None)
    assert bare == text_tokens(caption)
    assert sample_text_tokens(caption, json.dumps(crawl_meta)) == bare  # a crawl's metadata is not trained on
    with_qa = sample_text_tokens(caption, json.dumps({**crawl_meta, "qa": qa}))
    assert with_qa == bare + text_tokens(qa[0]["q"]) + text_tokens(qa[0]["a"])
