"""Does the trainer's data loader keep up with the model?

Measures, in one run, on the same plan stage and settings:
  1. loader alone: packed batches/s from the DataLoader (webdataset streaming, decode,
     tokenise, tile, pack) with --workers processes, as samples/s;
  2. model alone: optimizer steps on batches already in memory, as samples/s;
  3. both together (the real loop): samples/s and the share of time the model waited for data.
The ratio loader/model > 1 and a wait share near 0 mean the loader never starves the model.

    .venv/bin/python bench/bench_trainer.py --plan shards/demo/curated/plan.json --arch llava
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from curation.trainer.config import model_config  # noqa: E402
from curation.trainer.data import TrainBatches, find_stage, load_plan, stage_sources  # noqa: E402
from curation.trainer.model import VLM  # noqa: E402
from curation.trainer.train import build_tokenizer, make_optimizer, set_trainable  # noqa: E402


def measure(plan_path: str | Path, arch: str = "llava", size: str = "tiny", stage_name: str | None = "stage2_onevision",
            batch_size: int = 16, workers: int = 1, threads: int = 1, batches: int = 20) -> dict:
    """The three measurements above on one plan stage; rates in samples/s."""
    torch.set_num_threads(threads)
    plan = load_plan(plan_path)
    stage = find_stage(plan, stage_name)
    cfg = model_config(arch, size)
    tok = build_tokenizer(plan, cfg)
    torch.manual_seed(0)
    model = VLM(cfg, tok.vocab_size, tok.image_id)
    set_trainable(model, "full")
    opt = make_optimizer(model, 1e-4, 1.0)

    def loader():
        ds = TrainBatches(stage_sources(plan, stage), cfg, tok, model.vision.mean, model.vision.std, batch_size)
        return iter(DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))

    def step(batch):
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # 1. loader alone (after its first batch: worker start-up is not throughput)
    it = loader()
    next(it)
    t = time.perf_counter()
    held = [next(it) for _ in range(batches)]
    loader_rate = batches * batch_size / (time.perf_counter() - t)
    del it

    # 2. model alone, on the batches just loaded
    step(held[0])  # warm-up
    t = time.perf_counter()
    for batch in held:
        step(batch)
    model_rate = batches * batch_size / (time.perf_counter() - t)

    # 3. the real loop: time blocked waiting for the next batch
    it = loader()
    step(next(it))
    waited, t = 0.0, time.perf_counter()
    for _ in range(batches):
        w = time.perf_counter()
        batch = next(it)
        waited += time.perf_counter() - w
        step(batch)
    total = time.perf_counter() - t
    return {"arch": arch, "size": size, "stage": stage["name"], "batch_size": batch_size, "workers": workers,
            "threads": threads, "batches": batches,
            "packed_rows": sum(b["input_ids"].shape[0] for b in held) / len(held),
            "tokens": sum(int((b["segment_ids"] > 0).sum()) for b in held) / len(held),
            "loader_samples_per_s": loader_rate, "model_samples_per_s": model_rate,
            "loop_samples_per_s": batches * batch_size / total, "waiting_share": waited / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--arch", default="llava")
    p.add_argument("--size", default="tiny")
    p.add_argument("--stage", default="stage2_onevision", help="a stage mixing single images, documents and video")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=20, help="batches per measurement")
    args = p.parse_args()
    r = measure(args.plan, args.arch, args.size, args.stage, args.batch_size, args.workers, args.threads, args.batches)
    print(f"{r['arch']}/{r['size']}, stage {r['stage']}, batch {r['batch_size']} samples "
          f"(~{r['packed_rows']:.1f} packed rows, ~{r['tokens']:.0f} tokens), {r['workers']} loader worker(s), "
          f"{r['threads']} threads")
    print(f"{'loader alone':<28} {r['loader_samples_per_s']:8.1f} samples/s")
    print(f"{'model step alone':<28} {r['model_samples_per_s']:8.1f} samples/s")
    print(f"{'loader / model':<28} {r['loader_samples_per_s'] / r['model_samples_per_s']:8.2f}x")
    print(f"{'training loop':<28} {r['loop_samples_per_s']:8.1f} samples/s, "
          f"waiting for data {100 * r['waiting_share']:.1f}% of the time")


if __name__ == "__main__":
    main()
