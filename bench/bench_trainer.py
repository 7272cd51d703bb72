"""Does the trainer's data loader keep up with the model?

Measures, in one run, on the same plan stage and settings:
  1. loader alone: packed batches/s from the DataLoader (webdataset streaming, decode,
     tokenise, tile, pack) with --workers processes, as samples/s;
  2. model alone: optimizer steps on batches already in memory, as samples/s;
  3. both together (the real loop): samples/s and the share of time the model waited for data.
The ratio loader/model > 1 and a wait share near 0 mean the loader never starves the model.

The model step is also reported as LM tokens/s and achieved FLOP/s (curation/trainer/flops.py:
model FLOPs of forward + backward, recomputation and padding not counted), and on a GPU whose
dense bf16 peak is known (flops.PEAK_BF16_FLOPS) as MFU = achieved / peak. On a GPU the model
runs under bf16 autocast, as `curate train` does.

    .venv/bin/python bench/bench_trainer.py --synthetic --arch llava --size small --batch-size 64

--synthetic measures the model step alone on batches drawn in code (coloured shapes of random
sizes with captions and questions, packed as the loader packs), so it needs no curated output.

    .venv/bin/python bench/bench_trainer.py --plan shards/demo/curated/plan.json --arch llava
"""

from __future__ import annotations

import argparse
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from curation.trainer.config import model_config  # noqa: E402
from curation.trainer.data import (TEMPLATE_TEXT, TrainBatches, find_stage, load_plan, make_example,  # noqa: E402
                                   pack, stage_sources, to_device)
from curation.trainer.flops import batch_flops, peak_flops  # noqa: E402
from curation.trainer.lm import resolve_backend  # noqa: E402
from curation.trainer.model import VLM  # noqa: E402
from curation.trainer.tokenizer import WordTokenizer  # noqa: E402
from curation.trainer.train import accumulate_gradients, build_tokenizer, make_optimizer, set_trainable  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square")


def synthetic_samples(count: int, seed: int = 0) -> list[dict]:
    """Single-image samples of random size: a coloured shape, its caption and two questions."""
    from PIL import Image, ImageDraw

    rng, samples = random.Random(seed), []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        size = (rng.randint(48, 320), rng.randint(48, 320))
        im = Image.new("RGB", size, (235, 235, 240))
        box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        samples.append({"uid": f"s{i}", "kind": "image_text", "role": "single", "doc": None, "images": [im],
                        "text": f"A {colour} {shape} on a grey background.",
                        "qa": [{"q": "What colour is the shape?", "a": colour},
                               {"q": "What shape is it?", "a": shape}]})
    return samples


def synthetic_tokenizer() -> WordTokenizer:
    return WordTokenizer.build(TEMPLATE_TEXT + [" ".join(COLOURS), " ".join(SHAPES),
                                                "A on a grey background. What colour is the shape? What shape is it?"])


class ModelStep:
    """One optimizer step of the full model, on the GPU under bf16 autocast when there is one."""

    def __init__(self, cfg, tok, attention: str = "auto", activation_checkpointing: bool = False):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        torch.manual_seed(0)
        self.model = VLM(cfg, tok.vocab_size, tok.image_id).to(self.device)
        self.model.attention = resolve_backend(attention, self.device)
        self.model.activation_checkpointing = activation_checkpointing
        set_trainable(self.model, "full")
        self.opt = make_optimizer(self.model, 1e-4, 1.0)

    def __call__(self, batch: dict) -> None:
        accumulate_gradients(self.model, [to_device(batch, self.device)], self.autocast)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def rates(self, held: list[dict]) -> dict:
        """Steps on batches already in memory: samples/s, LM tokens/s, model FLOP/s (and MFU)."""
        self(held[0])  # warm-up (on CUDA also the attention kernel's compilation)
        self(held[-1])
        self.sync()
        t = time.perf_counter()
        for batch in held:
            self(batch)
        self.sync()
        seconds = time.perf_counter() - t
        tokens = sum(int((b["segment_ids"] > 0).sum()) for b in held)
        flops = sum(batch_flops(self.model, b) for b in held)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        peak = peak_flops(name) if self.device.type == "cuda" else None
        return {"device": name, "attention": self.model.attention,
                "activation_checkpointing": self.model.activation_checkpointing,
                "model_samples_per_s": sum(len(b["samples"]) for b in held) / seconds,
                "model_tokens_per_s": tokens / seconds, "flops_per_token": flops / tokens,
                "achieved_flops": flops / seconds, "mfu": flops / seconds / peak if peak else None}


def measure_synthetic(arch: str = "llava", size: str = "tiny", batch_size: int = 16, threads: int = 1,
                      batches: int = 20, attention: str = "auto", activation_checkpointing: bool = False) -> dict:
    """The model step alone on synthetic batches."""
    torch.set_num_threads(threads)
    cfg, tok = model_config(arch, size), synthetic_tokenizer()
    step = ModelStep(cfg, tok, attention, activation_checkpointing)
    samples = synthetic_samples(batches * batch_size)
    held = [pack([make_example(s, cfg, tok, step.model.vision.mean, step.model.vision.std, "synthetic")
                  for s in samples[i:i + batch_size]], cfg.max_len, tok.pad_id)
            for i in range(0, len(samples), batch_size)]
    return {"arch": arch, "size": size, "stage": "synthetic", "batch_size": batch_size, "threads": threads,
            "batches": batches, "max_len": cfg.max_len,
            "packed_rows": sum(b["input_ids"].shape[0] for b in held) / len(held),
            "tokens": sum(int((b["segment_ids"] > 0).sum()) for b in held) / len(held), **step.rates(held)}


def measure(plan_path: str | Path, arch: str = "llava", size: str = "tiny", stage_name: str | None = "stage2_onevision",
            batch_size: int = 16, workers: int = 1, threads: int = 1, batches: int = 20, attention: str = "auto",
            activation_checkpointing: bool = False) -> dict:
    """The three measurements above on one plan stage; rates in samples/s (and the model
    step's tokens/s, FLOP/s, MFU)."""
    torch.set_num_threads(threads)
    plan = load_plan(plan_path)
    stage = find_stage(plan, stage_name)
    cfg = model_config(arch, size)
    tok = build_tokenizer(plan, cfg)
    step = ModelStep(cfg, tok, attention, activation_checkpointing)
    model = step.model

    def loader():
        ds = TrainBatches(stage_sources(plan, stage), cfg, tok, model.vision.mean, model.vision.std, batch_size)
        return iter(DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))

    # 1. loader alone (after its first batch: worker start-up is not throughput)
    it = loader()
    next(it)
    t = time.perf_counter()
    held = [next(it) for _ in range(batches)]
    loader_rate = batches * batch_size / (time.perf_counter() - t)
    del it

    # 2. model alone, on the batches just loaded
    model_rates = step.rates(held)

    # 3. the real loop: time blocked waiting for the next batch
    it = loader()
    step(next(it))
    waited, t = 0.0, time.perf_counter()
    for _ in range(batches):
        w = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - w
        step(batch)
    step.sync()
    total = time.perf_counter() - t
    return {"arch": arch, "size": size, "stage": stage["name"], "batch_size": batch_size, "workers": workers,
            "threads": threads, "batches": batches,
            "packed_rows": sum(b["input_ids"].shape[0] for b in held) / len(held),
            "tokens": sum(int((b["segment_ids"] > 0).sum()) for b in held) / len(held),
            "loader_samples_per_s": loader_rate, **model_rates,
            "loop_samples_per_s": batches * batch_size / total, "waiting_share": waited / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", help="plan.json of curated output (or --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="the model step alone, on batches drawn in code")
    p.add_argument("--arch", default="llava")
    p.add_argument("--size", default="tiny")
    p.add_argument("--stage", default="stage2_onevision", help="a stage mixing single images, documents and video")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=20, help="batches per measurement")
    p.add_argument("--attention", default="auto", choices=["auto", "flex", "documents", "dense"])
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()
    engine = dict(attention=args.attention, activation_checkpointing=args.activation_checkpointing)
    if args.synthetic:
        r = measure_synthetic(args.arch, args.size, args.batch_size, args.threads, args.batches, **engine)
    elif args.plan:
        r = measure(args.plan, args.arch, args.size, args.stage, args.batch_size, args.workers, args.threads,
                    args.batches, **engine)
    else:
        p.error("give --plan or --synthetic")
    device = r["device"] if r["device"] != "cpu" else f"CPU, {r['threads']} thread(s)"
    print(f"{r['arch']}/{r['size']}, stage {r['stage']}, batch {r['batch_size']} samples "
          f"(~{r['packed_rows']:.1f} packed rows, ~{r['tokens']:.0f} tokens), {device}, {r['attention']} attention"
          + (", activation checkpointing" if r["activation_checkpointing"] else ""))
    print(f"{'model step alone':<28} {r['model_samples_per_s']:8.1f} samples/s, {r['model_tokens_per_s']:,.0f} "
          f"tokens/s")
    print(f"{'model FLOPs per token':<28} {r['flops_per_token'] / 1e6:8.2f} MFLOP (forward + backward)")
    line = f"{'achieved':<28} {r['achieved_flops'] / 1e12:8.4f} TFLOP/s"
    if r["mfu"] is not None:
        line += f", MFU {100 * r['mfu']:.2f}% of the device's dense bf16 peak"
    elif r["device"] != "cpu":
        line += " (MFU omitted: this device's peak is not in flops.PEAK_BF16_FLOPS)"
    print(line)
    if args.synthetic:
        return
    print(f"{'loader alone':<28} {r['loader_samples_per_s']:8.1f} samples/s ({r['workers']} loader worker(s))")
    print(f"{'loader / model':<28} {r['loader_samples_per_s'] / r['model_samples_per_s']:8.2f}x")
    print(f"{'training loop':<28} {r['loop_samples_per_s']:8.1f} samples/s, "
          f"waiting for data {100 * r['waiting_share']:.1f}% of the time")


if __name__ == "__main__":
    main()
