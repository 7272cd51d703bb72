"""Build training data for vision-language models.

Data flows one way: url lists --crawl--> raw shards --curate (Ray Data)--> ledger +
tier shards --> trainer. See README.md for the commands and DESIGN notes.

The Python API is the CLI's, one function per command, with the same checks:

    import curation

    cfg = curation.load_pipeline("demo")                  # a YAML file or a bundled recipe's name
    cfg = curation.Pipeline(name="mine", ops=[...], tiers=[...])   # or built in Python
    curation.crawl("urls.parquet", "raw/")                # curate crawl
    summary = curation.run(cfg, "raw/", "out/")           # curate run (starts Ray if needed)
    con = curation.connect("out/")                        # DuckDB views samples, ledger, shards
    plan = curation.plan("out/")                          # curate plan
    curation.export("llava", "out/", "export/", tier="alignment")   # curate export

Importing this package loads nothing heavy: each function imports what it needs
(Ray only inside `run` and `crawl`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "PipelineConfig", "connect", "crawl", "export", "load_pipeline", "plan", "run", "__version__"]

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

    from .config import PipelineConfig


def __getattr__(name: str) -> Any:
    # Pipeline and PipelineConfig load the config module (and the operator registry)
    # on first use, so `import curation` stays light.
    if name in ("Pipeline", "PipelineConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_pipeline(path: str | Path) -> "PipelineConfig":
    """A pipeline YAML file, or a bundled recipe's name ("demo", "llava_onevision"),
    checked before any work (every mistake is one ConfigError)."""
    from .config import load

    return load(path)


def run(pipeline: "PipelineConfig | str | Path", raw_dir: str | Path, out: str | Path, *,
        ray_address: str | None = None, memory_limit: str = "512MB", input_format: str = "auto",
        image_column: str | None = None, video_column: str | None = None, text_column: str | None = None,
        url_column: str | None = None, stage_dir: str | Path | None = None) -> dict:
    """`curate run`: curate `raw_dir`, anything `curate run --input` accepts (see README:
    Bring your own data), into `out` (running it again on the same `out` resumes).
    `input_format` (auto, webdataset, parquet, hf-disk, files) and the *_column options
    are `--input-format`, `--image-column`, ... `out` may be s3://bucket/prefix: the job
    then works in the local folder `stage_dir` (default under ~/.cache) and uploads what
    a user reads (README, Object storage). `pipeline`: a PipelineConfig (load_pipeline,
    Pipeline) or what load_pipeline takes. Starts a local Ray instance unless Ray is already
    initialised in this process or `ray_address` names a cluster. Returns the summary
    (also written to OUT/summary.json).

    Operators of your own run in Ray workers, which import their module by name: it
    must be importable there (a module in the working directory or an installed package
    on a local Ray; a class defined in the script itself travels with it). On a cluster,
    call ray.init(address=..., runtime_env={"py_modules": [...]}) with your module
    before `run`."""
    from .config import PipelineConfig, load
    from .inputs import InputOptions
    from .runner import run_pipeline

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    cfg = pipeline if isinstance(pipeline, PipelineConfig) else load(pipeline)
    options = InputOptions(format=input_format, image_column=image_column, video_column=video_column,
                           text_column=text_column, url_column=url_column)
    return run_pipeline(cfg, raw_dir, out, ray_address=ray_address, memory_limit=memory_limit, input_options=options,
                        stage_dir=stage_dir)


def crawl(input_path: str | Path, out: str | Path, *, kind: str = "image_text", **options: Any) -> "pd.DataFrame":
    """`curate crawl`: fetch a url list (image_text, video) or documents (interleaved)
    into raw shards under `out`, resuming what is there; returns the crawl ledger.
    `options` are the crawl's keyword arguments (curation.crawl.image_text.crawl_image_text,
    curation.crawl.media.crawl_media): url_col, caption_col, source, allow_private,
    allowed_networks, threads, timeout, retries, samples_per_shard, ..."""
    from .errors import InputError
    from .kinds import UnknownKind, kind_of

    try:
        crawler = kind_of(kind).crawler()  # curation.kinds: each kind names its crawler
    except UnknownKind as exc:
        raise InputError(str(exc)) from None
    return crawler(input_path, out, **options)


def connect(root: str | Path) -> "duckdb.DuckDBPyConnection":
    """A DuckDB connection over a run's output (a `curate run` folder, or a `curate demo`
    folder): views `samples` (every sidecar row, with the run's own columns), `ledger`,
    `shards` and `crawl_ledger`. It reads the run's own files and nothing else: no
    other file, no network, no writes, no configuration changes."""
    from .catalog import connect as catalog_connect

    return catalog_connect(root)


def plan(root: str | Path, *, pipeline: str | Path | None = None, out: str | Path | None = None) -> dict:
    """`curate plan`: resolve the pipeline's training stages over a run's output into
    per-stage shards, keys and token counts. `pipeline`: a YAML file with `stages:`
    (default: the recipe the run recorded, so a run started from Python works too).
    Writes the plan to `out` when given."""
    from .catalog import find_run_root
    from .config import for_output
    from .tiers.plan import make_plan, write_plan

    run_root = find_run_root(root)
    result = make_plan(for_output(run_root, pipeline), run_root)
    if out is not None:
        write_plan(result, out)
    return result


def export(fmt: str, root: str | Path, out: str | Path, *, tier: str | None = None, stage: str | None = None,
           pipeline: str | Path | None = None, sampling_strategy: str | None = None,
           stage_dir: str | Path | None = None) -> dict:
    """`curate export FORMAT` (llava, sharegpt, messages, cauldron): one tier, or one
    training stage's mix, as another trainer's data under `out` (a folder, or
    s3://bucket/prefix: written into the local `stage_dir`, default under ~/.cache, then
    uploaded). Returns what was written, how to load it, and what was left out or skipped."""
    from .publish import export as export_tiers

    return export_tiers(fmt, root, out, tier=tier, stage=stage, pipeline=pipeline,
                        sampling_strategy=sampling_strategy, stage_dir=stage_dir)
