"""`curate run`: the curation job, in three stages that each stream.

Stage A (curation/annotate.py, Ray Data): raw shards -> map operators in actor pools ->
  routed, annotated parts that the workers write under OUT/_work/annotated/; the
  driver only counts rows and commits each raw shard once all of its samples are in.
Stage B (curation/decide.py, DuckDB out of core): global operators (dedup, top
  fraction), unrouted samples, tier shard cuts and the curate ledger, as SQL over the
  annotated parts with a memory limit; parallel tasks where an operator wants them.
Stage C (curation/tiers/build.py, Ray Data): each raw shard is read once, its picked
  samples' media are shuffled to their tier shards, and tier shards are written in
  parallel; then manifests, the ledger (every input exactly once), summary, _SUCCESS.

Driver and worker memory are bounded by configuration (batch, part and shard sizes,
the DuckDB memory limit), never by the number of samples. A SIGKILL at any point
followed by a re-run gives the same ledger and the same bytes in every tier shard as
an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import decide as stage_b
from .annotate import BINARY_COLUMNS, ClusterShrank, committed_parts, run_stage_a
from .config import PipelineConfig
from .errors import NO_SPACE_ERRNOS, ConfigError, CurationError, DiskFullError, InputError, curation_error_in
from .fsutil import atomic_write_text
from .publish import check_destination, destination, publish_run
from .inputs import InputOptions, RawInput, ShardRef, resolve_input
from .rawshards import count_samples

WORK = "_work"
# What a run writes to its sidecars and ledger, by version: 2 = typed list/struct/map/JSON
# columns and the ledger's fetched_at/http_status (1: JSON text). A run folder of another
# format is never resumed: its parts and ledgers would mix the two.
DATA_FORMAT = 2


def _check_run_identity(work: Path, cfg: PipelineConfig, raw: RawInput) -> None:
    """An output folder belongs to one recipe and one input. A finished run is never
    overwritten by another; an unfinished one (say, stopped by a recipe error found on
    real rows) is discarded when the recipe or input changed, so the fixed recipe can run
    on the same --out: its intermediate state is useless to another config anyway. The
    input is its shards' names and sizes (curation/inputs.py)."""
    identity = {"pipeline": cfg.name, "pipeline_path": str(Path(cfg.path).resolve()),
                "config_hash": cfg.config_hash, "input": raw.spec,
                # files operators read beyond their options (a concept list, reference sets)
                "op_input_files": cfg.op_input_files(),
                "crawl_ledgers": [str(p) for p in raw.crawl_ledgers],
                "raw_shards": {p.name: p.size for p in raw.shards},
                # how they are read: the same files read with other columns are another input
                "input_options": asdict(raw.options),
                # What plan and export read later (config.for_output): no file or module needed.
                "recipe": cfg.describe(), "data_format": DATA_FORMAT,
                # The run's first start (UTC); only here and in summary.json: tiers stay byte-identical.
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    marker = work / "run.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("data_format", 1) != DATA_FORMAT:
            raise ConfigError(f"{work.parent} holds a run written by another version of curation (data format "
                              f"{previous.get('data_format', 1)}, this one writes {DATA_FORMAT}: typed sidecar and ledger "
                              "columns); use a new --out folder")
        other_files = previous.get("op_input_files", {}) != identity["op_input_files"]
        other_config = previous.get("config_hash") != cfg.config_hash or other_files
        other_input = (previous.get("raw_shards") != identity["raw_shards"] or
                       previous.get("input_options", asdict(InputOptions(format="tar"))) != identity["input_options"])
        if not (other_config or other_input):
            return
        if (work.parent / "_SUCCESS").exists():
            if other_files and previous.get("config_hash") == cfg.config_hash:
                raise ConfigError(f"{work.parent} holds a finished run whose operators read other files (a concept "
                                  "list or reference sets changed since); use a new --out folder")
            if other_config:
                raise ConfigError(f"{work.parent} holds a finished run of another pipeline config (hash "
                                  f"{previous.get('config_hash')}, now {cfg.config_hash}); use a new --out folder")
            raise InputError(f"{work.parent} holds a finished run of other raw shards than {raw.spec}; use a new --out folder")
        print(f"curate: {work.parent} holds an unfinished run of another {'config' if other_config else 'input'}; "
              "starting over", file=sys.stderr)
        shutil.rmtree(work)
        shutil.rmtree(work.parent / "tiers", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(identity, indent=2) + "\n")


def count_all(shards: list[ShardRef], annotated: Path) -> dict[str, int]:
    """Samples per raw shard (what the ledger must account for): from the commit marker
    of a shard already annotated, else counted by parallel tasks (headers only; never
    raises: a bad shard is accounted for per sample)."""
    from .annotate import marker_path

    counts = {}
    todo = []
    for p in shards:
        marker = marker_path(annotated, p)
        if marker.exists():
            counts[p.name] = json.loads(marker.read_text())["rows"]
        else:
            todo.append(p)
    for p, n in zip(todo, ray_map_tasks(count_samples, [(p,) for p in todo], num_cpus=0.25)):
        counts[p.name] = n
    return counts


def ray_map_tasks(fn, args: list[tuple], num_cpus: float = 0.5) -> list:
    """DecideContext.map_tasks on the Ray cluster: one task per argument tuple."""
    import ray

    remote = ray.remote(num_cpus=num_cpus)(fn)
    return ray.get([remote.remote(*a) for a in args])


def on_a_worker(fn, *args, **kwargs):
    """Run `fn` as one Ray task and return its result. Stage B and the final ledger run
    this way so that DuckDB's working memory (up to `--memory-limit`, plus its spill)
    lives in a worker process that exits with the task, never in the driver; a worker
    lost mid-task is retried by Ray (the stage starts over from its inputs)."""
    import ray

    return ray.get(ray.remote(num_cpus=1, max_retries=2)(fn).remote(*args, **kwargs))


MAX_REPLANS = 3  # stage A started again after losing nodes, before giving up


def with_replans(attempt, restart, max_replans: int = MAX_REPLANS):
    """`attempt()`, started again (after `restart()`) each time it raises ClusterShrank:
    a lost node can leave a pool's restarted actors waiting forever for CPU that the
    other pools hold, so stage A is planned again for what remains. Committed raw shards
    are kept, so each attempt does only what is left."""
    for n in range(max_replans + 1):
        try:
            return attempt()
        except ClusterShrank as exc:
            if n == max_replans:
                raise CurationError(f"stage A: {exc}; gave up after {max_replans} new plans (re-run to resume)") from None
            print(f"stage A: {exc}; planning it again for the nodes that remain (committed shards are kept)",
                  file=sys.stderr, flush=True)
            restart()


def _restart_ray(address: str | None) -> None:
    """Disconnect (the job's actors and tasks end with it) and connect again as a new job."""
    import ray

    from .runtime.ray_env import start_ray

    ray.shutdown()
    start_ray(address)


def run_pipeline(cfg: PipelineConfig, raw_input: str | Path, out: str | Path, ray_address: str | None = None,
                 memory_limit: str = stage_b.DEFAULT_MEMORY_LIMIT, input_options: InputOptions | None = None,
                 stage_dir: str | Path | None = None) -> dict:
    """Run (or resume) the curation job over `raw_input` (a folder, glob, brace pattern or
    s3:// url of raw shards, HF parquet, a save_to_disk folder or a folder of media, read
    as `input_options` says: curation/inputs.py); returns the summary also written to
    summary.json.
    An error the user can act on (a recipe bug found on real rows, a full disk), even one
    raised inside a Ray task, surfaces as one CurationError.

    `out` is a local folder, or s3://bucket/prefix: then the job works in a local stage
    folder (`stage_dir`, default under ~/.cache) and uploads what a user reads when it
    is done, on every call, so a re-run also finishes an interrupted upload
    (curation/publish.py)."""
    dest = destination(out, stage_dir, ray_address)
    out = dest.local
    try:
        summary = _run(cfg, str(raw_input), Path(out), ray_address, memory_limit, input_options, remote=dest.url)
        if dest.url is not None:
            publish_run(dest.local, dest.url)
        return summary
    except CurationError:
        raise
    except Exception as exc:
        err = curation_error_in(exc)
        if err is not None:
            raise type(err)(str(err)) from None
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS or "No space left" in str(exc):
            raise DiskFullError(f"no space left under {out} ({str(exc).splitlines()[0][:200]}); "
                                "free space, then run the same command again to resume") from None
        raise


def _run(cfg: PipelineConfig, raw_input: str, out: Path, ray_address: str | None, memory_limit: str,
         input_options: InputOptions | None = None, remote: str | None = None) -> dict:
    from .runtime.ray_env import start_ray

    t0 = time.time()
    raw = resolve_input(raw_input, input_options)
    shards = list(raw.shards)
    work = out / WORK
    _check_run_identity(work, cfg, raw)
    if remote is not None:  # before any work: the prefix answers and holds no other finished run
        check_destination(remote, work / "run.json")
    if (out / "_SUCCESS").exists():
        return json.loads((out / "summary.json").read_text())
    start_ray(ray_address)
    t_start = time.time()
    annotated = work / "annotated"
    counts = count_all(shards, annotated)
    n_raw = sum(counts.values())
    if not n_raw:
        raise InputError(f"the raw shards of {raw.spec} hold no samples")
    raw_read_a = with_replans(lambda: run_stage_a(cfg, shards, counts, annotated, source=raw.source),
                              lambda: _restart_ray(ray_address))
    t_a = time.time()
    parts = {p.name: committed_parts(annotated, p) for p in shards}
    decision = stage_b.load_decision(work / "decide")
    if decision is None:
        files = [f for p in shards for f in parts[p.name]]
        decision = on_a_worker(stage_b.decide, cfg, files, [p.name for p in shards], work, binary_columns=BINARY_COLUMNS,
                               memory_limit=memory_limit, map_tasks=ray_map_tasks)
    stage_b.check_accounting(decision.counts, n_raw)
    t_b = time.time()
    from .tiers.build import build_tiers

    manifests, raw_read_c = build_tiers(cfg, decision, shards, parts, out, work, source=raw.source)
    t_c = time.time()
    n_ledger = on_a_worker(stage_b.finalize_ledger, decision.ledger, list(raw.crawl_ledgers),
                           out / "ledger.parquet", memory_limit=memory_limit)
    t_end = time.time()

    summary = {
        "pipeline": cfg.name,
        "started_at": json.loads((work / "run.json").read_text()).get("started_at"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": cfg.config_hash,
        "raw_samples": n_raw,
        "raw_bytes": sum(max(p.size, 0) for p in shards),
        "curate": decision.counts,
        **({"derived": decision.derived} if decision.derived else {}),  # video clips, by status (not inputs)
        "ledger_rows": n_ledger,
        "by_stage_status_reason": stage_b.summary_rows([out / "ledger.parquet"]),
        "tiers": {t: {"samples": m["num_samples"], "shards": len(m["shards"]), "bytes": m["num_bytes"]} for t, m in manifests.items()},
        # Per stage of this invocation (a resumed run shows only the work it redid).
        "stages": {
            "annotate": {"seconds": round(t_a - t_start, 2), "samples": n_raw, "raw_bytes_read": raw_read_a},
            "decide": {"seconds": round(t_b - t_a, 2), "samples": n_raw},
            "write": {"seconds": round(t_c - t_b, 2), "samples": sum(m["num_samples"] for m in manifests.values()),
                      "raw_bytes_read": raw_read_c},
            "ledger": {"seconds": round(t_end - t_c, 2), "samples": n_ledger},
        },
        "startup_seconds": round(t_start - t0, 2),
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "_SUCCESS", "")
    return summary
