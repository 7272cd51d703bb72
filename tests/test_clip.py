"""CLIP scoring, the trained DFN-style filter, top-fraction filtering and semantic dedup."""

import io
import json
import random

import numpy as np
import pandas as pd

from curation.decide import apply_global_ops
import pytest
from PIL import Image

from curation.config import parse
from curation.demo import scenes
from curation.demo.truth import clip_filter_quality
from curation.ops.clip import EMBEDDING_COLUMN, ClipScore, ClipTopFraction
from curation.ops.dedup import SemanticDedup

from .conftest import curate


def op(cls, **params):
    return cls(cls.parse_params(params, "test"))


def rows(images, texts, **extra):
    n = len(images)
    return pd.DataFrame({
        "uid": [f"{i:016x}" for i in range(n)], "kind": ["image_text"] * n, "status": ["kept"] * n,
        "reason": [None] * n, "error": [None] * n, "text": texts, "_image": images,
        "width": [im.width if im is not None else 0 for im in images],
        "height": [im.height if im is not None else 0 for im in images], **extra})


def fresh_pairs(n, seed):
    """New scenes with their true caption and a caption of a scene sharing no object."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sc, other = scenes.random_scene(rng), scenes.random_scene(rng)
        while {(o.shape, o.colour) for o in other.objects} & {(o.shape, o.colour) for o in sc.objects}:
            other = scenes.random_scene(rng)
        out.append((scenes.render(sc), scenes.caption(sc, rng), scenes.caption(other, rng)))
    return out


@pytest.fixture(scope="module")
def clip_dir(demo_out):
    return demo_out / "models" / "clip-filter"


@pytest.mark.slow
def test_trained_filter_catches_demo_mismatches_well_above_chance(demo_out):
    q = clip_filter_quality(demo_out)
    assert q["mismatched"] >= 20 and q["scored"] >= 150
    # Chance: a filter flagging at random has precision = the mismatch rate (~13%) and
    # recall = the share of samples it flags (~11%).
    assert q["precision"] >= 0.7 and q["precision"] > 4 * q["base_rate"], q
    assert q["recall"] >= 0.6 and q["recall"] > 4 * q["flagged"] / q["scored"], q
    assert q["auc"] >= 0.9, q


@pytest.mark.slow
def test_train_filter_writes_an_open_clip_local_dir_model(clip_dir):
    info = json.loads((clip_dir / "calibration.json").read_text())
    assert (clip_dir / "open_clip_config.json").is_file() and (clip_dir / "open_clip_model.safetensors").is_file()
    assert info["metrics"]["auc"] > 0.85 and info["pairs"]["train"] > info["pairs"]["held_out"] > 0
    # open_clip itself loads it by its local-dir: name, as it would an hf-hub: model
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    assert model.visual.image_size == (64, 64)


@pytest.mark.slow
def test_clip_score_op_scores_true_captions_above_mismatched_ones(clip_dir):
    pairs = fresh_pairs(40, seed=11)
    scorer = op(ClipScore, model=str(clip_dir), keep_embeddings=True)
    true = scorer.process(rows([p[0] for p in pairs], [p[1] for p in pairs]))
    wrong = scorer.process(rows([p[0] for p in pairs], [p[2] for p in pairs]))
    assert true["clip_model"].iloc[0].startswith(f"local-dir:{clip_dir}@")  # path + weights digest
    assert ((true["clip_score"] >= -1) & (true["clip_score"] <= 1)).all()
    assert (true["clip_score"].to_numpy() > wrong["clip_score"].to_numpy()).mean() >= 0.9
    emb = np.frombuffer(true[EMBEDDING_COLUMN].iloc[0], dtype=np.float16)
    assert emb.shape == (128,) and abs(np.linalg.norm(emb.astype(np.float32)) - 1) < 1e-2
    # a sample's score does not depend on the batch it came in
    alone = scorer.process(rows([pairs[3][0]], [pairs[3][1]]))
    assert alone["clip_score"].iloc[0] == true["clip_score"].iloc[3]


@pytest.mark.slow
def test_calibrated_threshold_drops_mismatches_and_bad_images_fail(clip_dir):
    pairs = fresh_pairs(30, seed=12)
    scorer = op(ClipScore, model=str(clip_dir), min_score="calibrated")
    images = [p[0] for p in pairs] * 2 + [None]
    texts = [p[1] for p in pairs] + [p[2] for p in pairs] + ["a red circle on the left"]
    out = scorer(rows(images, texts))
    true_half, wrong_half = out.iloc[:30], out.iloc[30:60]
    assert (wrong_half["reason"] == "clip_score_low").mean() >= 0.8
    assert (true_half["status"] == "kept").mean() >= 0.9
    # an image the model cannot take ends as a failed row, the batch survives
    assert out.iloc[60]["status"] == "failed" and out.iloc[60]["reason"] == "clip_score_error"


def test_clip_score_config_errors_are_one_line():
    with pytest.raises(Exception, match="'model' is required"):
        ClipScore.parse_params({}, "ops[0]")
    with pytest.raises(Exception, match="min_score must be"):
        ClipScore.parse_params({"model": "ViT-B-32", "min_score": 3}, "ops[0]")


def test_clip_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="cannot load CLIP model"):
        op(ClipScore, model=str(tmp_path))  # a folder with no open_clip_config.json


def test_top_fraction_is_global_and_ties_break_by_uid():
    n = 10
    table = pd.DataFrame({"uid": [f"u{i:02d}" for i in range(n)], "kind": "image_text",
                          "status": ["kept"] * 9 + ["dropped"], "reason": [None] * 9 + ["too_small"],
                          "clip_score": [0.1, 0.9, 0.5, 0.5, 0.3, 0.8, 0.2, 0.5, 0.7, 0.99]})
    out = apply_global_ops(table, [op(ClipTopFraction, fraction=0.3)])
    kept = set(out.loc[out["status"] == "kept", "uid"])
    assert kept == {"u01", "u05", "u08"}  # top 3 of the 9 live rows; the dropped 0.99 does not count
    assert set(out.loc[out["reason"] == "clip_score_rank", "uid"]) == {f"u{i:02d}" for i in (0, 2, 3, 4, 6, 7)}
    half = apply_global_ops(table, [op(ClipTopFraction, fraction=0.5)])
    assert set(half.loc[half["status"] == "kept", "uid"]) == {"u01", "u05", "u08", "u02", "u03"}  # tie at 0.5: by uid


def _jpeg_roundtrip(img, quality):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.slow
def test_semantic_dedup_finds_planted_near_duplicates(clip_dir):
    rng = random.Random(5)
    originals = []
    while len(originals) < 40:  # distinct contents, so only the planted copies are duplicates
        sc = scenes.random_scene(rng)
        if all({(o.shape, o.colour, o.slot) for o in sc.objects} != {(o.shape, o.colour, o.slot) for o in s.objects}
               for s in originals):
            originals.append(sc)
    images = [scenes.render(s) for s in originals]
    copies = [_jpeg_roundtrip(images[i].resize((images[i].width - 16, images[i].height - 12)), 40) for i in range(10)]
    table = rows(images + copies, [""] * 50)
    scorer = op(ClipScore, model=str(clip_dir), keep_embeddings=True)
    table = scorer.process(table).drop(columns=["_image"])
    # The tiny demo CLIP packs distinct contents close (median nearest neighbour ~0.98),
    # so its threshold sits near 1; for a real CLIP SemDeDup uses ~0.95.
    out = apply_global_ops(table, [op(SemanticDedup, threshold=0.999, clusters=4)])
    dropped = out[out["reason"] == "duplicate_semantic"]
    pairs = {frozenset((u, d)) for u, d in zip(dropped["uid"], dropped["dup_of"])}
    planted = {frozenset((f"{i:016x}", f"{40 + i:016x}")) for i in range(10)}
    assert len(pairs & planted) >= 7  # most planted copies found, each pointing at its original
    assert len(pairs - planted) <= 2  # and few distinct scenes merged
    # the original (more pixels) is the one kept
    assert set(dropped["uid"]) & {f"{i:016x}" for i in range(10)} <= {u for p in pairs - planted for u in p}


def test_semantic_dedup_needs_embeddings():
    table = pd.DataFrame({"uid": ["a"], "kind": ["image_text"], "status": ["kept"], "reason": [None]})
    with pytest.raises(Exception, match="keep_embeddings"):
        apply_global_ops(table, [op(SemanticDedup)])


def test_env_reference_in_a_recipe_is_expanded_but_not_hashed(monkeypatch):
    doc = {"name": "t", "ops": [{"op": "decode_image"}, {"op": "clip_score", "model": "${MY_MODELS}/f"}],
           "tiers": [{"name": "all", "where": "true"}]}
    monkeypatch.delenv("MY_MODELS", raising=False)
    with pytest.raises(Exception, match=r"\$\{MY_MODELS\}.*not set"):
        parse(doc)
    monkeypatch.setenv("MY_MODELS", "/a")
    first = parse(doc)
    monkeypatch.setenv("MY_MODELS", "/b")
    second = parse(doc)
    assert first.map_ops[1].params.model == "/a/f" and second.map_ops[1].params.model == "/b/f"
    assert first.config_hash == second.config_hash


@pytest.mark.slow
def test_demo_keeps_scores_in_ledger_and_embeddings_beside_shards(demo_out):
    ledger = pd.read_parquet(demo_out / "curated" / "ledger.parquet")
    low = ledger[ledger["reason"] == "clip_score_low"]
    assert len(low) > 0 and low["clip_score"].notna().all()
    manifest = json.loads((demo_out / "curated" / "tiers" / "alignment" / "manifest.json").read_text())
    shard = manifest["shards"][0]
    emb = np.load(demo_out / "curated" / "tiers" / "alignment" / shard["embeddings"], allow_pickle=False)
    side = pd.read_parquet(demo_out / "curated" / "tiers" / "alignment" / shard["sidecar"])
    assert emb.shape == (len(side), 128) and emb.dtype == np.float16 and not np.isnan(emb).any()
    out = curate("query", "SELECT count(*) AS n, min(clip_score) AS lo FROM samples WHERE clip_score IS NOT NULL",
                 "--root", demo_out, "--format", "json")
    assert json.loads(out.stdout.splitlines()[0])["n"] > 50  # json format: one object per line
