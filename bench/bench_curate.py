"""Curation throughput: the Ray Data job against a plain loop, same operators, same
inputs, one run. Usage (the demo recipe names its models under ${CURATION_MODELS}):
  CURATION_MODELS=shards/demo/models python bench/bench_curate.py --raw shards/demo/raw"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from curation import config
from curation.annotate import StageActor, fuse, read_raw_shards, run_stage_a
from curation.paths import bundled_pipeline
from curation.rawshards import count_samples, list_raw_shards
from curation.runner import run_pipeline


def plain_loop(cfg, shards: list[Path], batch_size: int) -> int:
    """The baseline: one process, operators built once, batches of the same size. Rows
    come from stage A's own reader (sample rows, media validated for the tier), so both
    sides do the same work per sample; the pipeline also routes and writes its parts."""
    actors = [StageActor(stage) for stage in fuse(cfg.map_ops)]
    n = 0
    for path in shards:
        rows = pa.concat_tables(read_raw_shards({"path": [str(path)], "source": ["bench"]})).to_pandas()
        for start in range(0, len(rows), batch_size):
            batch = rows.iloc[start:start + batch_size].reset_index(drop=True)
            for actor in actors:
                batch = actor(batch).to_pandas()
            n += len(batch)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", default="shards/demo/raw")
    ap.add_argument("--pipeline", default=str(bundled_pipeline("demo")))
    ap.add_argument("--repeat", type=int, default=1,
                    help="use the raw shards N times (as links) so fixed start-up costs amortise")
    args = ap.parse_args()
    cfg = config.load(args.pipeline)
    linked = tempfile.TemporaryDirectory()
    raw = Path(linked.name)
    for i in range(args.repeat):
        for p in list_raw_shards(args.raw):
            (raw / f"{i:03d}-{p.name}").symlink_to(p.resolve())
    args.raw = raw
    shards = list_raw_shards(raw)
    counts = {p.name: count_samples(p) for p in shards}  # what runner.count_all gives a fresh run
    total = sum(counts.values())
    batch = cfg.map_ops[0].resources.batch_size

    t = time.perf_counter()
    assert plain_loop(cfg, shards, batch) == total
    plain_s = time.perf_counter() - t

    from curation.runtime.ray_env import start_ray

    t = time.perf_counter()
    start_ray()
    ray_start_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_stage_a(cfg, shards, counts, Path(tmp) / "_work" / "annotated", "bench")
        stage_a_s = time.perf_counter() - t
    full_s = None
    if args.repeat == 1:  # repeated shards share uids, which a full run rightly refuses
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            run_pipeline(cfg, args.raw, Path(tmp) / "out")
            full_s = time.perf_counter() - t

    result = {
        "samples": total,
        "plain_loop_samples_per_s": round(total / plain_s, 1),
        "ray_stage_a_samples_per_s": round(total / stage_a_s, 1),
        "ratio_stage_a_vs_plain": round(plain_s / stage_a_s, 3),
        "full_run_samples_per_s": round(total / full_s, 1) if full_s else None,
        "ratio_full_run_vs_plain": round(plain_s / full_s, 3) if full_s else None,
        "ray_start_s": round(ray_start_s, 2),
        "cpus": __import__("os").cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
