"""Operators on real bytes: each bad input ends kept, dropped (reason) or failed (error)."""

import io
import random

import numpy as np
import pandas as pd
from PIL import Image

from curation.demo import scenes
from curation.ops.base import MapOp
from curation.decide import apply_global_ops
from curation.ops.dedup import ExactDedup, NearDedup
from curation.ops.image import DecodeImage, ImageQuality, PerceptualHash
from curation.ops.text import CaptionLength


def jpeg(w, h, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def batch(images, texts=None):
    n = len(images)
    return pd.DataFrame({
        "uid": [f"{i:016x}" for i in range(n)], "kind": ["image_text"] * n, "image_bytes": images,
        "text": texts or ["a red square on the left"] * n,
        "status": ["kept"] * n, "reason": [None] * n, "error": [None] * n,
    })


def run(op, df):
    return op(df)


def test_decode_outcomes():
    good = jpeg(64, 48)
    df = run(DecodeImage(DecodeImage.Params(max_pixels=10_000)), batch([
        good, good[: len(good) // 2], b"<html>no</html>", b"", jpeg(200, 200),
    ]))
    assert list(df["status"]) == ["kept", "failed", "failed", "dropped", "dropped"]
    assert list(df["reason"][1:]) == ["decode_error", "decode_error", "no_image", "too_many_pixels"]
    assert df.loc[0, "width"] == 64 and df.loc[0, "height"] == 48 and df.loc[0, "image_format"] == "JPEG"
    assert len(df.loc[0, "sha256"]) == 64
    assert "truncated" in df.loc[1, "error"].lower()  # the exception text is kept for the ledger
    assert " at 0x" not in df.loc[2, "error"]  # ...without memory addresses, so reruns match


def test_pixel_cap_checked_before_decompressing():
    # 20000x20000 (400 MP) PNG of one colour is a few hundred KB: decoding it would take 1.2 GB.
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    df = run(DecodeImage(DecodeImage.Params(max_pixels=1_000_000)), batch([buf.getvalue()]))
    assert df.loc[0, "reason"] == "too_many_pixels" and df.loc[0, "width"] == 20000


def test_quality_and_caption_filters():
    df = batch([jpeg(16, 16), jpeg(400, 40), jpeg(20000 // 10, 100), jpeg(64, 64), jpeg(64, 64), jpeg(64, 64)],
               texts=["a b c"] * 4 + ["", "two words"])
    df = DecodeImage(DecodeImage.Params())(df)
    df = ImageQuality(ImageQuality.Params(min_side=32, max_aspect_ratio=4.0))(df)
    df = CaptionLength(CaptionLength.Params(min_words=3))(df)
    assert list(df["reason"]) == ["too_small", "bad_aspect_ratio", "bad_aspect_ratio", None, "no_caption", "caption_too_short"]


def test_rows_already_rejected_are_not_touched():
    df = batch([jpeg(64, 64), b"junk"])
    df.loc[1, ["status", "reason"]] = ["dropped", "earlier"]
    out = DecodeImage(DecodeImage.Params())(df)
    assert out.loc[1, "reason"] == "earlier"


def test_operators_skip_kinds_they_do_not_declare():
    df = batch([b"", jpeg(64, 64)])
    df.loc[0, "kind"] = "video"  # no image: decode_image must not drop it as no_image
    out = DecodeImage(DecodeImage.Params())(df)
    assert list(out["status"]) == ["kept", "kept"] and pd.isna(out.loc[0, "width"])


class ExplodesOnBlue(MapOp):
    name = "explodes_on_blue"

    def process(self, live):
        for img in live["_image"]:
            if img.getpixel((0, 0))[2] > 150:
                raise ValueError("cannot take blue")
        live["phash"] = "0" * 16
        return live


def test_one_bad_row_fails_alone():
    df = batch([jpeg(64, 64), jpeg(64, 64, (10, 10, 250)), jpeg(64, 64)])
    df = DecodeImage(DecodeImage.Params())(df)
    df = ExplodesOnBlue(ExplodesOnBlue.Params())(df)
    assert list(df["status"]) == ["kept", "failed", "kept"]
    assert df.loc[1, "reason"] == "explodes_on_blue_error" and "cannot take blue" in df.loc[1, "error"]
    assert df.loc[0, "phash"] == "0" * 16


def scene_table(n_scenes=40, seed=0):
    rng = random.Random(seed)
    imgs, planted = [], []
    for _ in range(n_scenes):
        img = scenes.render(scenes.random_scene(rng))
        imgs.append(scenes.encode_jpeg(img)); planted.append("orig")
        if rng.random() < 0.3:
            imgs.append(imgs[-1]); planted.append("exact")
        if rng.random() < 0.3:
            small = img.resize((int(img.width * 0.9), int(img.height * 0.9)))
            imgs.append(scenes.encode_jpeg(small, 70)); planted.append("near")
    df = batch(imgs)
    df = PerceptualHash(PerceptualHash.Params())(DecodeImage(DecodeImage.Params())(df))
    return df.drop(columns=["_image", "image_bytes"]), planted


def test_dedup_catches_planted_copies_and_keeps_originals():
    table, planted = scene_table()
    table = apply_global_ops(table, [ExactDedup(ExactDedup.Params()), NearDedup(NearDedup.Params(max_hamming=4))])
    reasons = table["reason"].tolist()
    assert all(r == "duplicate_exact" for r, p in zip(reasons, planted) if p == "exact")
    assert all(r == "duplicate_near" for r, p in zip(reasons, planted) if p == "near")
    assert all(r is None for r, p in zip(reasons, planted) if p == "orig")
    # every duplicate names a kept representative
    kept = set(table.loc[table["status"] == "kept", "uid"])
    assert set(table["dup_of"].dropna()) <= kept


def test_star_clustering_never_chains():
    # a ~ b ~ c but a !~ c (2 bits each step, 4 apart): b is dropped as a's duplicate,
    # c is not merged with a through b.
    a = 0
    b = a ^ 0b11
    c = b ^ 0b1100
    table = pd.DataFrame({"uid": ["a" * 16, "b" * 16, "c" * 16], "width": [100, 90, 80], "height": [100] * 3,
                          "phash": [f"{h:016x}" for h in (a, b, c)], "status": "kept", "reason": None,
                          "kind": "image_text"})
    out = apply_global_ops(table, [NearDedup(NearDedup.Params(max_hamming=2))])
    assert list(out["status"]) == ["kept", "dropped", "kept"]
    assert out.loc[1, "dup_of"] == "a" * 16


def test_dedup_choice_does_not_depend_on_row_order():
    table, _ = scene_table(seed=3)
    a = apply_global_ops(table, [ExactDedup(ExactDedup.Params())])
    b = apply_global_ops(table.sample(frac=1, random_state=1), [ExactDedup(ExactDedup.Params())])
    key = lambda t: t.set_index("uid")[["status", "dup_of"]].sort_index()
    pd.testing.assert_frame_equal(key(a), key(b))


def test_dedup_never_mixes_kinds():
    table, _ = scene_table(n_scenes=4, seed=5)
    twin = table.iloc[[0]].assign(uid="f" * 16, kind="interleaved")  # a document whose first image is scene 0
    table = pd.concat([table, twin], ignore_index=True)
    out = apply_global_ops(table, [ExactDedup(ExactDedup.Params()), NearDedup(NearDedup.Params(max_hamming=4))])
    assert out.set_index("uid").loc["f" * 16, "status"] == "kept"
