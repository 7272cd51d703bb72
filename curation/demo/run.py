"""`curate demo`: build the corpus, serve it on 127.0.0.1, crawl it, curate it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd

from .. import config
from ..crawl import KINDS
from ..crawl.image_text import crawl_image_text
from ..crawl.media import crawl_media
from ..errors import InputError
from ..paths import find_pipeline
from ..report import write_report
from ..captioner import TRAINING_FILE as CAPTIONER_RECORD
from ..captioner import train_captioner
from ..clipfilter import CALIBRATION_FILE, train_filter
from ..runner import run_pipeline
from . import corpus
from .truth import clip_filter_quality, optout_quality
from .server import serve_directory


MODELS_ENV = "CURATION_MODELS"
DERIVED_FOLDERS = ("raw", "models", "curated")  # what a demo run makes from its corpus
FILTER_EPOCHS = {"full": 12, "small": 24}  # about 11k pair-passes either way
CAPTIONER_STEPS = {"full": 400, "small": 150}


def run_demo(out: str | Path, small: bool = False, ray_address: str | None = None,
             samples_per_shard: int = 500, log=print, plan: corpus.CorpusPlan | None = None) -> dict:
    """`plan`: another corpus (bench/bench_data_to_model.py's noisy one); default the full or small plan."""
    out = Path(out)
    t0 = time.time()
    plan = plan or (corpus.CorpusPlan.small() if small else corpus.CorpusPlan())
    built = corpus.built_params(out / "corpus")
    derived = [d for d in DERIVED_FOLDERS if (out / d).exists()]
    if built is not None and built != corpus.build_params(plan=plan) and derived:
        # the crawl, models and curation were made from the corpus as it was: re-using them
        # beside a rebuilt corpus would mix two corpora (and its truth would not match)
        raise InputError(f"{out} holds a demo run of another corpus build (version {built.get('version')}, this "
                         f"package builds version {corpus.CORPUS_VERSION}, or another plan): its "
                         f"{', '.join(derived)} would not match; use a new output folder or remove {out}")
    log(f"[1/4] building the demo corpus in {out / 'corpus'}")
    info = corpus.build(out / "corpus", plan=plan)
    raw = out / "raw"
    if all((raw / f"_SUCCESS-{kind}").exists() for kind in KINDS):
        log(f"[2/4] crawl already complete in {raw}")
    else:
        # The demo server is our own on loopback: allow exactly that address, nothing else private.
        loopback = ("127.0.0.1/32",)
        with serve_directory(out / "corpus", headers=corpus.RESPONSE_HEADERS) as base:
            log(f"[2/4] crawling {info['image_text_rows']} image urls, {info['documents']} documents and "
                f"{info['videos']} videos from the demo server at {base}")
            urls = pd.read_parquet(out / "corpus" / "image_text.parquet")
            urls.insert(0, "url", base + "/" + urls.pop("path"))
            url_list = out / "urls.parquet"
            urls.to_parquet(url_list, index=False)
            crawl_image_text(url_list, raw, allowed_networks=loopback, ray_address=ray_address,
                             samples_per_shard=samples_per_shard)
            docs = out / "documents.jsonl"
            with open(out / "corpus" / "documents.jsonl", encoding="utf-8") as src, open(docs, "w", encoding="utf-8") as dst:
                for line in src:
                    doc = json.loads(line)
                    for item in doc["items"]:
                        if item["type"] == "image":
                            item["url"] = f"{base}/{item.pop('path')}"
                    dst.write(json.dumps(doc) + "\n")
            crawl_media("interleaved", docs, raw, allowed_networks=loopback)
            videos = pd.read_parquet(out / "corpus" / "videos.parquet")
            videos.insert(0, "url", base + "/" + videos.pop("path"))
            videos.to_parquet(out / "videos.parquet", index=False)
            crawl_media("video", out / "videos.parquet", raw, allowed_networks=loopback)
    # The demo pipeline names its models under ${CURATION_MODELS}: here, OUT/models.
    models = out / "models"
    os.environ[MODELS_ENV] = str(models.resolve())
    trusted = sorted((out / "corpus" / "trusted").glob("*.tar"))
    size = "small" if small else "full"
    clip_dir, captioner_dir = models / "clip-filter", models / "captioner"
    if (clip_dir / CALIBRATION_FILE).exists():
        log(f"[3/4] CLIP filter already trained in {clip_dir}")
    else:
        log(f"[3/4] training the CLIP filter on {plan.trusted} trusted pairs (curate train-filter)")
        info = train_filter(trusted, clip_dir, epochs=FILTER_EPOCHS[size], log=lambda m: log("      " + m))
        log(f"      held-out AUC {info['metrics']['auc']}, calibrated min_score {info['min_score']}")
    if (captioner_dir / CAPTIONER_RECORD).exists():
        log(f"      captioner already trained in {captioner_dir}")
    else:
        log(f"      training the re-captioner on the same pairs (curate train-captioner)")
        info = train_captioner(trusted, captioner_dir, steps=CAPTIONER_STEPS[size], log=lambda m: log("      " + m))
        m = info["metrics"]
        log(f"      held-out captions: colour precision {m['colour_precision']}, shape precision "
            f"{m['shape_precision']}, whole description right {m['description_match']}")
    recipe = find_pipeline("demo")  # the bundled recipe, inside the package
    log(f"[4/4] curating with {recipe}")
    cfg = config.load(recipe)
    summary = run_pipeline(cfg, raw, out / "curated", ray_address=ray_address)
    summary["clip_filter"] = clip_filter_quality(out)
    summary["optout_plants"] = optout_quality(out)
    summary["report"] = str(write_report(out / "curated"))
    summary["demo_seconds"] = round(time.time() - t0, 2)
    return summary
