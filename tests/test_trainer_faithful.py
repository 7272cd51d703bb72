"""Reference trainer, faithfulness to the papers and robustness (issue 14): LLaVA-NeXT's
unpad against the rule computed here independently (and the token bill equal to what the
model sees), layer -2 encoder features, layer lists derived from the models' depths,
OmniFusion on a 1024-wide encoder, per-paper stage defaults, literal special tokens in
text, webm clips, exact resume at any worker count. Tiny models built from configs; no
Ray, no hub."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from curation import tokens
from curation.errors import CurationError
from curation.trainer import ARCHS
from curation.trainer.config import (STAGE_DEFAULTS, cross_layers_for, default_vision_lr_scale,
                                     evlm_feature_layers_for, model_config, parse_layers)
from curation.trainer.connectors import LlavaConnector, adapter_heads
from curation.trainer.model import VLM
from curation.trainer.tokenizer import SPECIALS, WordTokenizer
from curation.trainer.views import image_layout, lm_tokens
from curation.trainer.vision import VisionEncoder, feature_block

torch.set_num_threads(1)
TOK = WordTokenizer.build(["a red circle . what colour is the circle ? user : assistant : describe the image"])

# ---------------------------------------------------------------- 1. unpad


def reference_unpad(width, height, cols, rows, unit, max_tiles):
    """LLaVA-NeXT's unpad_image + AnyRes-Max downsampling, written from the rule with floats
    (as transformers' port does: the scaled side rounded to 7 decimals, then int)."""
    cur_h, cur_w = rows * unit, cols * unit
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        box = (pad, cur_h - pad, 0, cur_w)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        box = (0, cur_h, pad, cur_w - pad)
    h, w = box[1] - box[0], box[3] - box[2]
    ratio = math.sqrt(h * w / (max_tiles * unit ** 2))
    out = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return box, out


SIZES = [(384, 384), (1000, 1000), (2000, 400), (1920, 1080), (512, 200), (1000, 600), (800, 600), (300, 1000),
         (400, 2000), (4000, 3000), (640, 1280), (7, 5), (1, 1), (10000, 10), (10, 10000), (3000, 7), (333, 1001)]
# counts for LLaVA-OneVision's geometry measured with LLaVA-NeXT's own rule by the trainer review
LLAVA_COUNTS = {(2000, 400): 5945, (512, 200): 1884, (1000, 600): 4665, (800, 600): 4725, (300, 1000): 2835,
                (1920, 1080): 7269, (4000, 3000): 7309, (384, 384): 1485}


def onevision_cfg(**kw):
    return model_config("llava", image_size=384, patch_size=14, max_grid=6, max_tiles=9, vision_dim=2, lm_hidden=2,
                        **kw)


def coordinate_connector(cfg):
    """A llava connector whose projector is the identity, so each output token says which
    padded-grid feature (row, column) it came from; newline = (-1, -1)."""
    conn = LlavaConnector(cfg)
    conn.mlp = nn.Identity()
    with torch.no_grad():
        conn.image_newline.fill_(-1.0)
    return conn


def coordinate_views(cfg, cols, rows):
    u = cfg.unit
    i, j = torch.meshgrid(torch.arange(u), torch.arange(u), indexing="ij")
    tiles = [torch.stack([r * u + i, c * u + j], -1).reshape(u * u, 2).float() for r in range(rows) for c in range(cols)]
    return torch.stack([torch.full((u * u, 2), -2.0), *tiles])  # global view first


@pytest.mark.parametrize("geometry", ["onevision", "tiny"])
def test_unpad_follows_llava_next_and_the_bill_is_what_the_model_sees(geometry):
    cfg = onevision_cfg() if geometry == "onevision" else model_config("llava", vision_dim=2, lm_hidden=2)
    conn = coordinate_connector(cfg)
    u = cfg.unit
    for w, h in SIZES:
        layout = image_layout(cfg, "single", w, h)
        cols, rows = layout[1:3]
        (r0, r1, c0, c1), (out_h, out_w) = reference_unpad(w, h, cols, rows, u, cfg.max_tiles)
        with torch.no_grad():
            seq = conn([coordinate_views(cfg, cols, rows)], [layout])[0]
        assert len(seq) == lm_tokens(cfg, layout)
        assert torch.all(seq[:u * u] == -2)  # the global view comes first, whole
        if r1 - r0 == 0 or c1 - c0 == 0:  # the reference keeps nothing here; we keep a centred row/column
            assert len(seq) > u * u + 1
            continue
        tiles = seq[u * u:].view(-1, out_w + 1, 2)
        assert tiles.shape[0] == out_h and torch.all(tiles[:, -1] == -1)  # one newline per feature row
        i, j = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
        expected = torch.stack([i, j], -1).float()  # the crop of the padded grid
        if (out_h, out_w) != (r1 - r0, c1 - c0):
            expected = F.interpolate(expected.permute(2, 0, 1)[None], size=(out_h, out_w), mode="bilinear")[0]
            expected = expected.permute(1, 2, 0)
        assert torch.allclose(tiles[:, :-1], expected), (w, h)
        if geometry == "onevision":
            bill = tokens.visual_tokens("image_text", w, h, 1, None)[2]  # what `curate plan` charges
            assert bill == len(seq) == u * u + out_h * out_w + out_h
            if (w, h) in LLAVA_COUNTS:
                assert bill == LLAVA_COUNTS[(w, h)]


def test_unpad_box_is_symmetric_and_floors_in_integers():
    # 1000x600 in a 3x2 grid (81x54 features): scaled height int(600 * 81/1000) = 48 -> 3 rows off each side
    assert tokens.unpad_box(1000, 600, 81, 54) == (3, 0, 48, 81)
    # 49 * 54/98 is 27 exactly, 26.999999999999996 in floats: a plain int() would cut a row top and bottom
    assert int(49 * (54 / 98)) == 26 and tokens.unpad_box(98, 49, 54, 28) == (0, 0, 28, 54)
    assert tokens.unpad_box(49, 98, 28, 54) == (0, 0, 54, 28)
    assert tokens.unpad_box(5000, 10, 8, 4) == (1, 0, 2, 8)  # at least a row where the reference keeps none


# ---------------------------------------------------------------- 2. layer -2 features


def test_timm_encoder_reads_block_minus_two_without_the_final_norm():
    cfg = model_config("llava")
    torch.manual_seed(0)
    enc = VisionEncoder(cfg).eval()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    vit = enc.vit
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixels)))
        states = [x]
        for block in vit.blocks:
            states.append(block(states[-1]))
        got = enc(pixels, [feature_block(cfg.vision_feature_layer, enc.depth)])[0]
        last_normed = vit.norm(states[-1])
    assert cfg.vision_feature_layer == -2 and feature_block(-2, enc.depth) == enc.depth - 2
    assert torch.allclose(got, states[-2], atol=1e-6)
    assert not torch.allclose(got, last_normed, atol=1e-3)
    model = VLM(model_config("llava"), TOK.vocab_size, TOK.image_id)
    assert model.connector.feature_blocks == [cfg.vision_depth - 2]
    with pytest.raises(CurationError, match="vision-feature-layer"):
        feature_block(0, 4)  # the embeddings are not a block's output


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_hf_encoder_features_are_hidden_states_minus_two(family, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    conf, cls = (SiglipVisionConfig, SiglipVisionModel) if family == "siglip" else (CLIPVisionConfig, CLIPVisionModel)
    torch.manual_seed(0)
    hf = cls(conf(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8)).eval()
    hf.save_pretrained(tmp_path)
    for layer in (-2, -1):
        cfg = model_config("owl3", vision_id=str(tmp_path), vision_feature_layer=layer)
        model = VLM(cfg, TOK.vocab_size, TOK.image_id).eval()
        assert (cfg.vision_dim, cfg.vision_depth, cfg.image_size, cfg.patch_size) == (32, 3, 32, 8)
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            got = model.vision(pixels, model.connector.feature_blocks)[0]
            ref = hf(pixel_values=pixels, output_hidden_states=True)
            last_normed = getattr(hf, "vision_model", hf).post_layernorm(ref.hidden_states[-1])
        prefix = 1 if family == "clip" else 0  # CLIP's class token is dropped
        assert got.shape == (2, 16, 32)
        assert torch.allclose(got, ref.hidden_states[layer][:, prefix:], atol=1e-5)
        assert not torch.allclose(got, last_normed[:, prefix:], atol=1e-3)  # never the final norm


def test_open_clip_folder_is_an_encoder(tmp_path):
    """A folder as `curate train-filter` writes it (the demo's CLIP filter) is an encoder:
    its geometry and CLIP normalisation reach the config, and the features are block outputs."""
    import open_clip
    from safetensors.torch import save_file

    from curation.clipfilter import TINY_CLIP

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {
        "size": 64, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}))
    cfg = model_config("evlm", vision_id=str(tmp_path))
    model = VLM(cfg, TOK.vocab_size, TOK.image_id).eval()
    assert (cfg.image_size, cfg.patch_size, cfg.vision_dim, cfg.vision_depth) == (64, 8, 128, 2)
    assert model.vision.backend == "open_clip" and model.vision.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    with torch.no_grad():
        assert torch.equal(model.vision.vit.conv1.weight, clip.visual.conv1.weight)  # its weights, not random ones
        got = model.vision(torch.randn(2, 3, 64, 64), [0, 1])
    assert [tuple(f.shape) for f in got] == [(2, 64, 128), (2, 64, 128)]


# ---------------------------------------------------------------- 3. layer lists from depths


def test_layer_lists_follow_the_papers_at_real_depths():
    assert cross_layers_for("owl3", 28) == [1, 9, 17, 25]  # mPLUG-Owl3's Qwen2-7B hyper layers
    assert cross_layers_for("owl3", 4) == [1, 3] and cross_layers_for("owl3", 6) == [1, 3, 5]
    assert cross_layers_for("evlm", 28) == [2, 6, 9, 13, 16, 20, 23, 27]
    assert cross_layers_for("evlm", 4) == [1, 3]
    assert evlm_feature_layers_for(40) == [4, 9, 14, 19, 24, 29, 34, 39]  # 8 of EVA2-CLIP-E's 40, evenly
    assert evlm_feature_layers_for(27) == [2, 5, 9, 12, 15, 19, 22, 26]
    assert parse_layers("2, 5,8", "--cross-layers") == [2, 5, 8] and parse_layers(None, "x") is None
    with pytest.raises(CurationError, match="comma-separated"):
        parse_layers("2;5", "--cross-layers")


@pytest.mark.parametrize("arch", ["evlm", "owl3"])
def test_layer_lists_are_derived_from_the_built_depths_and_settable(arch, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    blocks = (lambda m: m.connector.blocks) if arch == "evlm" else (lambda m: m.connector.hyper)
    for lm_layers, vision_depth in ((4, 4), (8, 6)):
        model = VLM(model_config(arch, lm_layers=lm_layers, vision_depth=vision_depth), TOK.vocab_size, TOK.image_id)
        assert sorted(map(int, blocks(model))) == cross_layers_for(arch, lm_layers)
        if arch == "evlm":
            assert model.connector.feature_blocks == evlm_feature_layers_for(vision_depth)
    # a loaded LM: its depth, not the preset's
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    model = VLM(model_config(arch, lm_id=str(tmp_path)), TOK.vocab_size, TOK.image_id)
    assert model.cfg.lm_layers == 8 and sorted(map(int, blocks(model))) == cross_layers_for(arch, 8) != [1, 3]
    # set by hand, checked against the depth
    model = VLM(model_config(arch, cross_layers=[2, 0], evlm_feature_layers=[0, 3] if arch == "evlm" else None),
                TOK.vocab_size, TOK.image_id)
    assert sorted(map(int, blocks(model))) == [0, 2] and model.cfg.cross_layers == [0, 2]
    with pytest.raises(CurationError, match="within 0..3"):
        VLM(model_config(arch, cross_layers=[1, 4]), TOK.vocab_size, TOK.image_id)
    if arch == "evlm":
        assert model.connector.feature_blocks == [0, 3]
        with pytest.raises(CurationError, match="--encoder-layers"):
            VLM(model_config(arch, evlm_feature_layers=[4]), TOK.vocab_size, TOK.image_id)


# ---------------------------------------------------------------- 4. omnifusion on a 1024-wide encoder


def test_omnifusion_builds_on_a_1024_wide_loaded_encoder(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=1024, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=16, image_size=32, patch_size=16)).save_pretrained(tmp_path)
    cfg = model_config("omnifusion", "small", vision_id=str(tmp_path))  # the small preset says 6 heads
    model = VLM(cfg, TOK.vocab_size, TOK.image_id).eval()
    assert (cfg.vision_dim, cfg.vision_heads) == (1024, 16)
    assert model.connector.adapter.self_attn.num_heads == 16
    with torch.no_grad():
        out = model.encode_images(torch.randn(1, 3, 32, 32), [("base",)])
    assert out[0].shape == (4 + 2, cfg.lm_hidden)  # 2x2 patches + image start/end
    assert adapter_heads(1024, 6) == 4 and adapter_heads(64, 4) == 4 and adapter_heads(7, 4) == 1


# ---------------------------------------------------------------- 5. stage defaults


def test_encoder_learning_rate_defaults_follow_the_papers():
    assert {a: STAGE_DEFAULTS[a]["vision_lr_scale"] for a in ARCHS} == {
        "llava": 0.2, "omnifusion": 0.0, "owl3": 0.0, "evlm": 0.0}
    for arch in ARCHS:
        assert default_vision_lr_scale(arch, "connector", pretrained_encoder=True) == 0.0
        assert default_vision_lr_scale(arch, "full", pretrained_encoder=True) == STAGE_DEFAULTS[arch]["vision_lr_scale"]
        assert default_vision_lr_scale(arch, "full", pretrained_encoder=False) == 1.0  # random weights must learn


# ---------------------------------------------------------------- 6. special tokens inside text


def hf_tokenizer_folder(path):
    """A transformers fast tokenizer saved to a folder, built offline from a word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>", "<", ">", "|", "image", "endoftext", "a", "red", "circle", ".", "user", ":",
             "assistant", "what", "colour", "is", "the", "?", "describe", "\n"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(path)
    return path


def test_a_literal_image_token_in_a_caption_stays_text(tmp_path):
    from curation.trainer.data import make_example
    from curation.trainer.tokenizer import HFTokenizer

    hf = HFTokenizer(str(hf_tokenizer_folder(tmp_path)))
    for tok in (TOK, hf):
        text = "a red <image> circle <|endoftext|> <eos> <pad>."
        ids = tok.encode(text)
        assert tok.image_id not in ids and tok.eos_id not in ids and ids
        cfg = model_config("llava")
        sample = {"uid": "u", "kind": "image_text", "text": "a <image> red <image> circle.", "role": "single",
                  "doc": None, "qa": [{"q": "what <image> colour?", "a": "red <image>"}],
                  "images": [Image.new("RGB", (60, 40), (200, 30, 30))]}
        ex = make_example(sample, cfg, tok, (0.5,) * 3, (0.5,) * 3)
        assert ex.input_ids.count(tok.image_id) == lm_tokens(cfg, ex.layouts[0])  # only the real image's slots
    assert hf.encode("a red") == [7, 8] and hf.image_id not in hf.encode("<image>")
    assert all(s not in TOK.vocab[len(SPECIALS):] for s in SPECIALS)


# ---------------------------------------------------------------- 7. webm clips


def clip_bytes(fmt: str, codec: str, frames: int = 6, size: int = 32) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=6)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.zeros((size, size, 3), np.uint8)
            arr[:, : (i + 1) * size // frames] = (0, 200, 0)  # a green bar growing to the right
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def held_out_uids(count: int, held: bool) -> list[str]:
    from curation.trainer.data import is_held_out

    return [u for u in (f"s{i:04d}" for i in range(10 * count + 100)) if is_held_out(u) == held][:count]


def test_webm_clips_are_decoded_for_training_and_eval(tmp_path):
    from curation.trainer.data import TierSource, decode_sample, held_out_samples, make_example

    webm = clip_bytes("webm", "libvpx")
    assert webm[:4] == b"\x1a\x45\xdf\xa3"  # Matroska/WebM
    uid = held_out_uids(1, held=True)[0]
    meta = json.dumps({"uid": uid, "kind": "video", "caption": "a green bar grows."}).encode()
    raw = {"__key__": uid, "json": meta, "webm": webm}
    sample = decode_sample(raw, frames_per_video=3)
    assert sample["kind"] == "video" and len(sample["images"]) == 3
    first, last = (np.asarray(sample["images"][i]) for i in (0, -1))
    assert last[:, :, 1].mean() > first[:, :, 1].mean() + 50  # real frames, in order
    cfg = model_config("llava")
    ex = make_example(sample, cfg, TOK, (0.5,) * 3, (0.5,) * 3)
    assert [l[0] for l in ex.layouts] == ["frame"] * 3 and ex.pixels.shape[0] == 3
    # eval reads the held-out clip from a tier shard; an undecodable neighbour is skipped, not fatal
    shard = write_tar(tmp_path / "000000.tar", [
        raw, {"__key__": "bad", "json": json.dumps({"uid": held_out_uids(2, True)[1], "kind": "video"}).encode(),
              "webm": b"\x1a\x45\xdf\xa3 not a clip"}])
    with pytest.warns(UserWarning, match="skipping held-out sample bad"):
        got = list(held_out_samples([TierSource("video", [shard], {"000000.tar": None}, 1.0)], 3))
    assert [(t, s["uid"], len(s["images"])) for t, s in got] == [("video", uid, 3)]


def test_a_long_clip_decodes_only_the_frames_it_keeps(monkeypatch):
    """A clip's frames spread evenly, first and last included, and only those (plus the
    seek run-up from a keyframe) are decoded: memory does not grow with the clip."""
    import av

    from curation.trainer.data import decode_video

    size, frames = 16, 240
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24, options={"g": "12", "bf": "0"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):  # brightness tells the frame's index
            arr = np.full((size, size, 3), i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode(None))
    decoded = []
    real_decode = av.container.InputContainer.decode

    def counting_decode(self, *args, **kwargs):
        for frame in real_decode(self, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", counting_decode)
    images = decode_video(buf.getvalue(), 4)
    levels = [int(np.asarray(im).mean().round()) for im in images]
    expected = [round(i * (frames - 1) / 3) for i in range(4)]  # 0, 80, 159, 239
    assert all(abs(got - want) <= 3 for got, want in zip(levels, expected)), levels  # lossy codec: a few levels
    assert 0 < len(decoded) <= 4 * 12 < frames  # at most a GOP per kept frame, never the whole clip


# ---------------------------------------------------------------- 8. exact resume at any worker count


def image_png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine: fine here
@pytest.mark.parametrize("workers,resample,skips", [(2, True, (3,)), (3, True, (4, 5)), (3, False, (1,))])
def test_resumed_stream_equals_the_uninterrupted_one(tmp_path, workers, resample, skips):
    from torch.utils.data import DataLoader

    from curation.trainer.data import TierSource, TrainBatches

    uids = held_out_uids(30, held=False)
    shards = [write_tar(tmp_path / f"{n:06d}.tar", [
        {"__key__": u, "json": json.dumps({"uid": u, "kind": "image_text", "caption": "a red circle."}).encode(),
         "png": image_png((i * 8, 0, 0))} for i, u in enumerate(uids) if i % 3 == n]) for n in range(3)]
    source = TierSource("t", shards, {Path(p).name: None for p in shards}, 1.0)
    cfg = model_config("llava")

    def order(skip, count):
        batches = TrainBatches([source], cfg, TOK, (0.5,) * 3, (0.5,) * 3, batch_size=2, skip_batches=skip,
                               shuffle_buffer=4, resample=resample)
        loader = iter(DataLoader(batches, batch_size=None, num_workers=workers))
        return [tuple(m["uid"] for m in next(loader)["samples"]) for _ in range(count)]

    total = 8
    straight = order(0, total)
    assert len(set(straight)) > total // 2  # the streams differ: the test can see a reordering
    for skip in skips:
        assert order(skip, total - skip) == straight[skip:], f"resume after {skip} batches with {workers} workers"


# ---------------------------------------------------------------- 9. curate plan needs no models


def test_plan_reads_the_demo_recipe_without_its_model_variables(tmp_path, monkeypatch):
    from curation import config
    from curation.errors import ConfigError

    monkeypatch.setenv("CURATION_MODELS", str(tmp_path / "models"))
    with_env = config.load("demo")
    monkeypatch.delenv("CURATION_MODELS")
    with pytest.raises(ConfigError, match="CURATION_MODELS is not set"):
        config.load("demo")  # running still needs the models
    read = config.for_output(tmp_path, "demo")  # curate plan/export --pipeline demo
    assert read.config_hash == with_env.config_hash and [s.name for s in read.stages] == [s.name for s in with_env.stages]
    # without --pipeline: the recipe the run recorded, as the demo's curate run writes it
    (tmp_path / "_work").mkdir()
    (tmp_path / "_work" / "run.json").write_text(json.dumps({"recipe": with_env.describe(),
                                                             "config_hash": with_env.config_hash}))
    assert config.for_output(tmp_path).config_hash == with_env.config_hash
    with pytest.raises(ConfigError, match="CURATION_MODELS is not set"):
        config.load("demo")  # the leniency ended with the read
