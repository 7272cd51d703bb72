"""Reference trainer, model side: the four architectures on a packed batch of a single
image, a document (multi-image) and a video, built in code (no shards, no hub)."""

import math

import pytest
import torch
from PIL import Image, ImageDraw

from curation import tokens
from curation.trainer import ARCHS
from curation.trainer.config import model_config
from curation.trainer.data import TEMPLATE_TEXT, conversation, encode, make_example, pack
from curation.trainer.model import VLM, visual_memory
from curation.trainer.tokenizer import WordTokenizer
from curation.trainer.train import make_optimizer, set_trainable
from curation.trainer.views import anyres_features, image_layout, lm_tokens

torch.set_num_threads(1)
COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


def scene(colour: str, size=(96, 72)) -> Image.Image:
    im = Image.new("RGB", size, (235, 235, 240))
    ImageDraw.Draw(im).ellipse((20, 15, 60, 55), fill=RGB[colour])
    return im


def image_sample(uid: str, colour: str, size=(96, 72)) -> dict:
    return {"uid": uid, "kind": "image_text", "text": f"A {colour} circle.", "role": "single", "doc": None,
            "qa": [{"q": "What colour is the circle?", "a": colour}, {"q": "How many shapes are there?", "a": "one"}],
            "images": [scene(colour, size)]}


def doc_sample(uid="doc") -> dict:
    return {"uid": uid, "kind": "interleaved", "role": "multi", "text": "", "qa": [],
            "doc": [("text", "Document one."), ("image", 0), ("text", "Figure 1 shows a red circle."), ("image", 1),
                    ("text", "Figure 2 shows a blue circle.")],
            "images": [scene("red", (80, 80)), scene("blue", (64, 80))]}


def video_sample(uid="vid") -> dict:
    return {"uid": uid, "kind": "video", "role": "frame", "text": "A green circle moves.", "qa": [], "doc": None,
            "images": [scene("green", (64, 64)) for _ in range(3)]}


TOK = WordTokenizer.build(TEMPLATE_TEXT + [
    "A red green blue yellow circle. What colour is the circle? How many shapes are there? one",
    "Document one. Figure 1 2 shows a circle. A green circle moves."])


def build(arch: str, **overrides) -> VLM:
    torch.manual_seed(0)
    return VLM(model_config(arch, "tiny", **overrides), TOK.vocab_size, TOK.image_id)


def batch_of(model: VLM, samples: list[dict], max_len=None) -> dict:
    cfg = model.cfg
    examples = [make_example(s, cfg, TOK, model.vision.mean, model.vision.std, "t") for s in samples]
    return pack(examples, max_len or cfg.max_len, TOK.pad_id)


def mixed_samples() -> list[dict]:
    return [image_sample("a", "red"), doc_sample(), video_sample(), image_sample("b", "blue", (72, 96))]


ALIGNMENT_MUST_TRAIN = {
    "llava": ["connector.mlp.0.weight", "connector.image_newline"],
    "omnifusion": ["connector.adapter.self_attn.in_proj_weight", "connector.to_lm.weight", "connector.image_start",
                   "connector.image_end"],
    "evlm": ["connector.queries", "connector.merge.weight", "connector.blocks.1.attn_gate", "connector.blocks.3.q.weight"],
    "owl3": ["connector.project.weight", "connector.hyper.1.k.weight", "connector.hyper.3.v.weight",
             "connector.hyper.1.gate.weight"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_on_mixed_batch_and_stage_parameters(arch):
    model = build(arch)
    batch = batch_of(model, mixed_samples(), max_len=1024)
    kinds_in_batch = {tuple(l[:1]) for l in batch["layouts"]}
    assert len(batch["samples"]) == 4 and batch["pixels"].shape[0] >= 1 + 2 + 3

    # stage 1 (alignment): only the connector trains, which holds every arch-specific new part
    set_trainable(model, "connector")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ALIGNMENT_MUST_TRAIN[arch]) <= trainable
    assert all(n.startswith("connector.") for n in trainable)
    assert not any(p.requires_grad for p in model.lm.parameters()) and not any(p.requires_grad for p in model.vision.parameters())
    out = model(batch)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable
    if arch in ("llava", "omnifusion"):
        assert "connector.mlp.0.weight" in grads or "connector.to_lm.weight" in grads
    if arch == "llava":
        assert kinds_in_batch == {("anyres",), ("base",), ("frame",)}  # the three token policies in one batch

    # later stages: everything, the encoder in its own (optionally slower) group
    model.zero_grad(set_to_none=True)
    set_trainable(model, "full")
    assert all(p.requires_grad for p in model.parameters())
    opt = make_optimizer(model, lr=1e-3, vision_lr_scale=0.1)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-4, 1e-3])
    model(batch).loss.backward()
    assert model.vision.vit.patch_embed.proj.weight.grad is not None
    assert model.lm.model.layers[0].mlp.up_proj.weight.grad is not None


def test_evlm_starts_as_the_plain_language_model():
    model = build("evlm").eval()
    ex = make_example(image_sample("a", "red"), model.cfg, TOK, model.vision.mean, model.vision.std)
    batch = pack([ex], model.cfg.max_len, TOK.pad_id)
    with torch.no_grad():
        vlm_logits = model(batch).logits
        lm_logits = model.lm(input_ids=batch["input_ids"]).logits
    assert torch.allclose(vlm_logits, lm_logits, atol=1e-5)
    # ... and the images matter once the gates open
    with torch.no_grad():
        for block in model.connector.blocks.values():
            block.attn_gate.fill_(1.0)
        assert not torch.allclose(model(batch).logits, lm_logits, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_samples_do_not_see_each_other(arch):
    model = build(arch).eval()
    first, second = image_sample("a", "red"), video_sample()
    other_first = image_sample("a", "yellow", (72, 96))
    other_first["qa"] = other_first["qa"][::-1]  # different text too

    def logits_of_second(samples):
        batch = batch_of(model, samples, max_len=2048)
        assert batch["input_ids"].shape[0] == 1  # both packed into one row
        meta = next(m for m in batch["samples"] if m["uid"] == "vid")
        in_second = batch["segment_ids"][0] == meta["segment"]
        with torch.no_grad():
            return model(batch).logits[0][in_second]

    together = logits_of_second([first, second])
    assert torch.allclose(together, logits_of_second([other_first, second]), atol=1e-5)
    alone = batch_of(model, [second])
    with torch.no_grad():
        assert torch.allclose(together, model(alone).logits[0][alone["segment_ids"][0] > 0], atol=1e-5)


def test_loss_mask_covers_only_answer_tokens():
    sample = image_sample("a", "green")
    cfg = model_config("llava")
    ex = encode(conversation(sample), sample["images"], "single", cfg, TOK, (0.5,) * 3, (0.5,) * 3)
    learned = [t for t, l in zip(ex.input_ids, ex.labels) if l != -100]
    assert TOK.decode(learned) == "green <eos> one <eos> a green circle . <eos>"
    assert all(l in (-100, t) for t, l in zip(ex.input_ids, ex.labels))
    assert ex.input_ids.count(TOK.image_id) == lm_tokens(cfg, ex.layouts[0])
    assert all(l == -100 for t, l in zip(ex.input_ids, ex.labels) if t == TOK.image_id)
    # QA turns come first: no answer can be read off the caption
    caption_start = ex.input_ids.index(TOK.ids["a"])
    assert caption_start > ex.input_ids.index(TOK.ids["green"])


def test_anyres_follows_the_token_math():
    # with LLaVA-OneVision's numbers, our feature grid gives curation.tokens' counts
    real = model_config("llava", image_size=384, patch_size=14, max_grid=6, max_tiles=9)
    for w, h in [(384, 384), (1000, 600), (2000, 400), (224, 224), (640, 1280)]:
        layout = image_layout(real, "single", w, h)
        assert layout[1:3] == tokens.anyres_grid(w, h)
        assert lm_tokens(real, layout) == tokens.anyres_tokens(w, h)
    # the tiny model downsamples above its budget and its connector emits exactly that many tokens
    model = build("llava")
    layout = image_layout(model.cfg, "single", 96, 72)
    assert anyres_features(model.cfg, layout)[1] < (layout[2] * model.cfg.unit, layout[1] * model.cfg.unit)
    batch = batch_of(model, mixed_samples(), max_len=1024)
    with torch.no_grad():
        per_image = model.encode_images(batch["pixels"], batch["layouts"])
    assert [len(v) for v in per_image] == [lm_tokens(model.cfg, l) for l in batch["layouts"]]


def test_text_sees_only_images_before_it_in_its_own_sample():
    # row: [t, IMG_a, t, t | t, IMG_b, t]; segments 1 and 2; two visual tokens per image
    slots = torch.tensor([[0, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    memory = visual_memory(torch.randn(2, 2, 8), slots, positions, segments)
    sees = memory.allowed[0].float()  # [L, K]
    expected = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0],
                             [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float)
    assert torch.equal(sees, expected)
    assert memory.positions.tolist() == [[1, 1, 1, 1]]  # MI-Rope: keys sit at their placeholder's position


def test_truncation_never_cuts_an_image():
    model = build("llava")
    sample = doc_sample()
    per_image = lm_tokens(model.cfg, ("base",))
    cfg = model.cfg
    cfg.max_len = per_image + 8  # room for the first image, not the second
    ex = make_example(sample, cfg, TOK, model.vision.mean, model.vision.std)
    assert len(ex.layouts) == 1 and ex.pixels.shape[0] == 1
    assert ex.input_ids.count(TOK.image_id) == per_image and len(ex.input_ids) <= cfg.max_len
