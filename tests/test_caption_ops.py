"""The caption operator on tiny random-weight captioners built in code (no downloads):
captions are deterministic, traceable to the weights and the prompt, independent of
batching, and OCR text reaches the model's input."""

import io
import json
import random
from fractions import Fraction

import pandas as pd
import pytest
from PIL import Image

from curation.demo import scenes
from curation.errors import ConfigError
from curation.ops.caption import Caption, build_tiny_captioner
from curation.ops.frames import VideoFrames
from curation.ops.image import DecodeImage

PROMPT = "text : {ocr} . a picture of"


def rows(images, kind="image_text", **columns):
    n = len(images)
    return pd.DataFrame({"uid": [f"{i:016x}" for i in range(n)], "kind": [kind] * n, "image_bytes": images,
                         "text": ["a caption"] * n, "status": ["kept"] * n, "reason": [None] * n,
                         "error": [None] * n, **columns})


def demo_jpegs(n, seed=0):
    rng = random.Random(seed)
    return [scenes.encode_jpeg(scenes.render(scenes.random_scene(rng))) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As in a Ray actor with one CPU (Ray sets OMP_NUM_THREADS): on a busy 2-core
    machine two torch threads spin against each other and tiny models run 50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {arch: str(build_tiny_captioner(root / arch, arch)) for arch in ("vit-gpt2", "blip")}


@pytest.fixture(scope="module")
def vit_gpt2(models):
    return Caption(Caption.Params(model=models["vit-gpt2"], max_new_tokens=8))


@pytest.fixture(scope="module")
def blip(models):
    return Caption(Caption.Params(model=models["blip"], prompt=PROMPT, ocr_context=True,
                                  prompt_without_ocr="a picture of", max_new_tokens=8))


def test_captions_are_per_image_deterministic_and_traceable(models, vit_gpt2):
    batch = DecodeImage(DecodeImage.Params())(rows(demo_jpegs(6)))  # captioned from the decoded _image
    out = vit_gpt2(batch)
    assert (out["status"] == "kept").all()
    assert all(isinstance(c, str) and c for c in out["caption"])
    assert out["caption"].nunique() > 1  # the caption depends on the image
    again = Caption(Caption.Params(model=models["vit-gpt2"], max_new_tokens=8))(rows(demo_jpegs(6)))
    assert again["caption"].tolist() == out["caption"].tolist()  # fresh load, bytes path: same words
    model = out["caption_model"].iloc[0]
    assert model.startswith(models["vit-gpt2"] + "@sha256:") and out["caption_model"].nunique() == 1
    assert (out["caption_prompt"] == "").all()  # an encoder-decoder captioner takes no prompt
    assert out["scene_captions"].isna().all()


def test_weights_change_the_recorded_model(models, tmp_path):
    other = Caption(Caption.Params(model=str(build_tiny_captioner(tmp_path / "m", "vit-gpt2", seed=1))))
    assert other.captioner.name.split("@")[1] != Caption(Caption.Params(model=models["vit-gpt2"])).captioner.name.split("@")[1]


def test_hub_id_loads_from_the_cache_and_records_its_commit(tmp_path):
    """A hub id resolves through the HF cache (offline here): the snapshot's commit is recorded."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--captioner"
    build_tiny_captioner(repo / "snapshots" / commit, "vit-gpt2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from curation.ops.caption import Caption; "
            "print(Caption(Caption.Params(model='tiny/captioner')).captioner.name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == f"tiny/captioner@rev:{commit}"


def test_batched_equals_one_by_one(blip):
    ocr = ["STOP", "", "OPEN CAFE", None, "STOP", "BANK"]
    batched = blip(rows(demo_jpegs(6, seed=1), ocr_text=ocr))
    single = pd.concat([blip(rows(demo_jpegs(6, seed=1), ocr_text=ocr).iloc[[i]].copy()) for i in range(6)])
    assert batched["caption"].tolist() == single["caption"].tolist()
    assert all(batched["caption"])


def test_ocr_text_reaches_the_model_input(blip, monkeypatch):
    fed = []
    generate = blip.captioner.net.generate

    def spy(**inputs):
        fed.extend(blip.captioner.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True))
        return generate(**inputs)

    monkeypatch.setattr(blip.captioner.net, "generate", spy)
    same_image = demo_jpegs(1, seed=2) * 3
    out = blip(rows(same_image, ocr_text=["STOP", "MUSEUM", ""]))
    assert out["caption_prompt"].tolist() == ["text : STOP . a picture of", "text : MUSEUM . a picture of",
                                              "a picture of"]
    assert sorted(fed) == sorted(["text : stop. a picture of", "text : museum. a picture of", "a picture of"])


def test_ocr_context_without_the_ocr_column_fails_the_rows(blip):
    out = blip(rows(demo_jpegs(2)))
    assert out["status"].tolist() == ["failed", "failed"]
    assert "ocr operator" in out["error"].iloc[0]


def test_unreadable_image_fails_alone(vit_gpt2):
    images = demo_jpegs(3)
    images[1] = b"not an image"
    out = vit_gpt2(rows(images))
    assert out["status"].tolist() == ["kept", "failed", "kept"]
    assert out.loc[1, "reason"] == "caption_input_error" and "MediaError: not a decodable image" in out.loc[1, "error"]
    assert pd.isna(out.loc[1, "caption"]) and out.loc[0, "caption"] and out.loc[2, "caption"]


def test_options_are_checked(models):
    parse = Caption.parse_params
    with pytest.raises(ConfigError, match="unknown option"):
        parse({"model": models["blip"], "temperature": 0.7}, "p.yaml: ops[3]")
    with pytest.raises(ConfigError, match="required"):
        parse({}, "p.yaml: ops[3]")
    with pytest.raises(ConfigError, match="ocr"):
        parse({"model": models["blip"], "prompt": "about {ocr}"}, "p.yaml: ops[3]")
    with pytest.raises(ConfigError, match="true or false"):
        parse({"model": models["blip"], "videos": "yes"}, "p.yaml: ops[3]")
    with pytest.raises(ConfigError, match="takes no prompt"):
        Caption(parse({"model": models["vit-gpt2"], "prompt": "a picture of"}, "p.yaml: ops[3]"))


def cut_clip(fps=8, seconds=1.0, size=64) -> bytes:
    """Red for `seconds`, then blue for `seconds`: one hard cut in the middle."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(int(2 * fps * seconds)):
            colour = (220, 40, 40) if t < fps * seconds else (40, 80, 220)
            frame = av.VideoFrame.from_image(Image.new("RGB", (size, size), colour))
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_video_rows_get_one_caption_per_scene(vit_gpt2):
    framed = VideoFrames(VideoFrames.Params())(rows([cut_clip()], kind="video"))
    out = vit_gpt2(framed)
    assert out["status"].iloc[0] == "kept"
    per_scene = out["scene_captions"].iloc[0]
    assert [[s["start"], s["end"]] for s in per_scene] == [[s["start"], s["end"]] for s in out["scenes"].iloc[0]]
    assert len(per_scene) == 2 and all(s["start"] <= s["time"] <= s["end"] and s["caption"] for s in per_scene)
    assert out["caption"].iloc[0] in [s["caption"] for s in per_scene]
    # without video_frames the clip's middle frame is captioned
    whole = vit_gpt2(rows([cut_clip()], kind="video"))
    assert len(whole["scene_captions"].iloc[0]) == 1


@pytest.mark.slow
def test_caption_and_nsfw_through_curate_run(models, tmp_path):
    """The model operators as a user runs them: pipeline YAML, Ray actor pools, sidecars."""
    import tarfile

    import yaml

    from .conftest import curate

    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "00000.tar", "w") as tar:
        for i, data in enumerate(demo_jpegs(5, seed=4) + [b"broken"]):
            for ext, payload in (("jpg", data), ("txt", b"a simple drawing of shapes"),
                                 ("json", json.dumps({"kind": "image_text", "url": f"http://x/{i}.jpg"}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "caption_nsfw", "ops": [
            {"op": "decode_image"},
            {"op": "caption", "model": models["blip"], "prompt": "a picture of", "max_new_tokens": 6},
            {"op": "nsfw", "action": "annotate"}],
        "tiers": [{"name": "captioned", "where": "caption IS NOT NULL AND nsfw < 0.6"}]}))
    out = tmp_path / "out"
    curate("run", pipeline, "--input", raw, "--out", out)
    sidecar = pd.concat(pd.read_parquet(p) for p in (out / "tiers").rglob("*.parquet"))
    assert len(sidecar) == 5 and sidecar["caption"].map(bool).all()
    assert (sidecar["caption_prompt"] == "a picture of").all()
    assert sidecar["caption_model"].str.contains("@sha256:").all() and sidecar["nsfw_model"].notna().all()
    ledger = pd.read_parquet(out / "ledger.parquet")
    assert sorted(ledger["status"]) == ["failed"] + ["kept"] * 5  # the broken jpeg fails at decode
