"""`curate eval` measures what it claims: intervals, grey and shuffled images, held-out
loss without a text shortcut, distractors that cannot answer at a random place, one
prompt layout for every N, and the demo documents' multi-image questions. Tiny models
built from config, real demo scenes, a real tier tar; no training."""

import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from curation.demo import scenes
from curation.trainer import eval as ev
from curation.trainer.config import model_config
from curation.trainer.data import (TEMPLATE_TEXT, TierSource, conversation, encode, held_out_conversations, is_held_out,
                                   qa_conversation)
from curation.trainer.model import VLM
from curation.trainer.tokenizer import WordTokenizer

torch.set_num_threads(1)


def demo_scenes(count: int, seed: int = 0) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.random_scene(rng) for _ in range(count)]


def scene_questions(pictures: list[scenes.Scene]) -> tuple[list[ev.Question], dict]:
    """eval Questions about rendered demo scenes, and each image's scene (by id)."""
    found, scene_of = [], {}
    for i, sc in enumerate(pictures):
        image = scenes.render(sc)
        scene_of[id(image)] = sc
        qa = scenes.questions(sc)
        asked = frozenset(p["q"] for p in qa)
        found += [ev.Question(f"u{i}", image, p["q"], p["a"], asked) for p in qa]
    return found, scene_of


TOK = WordTokenizer.build(TEMPLATE_TEXT + [
    " ".join(scenes.COLOURS) + " " + " ".join(scenes.SHAPES) + " one two three image",
    "What colour is the circle square triangle? What shape is on the left right in the middle? How many shapes are there?",
    "Which image shows the In image , what colour is the A picture of a an and on",
])


def tiny(arch: str) -> VLM:
    torch.manual_seed(0)
    return VLM(model_config(arch, "tiny"), TOK.vocab_size, TOK.image_id).eval()


# ---------------------------------------------------------------- intervals

def test_wilson_interval_matches_known_values():
    from scipy.stats import binomtest

    assert ev.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert ev.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert ev.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    for k, n in [(41, 112), (28, 112), (1, 300), (250, 300)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert ev.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_difference_interval():
    same = [True, False, True, True, False] * 20
    assert ev.paired_difference_interval(same, same) == {"difference": 0.0, "interval": [0.0, 0.0]}
    better = ev.paired_difference_interval([True] * 60 + [False] * 40, [False] * 60 + [False] * 40)
    assert better["difference"] == 0.6 and 0.49 < better["interval"][0] < 0.6 < better["interval"][1] < 0.71
    # noise: half the questions flip each way, the interval covers 0
    noisy = ev.paired_difference_interval([True, False] * 50, [False, True] * 50)
    assert noisy["difference"] == 0.0 and noisy["interval"][0] < 0 < noisy["interval"][1]


# ---------------------------------------------------------------- grey and shuffled

def test_grey_and_shuffled_images():
    questions, _ = scene_questions(demo_scenes(12))
    grey = ev.grey_like(questions[0].image)
    assert grey.size == questions[0].image.size and set(np.asarray(grey).reshape(-1)) == {127}
    shuffled = ev.shuffled_images(questions, seed=3)
    owner = {id(q.image): q.uid for q in questions}
    assert sorted(map(id, shuffled)) == sorted(id(q.image) for q in questions)  # a permutation of the images
    assert all(owner[id(im)] != q.uid for im, q in zip(shuffled, questions))  # none keeps its own sample's
    assert [id(x) for x in ev.shuffled_images(questions, seed=3)] == [id(x) for x in shuffled]  # seeded


def test_accuracy_report_asks_with_grey_and_shuffled_images(monkeypatch):
    questions, _ = scene_questions(demo_scenes(4))
    questions = [q for i, q in enumerate(questions) if q.q != questions[i - 1].q or i == 0][::2][:8]
    assert len({q.uid for q in questions}) >= 3
    other = {"colour": "purple", "shape": "square", "many": "three", "sign": "stop"}
    sets = {q.q: sorted({q.a, next(v for k, v in other.items() if k in q.q.lower())} | {"circle"}) for q in questions}
    # EVLM starts as the plain LM (its gates are 0): it cannot see, so all three conditions agree
    blind = ev.accuracy_report(tiny("evlm"), TOK, questions, sets)
    assert blind["questions"] == len(questions)
    assert blind["accuracy"] == blind["grey"]["accuracy"] == blind["shuffled"]["accuracy"]
    assert blind["minus_grey"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    # llava: the three conditions ask the same questions, of the right images
    asked, real = [], ev.choose_answers
    monkeypatch.setattr(ev, "choose_answers", lambda *a, **k: asked.append(a[2]) or real(*a, **k))
    seen = ev.accuracy_report(tiny("llava"), TOK, questions, sets)
    own, grey, shuffled = asked
    assert [p[1] for p in own] == [p[1] for p in grey] == [p[1] for p in shuffled] == [q.q for q in questions]
    assert [p[0][0] for p in own] == [q.image for q in questions]
    assert all(set(np.asarray(p[0][0]).reshape(-1)) == {127} for p in grey)
    assert all(p[0][0] is not q.image for p, q in zip(shuffled, questions))
    for r in (seen, seen["grey"], seen["shuffled"]):
        assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    assert 0 < seen["chance"] < 1 and set(seen["by_question"]) == set(sets)
    assert seen["minus_grey"]["interval"][0] <= seen["minus_grey"]["difference"] <= seen["minus_grey"]["interval"][1]


# ---------------------------------------------------------------- distractors

def test_distractors_cannot_answer_and_the_target_moves():
    pictures = demo_scenes(60)
    questions, scene_of = scene_questions(pictures)
    rng = random.Random(0)
    positions, checked = [], 0
    for target in questions:
        if target.q.startswith("How many"):  # every scene can answer it: no distractor set exists
            assert ev.distractor_set(target, questions, 1, rng) is None
            continue
        images, at = ev.distractor_set(target, questions, 3, rng)
        assert len(images) == 4 and images[at] is target.image
        positions.append(at)
        for im in images[:at] + images[at + 1:]:
            sc = scene_of[id(im)]
            if target.q.startswith("What colour is the "):
                shape = target.q.removeprefix("What colour is the ").rstrip("?")
                assert shape not in {o.shape for o in sc.objects}
            elif target.q.startswith("What shape is "):
                where = target.q.removeprefix("What shape is ").rstrip("?")
                slot = "middle" if where == "in the middle" else where.removeprefix("on the ")
                assert slot not in {o.slot for o in sc.objects}
            checked += 1
        assert len({id(im) for im in images}) == 4
    assert checked > 200 and set(positions) == {0, 1, 2, 3}  # every place, not always the last


def test_one_prompt_layout_for_every_distractor_count(monkeypatch):
    questions, _ = scene_questions(demo_scenes(30))
    sets = {q.q: [q.a, "other"] for q in questions}
    asked = {}

    def record(model, tok, prompts, candidates, batch_size=32):
        asked[len(prompts[0][0]) - 1] = prompts
        return [c[0] for c in candidates]

    monkeypatch.setattr(ev, "choose_answers", record)
    result = ev.distractor_report(None, TOK, questions, sets, counts=(0, 1, 3), limit=10)
    assert set(result) == {0, 1, 3} and all(r["questions"] == 10 for r in result.values())
    assert [p[1] for p in asked[0]] == [p[1] for p in asked[3]]  # the same questions at every N
    assert {p[2] for n in asked for p in asked[n]} == {"multi"}  # N=0 included
    assert sum(result[3]["target_positions"].values()) == 10 and len(result[3]["target_positions"]) > 1

    # llava would lay out a lone "single" image as AnyRes tiles; "multi" is one base view at every N
    cfg = model_config("llava", "tiny")
    image = questions[0].image
    layouts = {}
    for n in (0, 2):
        images = [image] * (n + 1)
        prompt = ev.answer_prompt(images, questions[0].q, "multi")
        ex = encode(prompt + [("text", "red", True)], images, "multi", cfg, TOK, (0.5,) * 3, (0.5,) * 3)
        layouts[n] = set(ex.layouts)
        assert re.findall(r"image (\d+) :", TOK.decode(ex.input_ids)) == [str(k) for k in range(1, n + 2)]
    assert layouts[0] == layouts[2] == {("base",)}


# ---------------------------------------------------------------- held-out loss

def _spans(segments):
    """(trained text, the sequence's other text)."""
    trained = " ".join(s[1] for s in segments if s[0] == "text" and s[2])
    rest = " ".join(s[1] for s in segments if s[0] == "text" and not s[2])
    return trained, rest


ANSWER_WORDS = {*scenes.COLOURS, *scenes.SHAPES, *scenes.NUMBER_WORDS.values()}


def _leaks(segments) -> bool:
    """Whether an answer word (colour, shape, count) the sequence trains on is already in its prompt."""
    trained, rest = _spans(segments)
    words = lambda t: set(re.findall(r"[a-z]+", t.lower())) & ANSWER_WORDS  # noqa: E731
    return bool(words(trained) & words(rest))


def scene_sample(sc: scenes.Scene, uid="s") -> dict:
    return {"uid": uid, "kind": "image_text", "role": "single", "doc": None, "text": scenes.caption(sc, random.Random(0)),
            "qa": scenes.questions(sc), "images": [scenes.render(sc)]}


def doc_sample(pictures: list[scenes.Scene], uid="d") -> dict:
    doc = [("text", "Document 0.")]
    for k, sc in enumerate(pictures):
        doc += [("image", k), ("text", f"Figure {k + 1} shows {scenes.caption(sc, random.Random(k)).lower()}")]
    return {"uid": uid, "kind": "interleaved", "role": "multi", "text": "", "doc": doc,
            "qa": scenes.document_questions(pictures), "images": [scenes.render(sc) for sc in pictures]}


def test_held_out_sequences_give_no_target_away():
    pictures = demo_scenes(40, seed=1)
    sample = next(scene_sample(sc) for sc in pictures if len(sc.objects) == 2)
    assert _leaks(conversation(sample))  # the training sequence: the caption repeats earlier answers
    found = held_out_conversations(sample)
    assert [t for t, _ in found] == ["caption"] + ["qa"] * len(sample["qa"])
    for task, segs in found:
        assert sum(s[0] == "eos" for s in segs) == 1 and not _leaks(segs), (task, segs)
        trained, _ = _spans(segs)
        assert trained in [sample["text"], *(p["a"] for p in sample["qa"])]
    doc = doc_sample(pictures[:3])
    found = held_out_conversations(doc)
    assert [t for t, _ in found] == ["document"] + ["qa"] * len(doc["qa"])
    for task, segs in found:
        assert not _leaks(segs), (task, segs)
        if task == "qa":  # one question, and no figure text beside it
            assert "Figure" not in _spans(segs)[1] and sum(s[0] == "image" for s in segs) == 3


def write_tier(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_held_out_loss_reports_caption_and_question_loss_per_tier(tmp_path):
    uids = [u for u in (f"h{i:03d}" for i in range(200)) if is_held_out(u)][:3]
    pictures = demo_scenes(5, seed=2)
    jpeg = lambda sc: scenes.encode_jpeg(scenes.render(sc))  # noqa: E731
    image = scene_sample(pictures[0])
    doc = doc_sample(pictures[1:3])
    (tmp_path / "tiers" / "images").mkdir(parents=True)
    (tmp_path / "tiers" / "docs").mkdir(parents=True)
    meta = {"uid": uids[0], "kind": "image_text", "caption": image["text"], "source_meta": json.dumps({"qa": image["qa"]})}
    write_tier(tmp_path / "tiers" / "images" / "000000.tar",
               [("a", {"json": json.dumps(meta).encode(), "jpg": jpeg(pictures[0])}),
                ("b", {"json": json.dumps({**meta, "uid": "trained-on"}).encode(), "jpg": jpeg(pictures[0])})])
    items = [{"type": "text", "text": "Document 0."}, {"type": "image", "member": "0.jpg"},
             {"type": "text", "text": "Figure 1 shows a shape."}, {"type": "image", "member": "1.jpg"}]
    doc_meta = {"uid": uids[1], "kind": "interleaved", "doc": {"items": items}, "source_meta": {"qa": doc["qa"]}}
    write_tier(tmp_path / "tiers" / "docs" / "000000.tar",
               [("d", {"json": json.dumps(doc_meta).encode(), "0.jpg": jpeg(pictures[1]), "1.jpg": jpeg(pictures[2])})])
    plan = {"root": str(tmp_path), "stages": [{"name": "s", "mix": [
        {"tier": "images", "shards": {"000000.tar": None}}, {"tier": "docs", "shards": {"000000.tar": None}}]}]}
    assert not is_held_out("trained-on")
    model = tiny("llava")
    report = ev.held_out_loss(model, TOK, plan)
    assert set(report) == {"images", "docs"}
    assert set(report["images"]) == {"caption", "qa"} and set(report["docs"]) == {"document", "qa"}
    # exactly the targets' tokens (+ their eos), of the held-out sample only
    assert report["images"]["caption"]["tokens"] == len(TOK.encode(image["text"])) + 1
    assert report["images"]["qa"]["tokens"] == sum(len(TOK.encode(p["a"])) + 1 for p in image["qa"])
    assert report["docs"]["qa"]["tokens"] == sum(len(TOK.encode(p["a"])) + 1 for p in doc["qa"])
    assert all(r["loss"] > 0 for tasks in report.values() for r in tasks.values())


# ---------------------------------------------------------------- the demo's multi-image questions

def test_demo_documents_ask_about_their_images_and_train_on_them():
    pictures = demo_scenes(4, seed=5)
    qa = scenes.document_questions(pictures)
    assert qa
    for pair in qa:
        if pair["q"].startswith("Which image shows the "):
            colour, shape = pair["q"].removeprefix("Which image shows the ").rstrip("?").split()
            holders = [k for k, sc in enumerate(pictures, 1) if any((o.colour, o.shape) == (colour, shape)
                                                                     for o in sc.objects)]
            assert holders == [int(pair["a"].split()[1])]
        else:
            k, shape = int(pair["q"].split()[2].rstrip(",")), pair["q"].rstrip("?").split()[-1]
            matches = [o for o in pictures[k - 1].objects if o.shape == shape]
            assert len(matches) == 1 and matches[0].colour == pair["a"]
    # training: the QA conversation or the document, never both in one sequence (its text describes the figures)
    doc = doc_sample(pictures)
    kinds = set()
    for seed in range(12):
        segs = conversation(doc, random.Random(seed))
        questions = any(s[0] == "text" and s[1] in {p["q"] for p in qa} for s in segs)
        figures = any(s[0] == "text" and s[1].startswith("Figure") for s in segs)
        assert questions != figures
        kinds.add(questions)
    assert kinds == {True, False}
    labelled = qa_conversation(doc, qa[:1])
    assert [s[1] for s in labelled if s[0] == "text" and s[1].startswith("Image")] == ["Image 1: ", "Image 2: ",
                                                                                       "Image 3: ", "Image 4: "]
