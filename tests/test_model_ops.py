"""Model operators on real models that ship inside their packages (no downloads):
OCR reads the words rendered on demo signs; language id tells languages apart."""

import random

import pandas as pd
import pytest

from curation.demo import scenes
from curation.ops.image import DecodeImage
from curation.ops.language import LanguageId
from curation.ops.ocr import Ocr


def rows(images, texts=None):
    n = len(images)
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(n)], "kind": ["image_text"] * n,
                         "image_bytes": images, "text": texts or ["a caption"] * n,
                         "status": ["kept"] * n, "reason": [None] * n, "error": [None] * n})


@pytest.fixture(scope="module")
def ocr():
    return Ocr(Ocr.Params())


def test_ocr_reads_the_rendered_words(ocr):
    rng = random.Random(7)
    signs = [scenes.random_scene(rng, with_word=True) for _ in range(12)]
    batch = DecodeImage(DecodeImage.Params())(rows([scenes.encode_jpeg(scenes.render(s)) for s in signs]))
    out = ocr(batch)
    read = [w.word in t.upper().split() for w, t in zip(signs, out["ocr_text"])]
    assert sum(read) >= 11, list(zip([s.word for s in signs], out["ocr_text"]))
    boxes = out["ocr_boxes"].iloc[0]
    assert boxes and {"box", "text", "score"} <= set(boxes[0]) and len(boxes[0]["box"]) == 4
    assert out["ocr_model"].iloc[0].startswith("rapidocr-")


def test_ocr_finds_no_words_without_text(ocr):
    rng = random.Random(8)
    plain = [scenes.encode_jpeg(scenes.render(scenes.random_scene(rng))) for _ in range(8)]
    out = ocr(DecodeImage(DecodeImage.Params())(rows(plain)))
    words = [w for t in out["ocr_text"] for w in t.split() if len(w) >= 3]
    assert len(words) <= 1  # background strokes may pass for a letter, never for words


def test_language_id():
    op = LanguageId(LanguageId.Params(keep=["en"]))
    batch = rows([b""] * 4, texts=["A simple drawing of a red square on the left side.",
                                   "Un dessin simple d'un carré rouge sur le côté gauche.",
                                   "Ein einfaches Bild eines roten Quadrats auf der linken Seite.",
                                   "tiny"])
    out = op(batch)
    assert out["language"].tolist()[:3] == ["en", "fr", "de"] and pd.isna(out["language"].iloc[3])
    assert out["language_score"].iloc[0] > 0.9
    assert out["status"].tolist() == ["kept", "dropped", "dropped", "kept"]
    assert out["reason"].tolist()[1:3] == ["language", "language"]
