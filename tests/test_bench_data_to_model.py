"""bench/bench_data_to_model.py's parts that need no Ray run and no training: the noisy
demo corpus it crawls, the recipes of its three arms, and its verdict."""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from curation import config
from curation.demo import corpus, scenes

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_data_to_model")


def _pairs(qa) -> set:
    return {(x["q"], x["a"]) for x in qa}


def test_the_noisy_corpus_plants_the_share_asked_for_with_questions_of_another_scene(tmp_path, monkeypatch):
    base = dataclasses.replace(corpus.CorpusPlan.small(), scene=60, text_sign=6, huge=1, trusted=0, documents=0,
                               videos=0, eval_items=0, eval_copied=0)
    for field in ("optout", "optout_decoys", "multi_scene_videos"):  # other plants, where the plan has them
        if hasattr(base, field):
            base = dataclasses.replace(base, **{field: 0})
    plan = corpus.CorpusPlan.noisy(0.3, base)
    assert plan.mismatch_qa and not corpus.CorpusPlan().mismatch_qa  # the default demo is unchanged
    assert (plan.scene, plan.text_sign) == (base.scene, base.text_sign)  # the true scenes keep their count

    # which scene each written file shows: the last one rendered before it was written
    shown, last = {}, []
    real_render, real_write = scenes.render, corpus._write

    def write(root, rel, data):
        shown[rel] = last[-1] if last else None
        return real_write(root, rel, data)

    monkeypatch.setattr(scenes, "render", lambda sc: last.append(sc) or real_render(sc))
    monkeypatch.setattr(corpus, "_write", write)
    corpus.build(tmp_path, plan=plan)

    rows = pd.read_parquet(tmp_path / "image_text.parquet").merge(pd.read_parquet(tmp_path / "truth.parquet"), on="path")
    counts = rows["planted"].value_counts()
    assert abs(counts["mismatch"] / len(rows) - 0.3) < 0.01
    assert counts["exact_dup"] + counts["near_dup"] > 0 and counts["random_bytes"] > 0
    for row in rows.itertuples():
        if row.planted == "scene":  # true questions, as before
            assert _pairs(json.loads(row.qa)) == _pairs(scenes.questions(shown[row.path]))
        elif row.planted == "mismatch":
            qa = _pairs(json.loads(row.qa))
            assert qa - _pairs(scenes.questions(shown[row.path])), row.path  # some answer is wrong for its image
            colours = {a for q, a in qa if q.startswith("What colour")}
            assert colours and all(c in row.caption for c in colours)  # caption and questions: the same other scene


def test_noisy_refuses_a_share_the_plan_cannot_hold():
    with pytest.raises(ValueError):
        corpus.CorpusPlan.noisy(0.95)


def test_the_arms_recipes(monkeypatch):
    bench = _bench()
    monkeypatch.setenv("CURATION_MODELS", "/models")
    demo = bench.demo_recipe()
    no_clip = bench.recipe_without(demo, "clip_score")
    names = [e["op"] for e in demo["ops"]]
    assert [e["op"] for e in no_clip["ops"]] == [n for n in names if n not in ("clip_score", "semantic_dedup")]
    assert "clip_score" in names and "semantic_dedup" in names and demo["ops"][names.index("ocr")] in no_clip["ops"]
    for doc, tiers in ((no_clip, bench.CURATED_TIERS), (config.load_yaml(bench.RAW_RECIPE), bench.RAW_TIERS)):
        cfg = config.parse(bench.with_training_stage(doc, tiers))
        assert [(s.name, [m.tier for m in s.mix]) for s in cfg.stages] == [(bench.STAGE, list(tiers))]
    raw = config.parse(config.load_yaml(bench.RAW_RECIPE))
    assert [s.name for s in raw.map_ops + raw.global_ops] == ["decode_image"]  # no filter, no dedup


def test_the_verdict_needs_the_intervals_apart():
    bench = _bench()

    def arm(hits: int, n: int = 200) -> dict:
        return {seed: {"image": [i < hits for i in range(n)], "grey": [False] * n} for seed in (0, 1, 2)}

    apart = bench.summarise({"raw": arm(60), "curated": arm(120), "curated_no_clip": arm(100)}, chance=0.25)
    assert apart["floor"]["pass"] and apart["arms"]["curated"]["pooled"]["n"] == 600
    assert apart["differences"]["curated - raw"]["difference"] == 0.3
    lo, hi = apart["differences"]["curated - raw"]["interval"]
    assert 0 < lo < 0.3 < hi
    close = bench.summarise({"raw": arm(100), "curated": arm(110)}, chance=0.25)
    assert close["arms"]["curated"]["pooled"]["accuracy"] > close["arms"]["raw"]["pooled"]["accuracy"]
    assert not close["floor"]["pass"]  # better, but the intervals overlap


def test_questions_about_an_image_the_crawl_holds_a_copy_of_are_found(tmp_path):
    base = dataclasses.replace(corpus.CorpusPlan.small(), scene=40, text_sign=4, exact_dup=6, near_dup=6, huge=1,
                               trusted=0, documents=0, videos=0, eval_items=0, eval_copied=0)
    for field in ("optout", "optout_decoys", "multi_scene_videos"):
        if hasattr(base, field):
            base = dataclasses.replace(base, **{field: 0})
    corpus.build(tmp_path, plan=base)
    copied = _bench().copied_scenes(tmp_path)
    truth = pd.read_parquet(tmp_path / "truth.parquet")
    scene_bytes = {(tmp_path / p).read_bytes(): p for p in truth.loc[truth["planted"] == "scene", "path"]}
    exact_sources = {scene_bytes[(tmp_path / p).read_bytes()] for p in truth.loc[truth["planted"] == "exact_dup", "path"]}
    assert exact_sources <= copied  # every exactly copied scene, found through its caption
    assert 6 < len(copied) <= 12 + 2  # and the near copies' (a caption two scenes share may add one)
    assert all(truth.set_index("path").loc[p, "planted"] in ("scene", "text_sign") for p in copied)
