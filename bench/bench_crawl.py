"""Crawl throughput: `curate crawl` (img2dataset + our fetch policy + rounds + ledger)
against img2dataset called directly, on the same url list served from 127.0.0.1, in one
run. Usage: python bench/bench_crawl.py [--rows 3000] [--reps 2]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pandas as pd  # noqa: E402

from curation.crawl.image_text import crawl_image_text  # noqa: E402
from curation.demo import corpus  # noqa: E402
from curation.demo.server import serve_directory  # noqa: E402

COMMON = dict(processes=2, threads=32, samples_per_shard=500)


def plain_img2dataset(url_list: Path, out: Path) -> None:
    from img2dataset import download

    download(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), processes_count=COMMON["processes"],
             thread_count=COMMON["threads"], number_sample_per_shard=COMMON["samples_per_shard"],
             resize_mode="no", disable_all_reencoding=True, compute_hash="sha256", timeout=10, retries=0,
             distributor="multiprocessing", enable_wandb=False)


def measure(corpus_dir: str | Path, rows: int, reps: int, keep: Path | None = None) -> dict:
    """urls/s of img2dataset alone and of `curate crawl`, median and best of `reps`
    alternating runs on the first `rows` urls of the demo corpus (built if missing).
    `keep`: where our last crawl's output (raw shards + crawl ledger) is moved to."""
    corpus.build(corpus_dir)
    table = pd.read_parquet(Path(corpus_dir) / "image_text.parquet").head(rows)
    results: dict[str, list[float]] = {"img2dataset": [], "curate_crawl": []}
    with serve_directory(corpus_dir) as base, tempfile.TemporaryDirectory() as tmp:
        url_list = Path(tmp) / "urls.parquet"
        table.assign(url=base + "/" + table["path"])[["url", "caption"]].to_parquet(url_list, index=False)
        plain_img2dataset(url_list, Path(tmp) / "warmup")  # page cache, imports: not measured
        for rep in range(reps):  # alternate, so neither side always gets the warm cache
            t = time.perf_counter()
            plain_img2dataset(url_list, Path(tmp) / f"plain{rep}")
            results["img2dataset"].append(len(table) / (time.perf_counter() - t))
            t = time.perf_counter()
            crawl_image_text(url_list, Path(tmp) / f"ours{rep}", allowed_networks=("127.0.0.1/32",), **COMMON)
            results["curate_crawl"].append(len(table) / (time.perf_counter() - t))
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / f"ours{reps - 1}"), str(keep))
    plain, ours = statistics.median(results["img2dataset"]), statistics.median(results["curate_crawl"])
    best_plain, best_ours = max(results["img2dataset"]), max(results["curate_crawl"])
    return {
        "urls": len(table), "cpus": os.cpu_count(),
        "img2dataset_urls_per_s_median": round(plain, 1), "curate_crawl_urls_per_s_median": round(ours, 1),
        "ratio_median": round(ours / plain, 3),
        "img2dataset_urls_per_s_best": round(best_plain, 1), "curate_crawl_urls_per_s_best": round(best_ours, 1),
        "ratio_best": round(best_ours / best_plain, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="shards/bench/corpus")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.corpus, args.rows, args.reps), indent=2))


if __name__ == "__main__":
    main()
