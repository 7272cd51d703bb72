"""Model operators in the Ray pipeline against a plain loop calling the same model on
the same images, in one run: CLIP scoring and OCR.

The plain loop is what a user would write without the tool: read the raw shards,
decode each image with PIL, call the model (open_clip on batches; rapidocr per image)
with every CPU thread in one process. The pipeline is `curate run`'s stage A with
decode_image + the operator, in Ray Data actor pools sized by the planner.

Usage:
  python bench/bench_models.py --raw shards/demo/raw [--clip-model ViT-B-32] [--ops clip,ocr]
`--clip-model` takes any open_clip name; without `--clip-pretrained` the weights are
random, which costs exactly what the trained model costs (no download needed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from curation import config
from curation.annotate import run_stage_a
from curation.rawshards import IMAGE_EXTS, count_samples, iter_samples, list_raw_shards


def images_in(shards: list[Path]) -> list[tuple[bytes, str]]:
    out = []
    for path in shards:
        for _key, files in iter_samples(path):
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if ext and path.name.startswith("image_text"):
                out.append((files[ext], files.get("txt", b"").decode("utf-8", "replace")))
    return out


def decodable(items):
    for data, text in items:
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > 40_000_000:
                continue
            yield img.convert("RGB"), text
        except Exception:
            continue


def plain_clip(items, model: str, pretrained: str | None, batch: int) -> int:
    from curation.clipfilter import embed_images, embed_texts, load_clip

    clip = load_clip(model, pretrained)
    n, images, texts = 0, [], []
    for img, text in decodable(items):
        images.append(img)
        texts.append(text)
        if len(images) == batch:
            (embed_images(clip, images) * embed_texts(clip, texts)).sum(1)
            n += len(images)
            images, texts = [], []
    if images:
        (embed_images(clip, images) * embed_texts(clip, texts)).sum(1)
        n += len(images)
    return n


def plain_ocr(items, det_limit_side: int) -> int:
    import numpy as np

    from curation.ops.ocr import RapidOcrBackend

    backend = RapidOcrBackend(det_limit_side)
    n = 0
    for img, _ in decodable(items):
        backend.read(np.asarray(img)[:, :, ::-1])
        n += 1
    return n


def pipeline_doc(op: dict) -> dict:
    return {"name": "bench", "ops": [{"op": "decode_image", "max_pixels": 40_000_000}, op],
            "tiers": [{"name": "all", "where": "true"}]}


def time_pipeline(doc: dict, shards: list[Path]) -> float:
    cfg = config.parse(doc, "bench")
    counts = {p.name: count_samples(p) for p in shards}  # what runner.count_all gives a fresh run
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_stage_a(cfg, shards, counts, Path(tmp) / "_work" / "annotated", "bench")
        return time.perf_counter() - t


def measure(name: str, shards: list[Path], clip_model: str = "ViT-B-32", clip_pretrained: str | None = None) -> dict:
    """One operator ("clip" or "ocr") on the images of `shards`: the plain loop, then the
    pipeline (Ray must be up: its start is not what is compared)."""
    items = images_in(shards)
    if name == "clip":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the plain loop: every core in one process
        # Ray gives a fractional-CPU actor one thread; the plain loop uses every core.
        op = {"op": "clip_score", "model": clip_model, "threads": os.cpu_count() or 1}
        if clip_pretrained:
            op["pretrained"] = clip_pretrained
        t = time.perf_counter()
        n = plain_clip(items, clip_model, clip_pretrained, batch=64)
        plain_s = time.perf_counter() - t
    elif name == "ocr":
        op = {"op": "ocr", "det_limit_side": 320}
        t = time.perf_counter()
        n = plain_ocr(items, 320)
        plain_s = time.perf_counter() - t
    else:
        raise ValueError(f"unknown operator {name!r}: clip or ocr")
    pipe_s = time_pipeline(pipeline_doc(op), shards)
    return {"images": n, "plain_images_per_s": round(n / plain_s, 1),
            "pipeline_images_per_s": round(n / pipe_s, 1), "ratio": round(plain_s / pipe_s, 3),
            "model": clip_model if name == "clip" else "rapidocr PP-OCR det+rec"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", default="shards/demo/raw")
    ap.add_argument("--ops", default="clip,ocr")
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--max-shards", type=int, default=2, help="image_text raw shards to use")
    ap.add_argument("--ocr-shards", type=int, default=1, help="OCR is slow: fewer shards for it")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from curation.runtime.ray_env import start_ray

    all_shards = [p for p in list_raw_shards(args.raw) if p.name.startswith("image_text")]
    start_ray()  # not timed: a cluster is already up
    results = {"cpus": os.cpu_count(), "torch_threads_plain": torch.get_num_threads()}
    for name in args.ops.split(","):
        shards = all_shards[: args.max_shards if name == "clip" else args.ocr_shards]
        results[name] = measure(name, shards, args.clip_model, args.clip_pretrained)
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
