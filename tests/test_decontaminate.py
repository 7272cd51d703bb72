"""decontaminate: matching reference evaluation images by bytes, phash (whole and crops)
and, on the demo, recall and false positives against what the corpus planted."""

from __future__ import annotations

import hashlib
import random

import pandas as pd
import pytest

from curation.decide import apply_global_ops
from curation.demo import scenes
from curation.errors import ConfigError
from curation.media import open_image
from curation.ops.decontam import Decontaminate, phash_hex
from curation.wds import tar_bytes


def _scene_images(n: int, seed: int):
    rng = random.Random(seed)
    return [scenes.render(scenes.random_scene(rng)) for _ in range(n)]


def _bench(root, images, name="bench", extra=()):
    """A WebDataset reference set under root/name: one jpg (+ question) per image."""
    samples = [(f"q{i:04d}", [("jpg", scenes.encode_jpeg(im)), ("txt", b"What shape is shown?")])
               for i, im in enumerate(images)]
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}-000000.tar").write_bytes(tar_bytes(samples + list(extra)))
    return [data for _, ((_, data), _) in samples]


def _row(uid: str, data: bytes, phash: str | None = None) -> dict:
    image = open_image(data)
    return {"uid": uid, "kind": "image_text", "status": "kept", "sha256": hashlib.sha256(data).hexdigest(),
            "phash": phash or phash_hex(image), "width": image.width, "height": image.height}


CHEAP = {"crop_grid": 1, "crop_scales": [0.9]}  # one crop: for tests that are not about crops


def _run(rows, root, **params):
    params = {"root": str(root), "sets": [{"name": "bench", "path": "bench"}], **params}
    op = Decontaminate(Decontaminate.parse_params(params, "test"))
    return apply_global_ops(pd.DataFrame(rows), [op]).set_index("uid")


def test_exact_reencoded_resized_and_cropped_copies_are_caught_clean_images_are_not(tmp_path):
    refs = _scene_images(6, seed=11)
    ref_bytes = _bench(tmp_path, refs)
    rng = random.Random(5)
    rows = []
    for i, (im, data) in enumerate(zip(refs, ref_bytes)):
        w, h = im.size
        f = rng.uniform(0.8, 0.92)
        cw, ch = int(w * f), int(h * f)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        rows += [_row(f"exact{i}", data),
                 _row(f"reenc{i}", scenes.encode_jpeg(im, quality=55)),
                 _row(f"resized{i}", scenes.encode_jpeg(im.resize((int(w * 0.6), int(h * 0.6))), quality=75)),
                 _row(f"cropped{i}", scenes.encode_jpeg(im.crop((x, y, x + cw, y + ch)), quality=80))]
    rows += [_row(f"clean{i}", scenes.encode_jpeg(im)) for i, im in enumerate(_scene_images(40, seed=99))]
    out = _run(rows, tmp_path)
    copies = out[~out.index.str.startswith("clean")]
    caught = copies["reason"] == "contaminated:bench"
    assert caught.mean() >= 0.9, copies[~caught]
    assert (out.loc[out.index.str.startswith("exact"), "contamination_match"] == "sha256").all()
    for uid in copies.index[caught]:  # the matched item is the one it was copied from
        assert out.at[uid, "contaminated_by"] == f"bench/q{int(uid[-1]):04d}"
    clean = out[out.index.str.startswith("clean")]
    assert (clean["status"] == "kept").all() and clean["contaminated_by"].isna().all()


def test_hamming_threshold_is_inclusive_and_aspect_must_agree(tmp_path):
    ref = _scene_images(1, seed=3)[0]
    data = _bench(tmp_path, [ref])[0]
    whole = int(phash_hex(open_image(data)), 16)
    base = _row("x", data)
    far = {"width": base["width"] * 2, "height": base["height"]}  # another aspect ratio

    def flipped(bits: int) -> str:
        return f"{whole ^ ((1 << bits) - 1):016x}"

    rows = [{**base, "uid": "at4", "sha256": "0" * 64, "phash": flipped(4)},
            {**base, "uid": "at5", "sha256": "1" * 64, "phash": flipped(5)},
            {**base, "uid": "wide", "sha256": "2" * 64, "phash": flipped(0), **far},
            {**base, "uid": "nohash", "sha256": "3" * 64, "phash": None},
            {**base, "uid": "gone", "sha256": data and hashlib.sha256(data).hexdigest(), "status": "dropped", "reason": "too_small"}]
    out = _run(rows, tmp_path, max_hamming=4, **CHEAP)
    assert out.at["at4", "reason"] == "contaminated:bench" and out.at["at4", "contamination_match"] == "phash:4"
    assert out.at["at5", "status"] == "kept"
    assert out.at["wide", "status"] == "kept"  # same hash, not the reference's shape
    assert out.at["nohash", "status"] == "kept"
    assert out.at["gone", "reason"] == "too_small"  # only live samples are judged


def test_corrupt_reference_items_are_skipped_with_a_reason(tmp_path, capsys):
    refs = _scene_images(2, seed=4)
    data = _bench(tmp_path, refs, extra=[("broken", [("jpg", b"\xff\xd8\xff not a jpeg")]),
                                         ("empty", [("txt", b"a question without its image")])])
    out = _run([_row("copy", data[1])], tmp_path, **CHEAP)
    assert out.at["copy", "reason"] == "contaminated:bench"
    err = capsys.readouterr().err
    assert "item 'broken' skipped: not_image" in err and "item 'empty' skipped: no_image" in err


def test_a_set_with_no_usable_image_is_a_recipe_error(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b-000000.tar").write_bytes(tar_bytes([("bad", [("jpg", b"junk")])]))
    with pytest.raises(ConfigError, match="hold no usable image"):
        _run([_row("x", scenes.encode_jpeg(_scene_images(1, 1)[0]))], tmp_path)


@pytest.mark.parametrize("where", ["../outside", "/etc", "link"])
def test_reference_paths_stay_inside_the_root(tmp_path, where):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    _bench(tmp_path, _scene_images(1, 2), name="outside")
    (root / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match="leaves the reference root"):
        _run([_row("x", scenes.encode_jpeg(_scene_images(1, 1)[0]))], root, sets=[{"name": "b", "path": where}])


def test_reference_caps_refuse_instead_of_truncating(tmp_path):
    _bench(tmp_path, _scene_images(3, 5))
    with pytest.raises(ConfigError, match="over the caps"):
        _run([_row("x", scenes.encode_jpeg(_scene_images(1, 1)[0]))], tmp_path, max_items=2, **CHEAP)


def test_parquet_and_image_folder_reference_sets_use_the_input_readers(tmp_path):
    refs = _scene_images(2, seed=8)
    blobs = [scenes.encode_jpeg(im) for im in refs]
    (tmp_path / "hf").mkdir()
    pd.DataFrame({"picture": [{"bytes": b, "path": None} for b in blobs[:1]], "question": ["Which colour?"]}) \
        .to_parquet(tmp_path / "hf" / "test-00000.parquet")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "img1.jpg").write_bytes(blobs[1])
    sets = [{"name": "hf_bench", "path": "hf", "format": "parquet", "image_column": "picture"},
            {"name": "folder_bench", "path": "folder"}]
    out = _run([_row("a", blobs[0]), _row("b", scenes.encode_jpeg(refs[1], quality=60))], tmp_path, sets=sets, **CHEAP)
    assert out.at["a", "reason"] == "contaminated:hf_bench" and out.at["a", "contaminated_by"] == "hf_bench/000000000"
    assert out.at["b", "reason"] == "contaminated:folder_bench"


@pytest.mark.parametrize("params, message", [
    ({"sets": [{"name": "b", "path": "b"}]}, "'root' is required"),
    ({"root": "/x", "sets": [{"name": "Bad Name", "path": "b"}]}, "must be unique"),
    ({"root": "/x", "sets": [{"name": "b", "path": "b", "code": "x"}]}, "must be a mapping"),
    ({"root": "/x", "sets": [{"name": "b", "path": "b"}], "min_similarity": 0.9}, "needs both"),
])
def test_bad_options_are_recipe_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        Decontaminate.parse_params(params, "test")


@pytest.mark.slow
def test_the_demo_planted_copies_are_caught_and_clean_samples_kept(demo_out, onevision_out):
    """llava_onevision over the small demo: recall over the planted evaluation copies that
    reached decontaminate >= 0.95, at most 1% of clean samples flagged."""
    from curation.catalog import connect
    from curation.demo.truth import decontamination_quality

    quality = decontamination_quality(demo_out / "corpus", onevision_out)
    print(quality)
    assert set(quality["forms"]) == {"eval_exact", "eval_reencoded", "eval_resized", "eval_cropped"}
    assert quality["copies_reached"] >= 24  # of the 32 planted: the rest fell to earlier filters
    assert quality["recall"] >= 0.95 and quality["forms"]["eval_exact"]["recall"] == 1.0
    assert quality["false_positive_rate"] <= 0.01 and quality["clean_judged"] >= 150
    rows = connect(onevision_out).sql("""SELECT reason, contaminated_by, contamination_match FROM ledger
                                         WHERE reason LIKE 'contaminated:%'""").fetchall()
    assert rows and all(r[0] == "contaminated:shapes_bench" and r[1].startswith("shapes_bench/q") for r in rows)
    assert {r[2].split(":")[0] for r in rows} >= {"sha256", "phash"}


def test_question_overlap_matches_a_shared_run_of_words_when_asked(tmp_path):
    ref = _scene_images(1, seed=21)[0]
    folder = tmp_path / "bench"
    folder.mkdir()
    question = b"Which of the three shapes in the picture is closest to the left edge?"
    (folder / "b-000000.tar").write_bytes(tar_bytes([("q0", [("jpg", scenes.encode_jpeg(ref)), ("txt", question)])]))
    other = scenes.encode_jpeg(_scene_images(1, seed=22)[0])
    qa = '{"qa": [{"q": "Tell me: which of the THREE shapes in the picture, is closest?", "a": "x"}]}'
    rows = [{**_row("leak", other), "source_meta": qa},
            {**_row("short", other), "sha256": "1" * 64, "source_meta": '{"qa": [{"q": "Which of the three?"}]}'},
            {**_row("plain", other), "sha256": "2" * 64, "source_meta": '{"license": "cc-by"}'},
            {**_row("broken", other), "sha256": "3" * 64, "source_meta": '{"qa": "not a list"}'}]
    out = _run(rows, tmp_path, question_ngram=6, **CHEAP)
    assert out.at["leak", "reason"] == "contaminated:bench" and out.at["leak", "contamination_match"] == "question"
    assert (out.loc[["short", "plain", "broken"], "status"] == "kept").all()
    assert (_run(rows, tmp_path, **CHEAP)["status"] == "kept").all()  # off unless asked


@pytest.mark.slow
def test_embedding_similarity_matches_with_the_runs_clip_model(demo_out, tmp_path):
    """With the demo's CLIP filter (as clip_score keeps embeddings): a copy whose bytes and
    phash say nothing is still caught by its embedding; a distinct scene is not."""
    import numpy as np

    from curation.clipfilter import embed_images, load_clip

    model = str(demo_out / "models" / "clip-filter")
    refs = _scene_images(2, seed=31)
    _bench(tmp_path, refs)
    copy, other = open_image(scenes.encode_jpeg(refs[0], quality=70)), _scene_images(1, seed=32)[0]
    vectors = embed_images(load_clip(model, None, "cpu"), [copy, other])
    rows = [{**_row(uid, scenes.encode_jpeg(im)), "phash": "f0f0f0f0f0f0f0f0", "sha256": str(i) * 64,
             "clip_embedding": vec.astype(np.float16).tobytes()}
            for i, (uid, im, vec) in enumerate(zip(["copy", "other"], [copy, other], vectors))]
    out = _run(rows, tmp_path, embedding_model=model, min_similarity=0.9999, **CHEAP)
    assert out.at["copy", "reason"] == "contaminated:bench"
    assert float(out.at["copy", "contamination_match"].removeprefix("embedding:")) >= 0.9999
    assert out.at["other", "status"] == "kept"
