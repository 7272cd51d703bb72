"""Every benchmark in one command and one table: each row is ours against a plain
baseline measured in the same run, on the same inputs.

    python bench/run_all.py [--quick] [--work DIR] [--markdown FILE] [--json FILE]
                            [--scale-json FILE] [--only crawl,clip,...] [--set NAME=VALUE ...]

Rows (`--only` takes their names):
  crawl    `curate crawl` vs img2dataset alone, same url list from a 127.0.0.1 server (bench_crawl)
  clip     the clip_score operator in stage A vs a plain open_clip loop, same images (bench_models)
  ocr      the ocr operator in stage A vs a plain rapidocr loop, same images (bench_models)
  tiers    the tier writer (write_shard: tar + sidecar + fsync + hash) vs the same member bytes
           written with plain `tarfile`
  catalog  three queries through curation.catalog (what `curate query` runs: views over every
           sidecar, locked down) vs DuckDB on the same Parquet directly, over synthetic sidecars
  trainer  the trainer's data loader vs the model's optimizer step (bench_trainer), on the
           tier shards the tiers row wrote (or --trainer-plan)
  scale    issue 10's floors from a bench_scale results file (--scale-json), else one
           bench_scale run at one size

Inputs are cached under --work (the demo corpus, our crawl's raw shards, the synthetic
sidecars), so a second run skips building them. Progress goes to stderr, the table to
stdout. Sizes: the defaults take about 10-15 minutes on 2 quiet cores; --quick is a
smoke run of about 2 minutes; `--set catalog_rows=100000,1000000` overrides one size
(names: the fields of `Sizes`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the other bench scripts, imported as modules

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROWS = ("crawl", "clip", "ocr", "tiers", "catalog", "trainer", "scale")


@dataclass
class Sizes:
    crawl_urls: int = 3000
    crawl_reps: int = 3
    clip_images: int = 480
    ocr_images: int = 480
    tier_samples: int = 10_000
    tier_shard_samples: int = 1000
    tier_reps: int = 3
    catalog_rows: tuple[int, ...] = (1_000_000, 10_000_000)
    catalog_file_rows: int = 10_000  # rows per sidecar file, as a tier shard of that many samples has
    catalog_reps: int = 3
    trainer_batches: int = 20
    trainer_batch_size: int = 16
    scale_size: int = 10_000  # only without --scale-json


QUICK = Sizes(crawl_urls=300, crawl_reps=1, clip_images=48, ocr_images=24, tier_samples=2000, tier_shard_samples=500,
              tier_reps=1, catalog_rows=(100_000, 1_000_000), catalog_reps=1, trainer_batches=3, scale_size=2000)


@dataclass
class Row:
    what: str
    ours: float | None = None
    baseline: float | None = None
    units: str = ""
    note: str = ""  # which way is better, a floor and its verdict, what differs between the sides
    error: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline


@dataclass
class Context:
    work: Path
    sizes: Sizes
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = None
    trainer_plan: Path | None = None
    trainer_stage: str | None = None
    trainer_arch: str = "llava"
    scale_json: Path | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ crawl
def _corpus_stamp(ctx: Context) -> str:
    """The demo corpus's build record (built here if missing): a crawl of another build is stale."""
    from curation.demo import corpus

    return json.dumps(corpus.build(ctx.work / "corpus"), sort_keys=True)


def crawled_raw(ctx: Context) -> Path:
    """Our crawl of the demo corpus's first crawl_urls urls (raw shards), kept by the crawl
    row; crawled once here when that row has not run."""
    import bench_crawl

    raw, stamp = ctx.work / f"crawl-{ctx.sizes.crawl_urls}", _corpus_stamp(ctx)
    if not (raw / "_DONE").exists() or (raw / "_DONE").read_text() != stamp:
        bench_crawl.measure(ctx.work / "corpus", ctx.sizes.crawl_urls, 1, keep=raw)
        (raw / "_DONE").write_text(stamp)
    return raw


def row_crawl(ctx: Context) -> list[Row]:
    import bench_crawl

    raw, stamp = ctx.work / f"crawl-{ctx.sizes.crawl_urls}", _corpus_stamp(ctx)
    r = bench_crawl.measure(ctx.work / "corpus", ctx.sizes.crawl_urls, ctx.sizes.crawl_reps, keep=raw)
    (raw / "_DONE").write_text(stamp)
    return [Row(f"crawl: `curate crawl` vs img2dataset alone, {r['urls']:,} urls from 127.0.0.1 "
                f"(median of {ctx.sizes.crawl_reps}, alternating)",
                r["curate_crawl_urls_per_s_median"], r["img2dataset_urls_per_s_median"], "urls/s",
                "higher is better; ours adds the fetch policy, rounds and the ledger", details=r)]


# ------------------------------------------------------------------ model operators
def model_inputs(ctx: Context, n: int) -> list[Path]:
    """One raw shard of n image_text samples spread evenly over our crawl (the demo corpus
    is shuffled: scenes, mismatches and text signs alike), members as crawled."""
    from curation.rawshards import iter_samples, list_raw_shards
    from curation.wds import tar_bytes

    samples = [(key, files) for path in list_raw_shards(crawled_raw(ctx)) if path.name.startswith("image_text")
               for key, files in iter_samples(path)]
    picked = samples[::max(1, len(samples) // n)][:n]
    shard = ctx.work / "model-inputs" / f"n{n}" / "image_text-000000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(tar_bytes((key, sorted(files.items())) for key, files in picked))
    return [shard]


def _model_row(ctx: Context, name: str, n: int) -> Row:
    import bench_models

    from curation.runtime.ray_env import start_ray

    shards = model_inputs(ctx, n)
    start_ray()  # not timed: a cluster is already up when a user runs the pipeline
    r = bench_models.measure(name, shards, ctx.clip_model, ctx.clip_pretrained)
    what = (f"CLIP scoring ({ctx.clip_model}{'/' + ctx.clip_pretrained if ctx.clip_pretrained else ', random weights'}):"
            f" stage A (decode_image + clip_score) vs a plain open_clip loop, {r['images']} images"
            if name == "clip" else
            f"OCR (rapidocr PP-OCR det+rec): stage A (decode_image + ocr) vs a plain rapidocr loop, {r['images']} images")
    return Row(what, r["pipeline_images_per_s"], r["plain_images_per_s"], "images/s",
               "higher is better; the pipeline's time includes its actors' start and model loading", details=r)


def row_clip(ctx: Context) -> list[Row]:
    return [_model_row(ctx, "clip", ctx.sizes.clip_images)]


def row_ocr(ctx: Context) -> list[Row]:
    return [_model_row(ctx, "ocr", ctx.sizes.ocr_images)]


# ------------------------------------------------------------------ tier writing
TIER = "bench"


def tier_inputs(ctx: Context) -> list[tuple[list[dict], list[list[tuple[str, bytes]]]]]:
    """Per tier shard: kept sidecar rows and their media, from bench_scale's synthetic
    samples (what stage C has in hand when it writes; the corrupt and tiny ones, which a
    run drops, left out)."""
    import bench_scale
    from PIL import Image

    from curation.tiers.writer import tier_media

    s = ctx.sizes
    rows, media = [], []
    g = 0
    while len(rows) < s.tier_samples:
        key, members = bench_scale.make_sample(0, g)
        g += 1
        files = dict(members)
        meta = json.loads(files["json"])
        if meta["planted"] in ("corrupt", "tiny"):
            continue
        width, height = Image.open(io.BytesIO(files["jpg"])).size
        shard = f"{TIER}-{len(rows) // s.tier_shard_samples:06d}.tar"
        row = {"uid": meta["uid"], "key": meta["uid"], "kind": "image_text", "source": meta["source"], "url": meta["url"],
               "status": "kept", "tier": TIER, "shard": shard, "sha256": hashlib.sha256(files["jpg"]).hexdigest(),
               "width": width, "height": height, "pipeline": "bench", "config_hash": "0123456789abcdef",
               "op_versions": {"decode_image": "1"}, "text": meta["caption"], "media": ["jpg"],
               "clip_score": round(0.2 + (g % 97) / 500, 4), "language": "en"}
        media.append(tier_media(row, {"jpg": files["jpg"]}))
        rows.append(row)
    step = s.tier_shard_samples
    return [(rows[i:i + step], media[i:i + step]) for i in range(0, len(rows), step)]


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def plain_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """The baseline: what a user writes with the standard library."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def tier_run_root(ctx: Context) -> Path:
    return ctx.work / f"tiers-{ctx.sizes.tier_samples}" / "ours"


def row_tiers(ctx: Context) -> list[Row]:
    from curation.tiers.writer import write_shard

    shards = tier_inputs(ctx)
    n = sum(len(r) for r, _ in shards)
    base = ctx.work / f"tiers-{ctx.sizes.tier_samples}"
    ours_dir, plain_dir = tier_run_root(ctx) / "tiers" / TIER, base / "plain"
    shutil.rmtree(base, ignore_errors=True)

    def write_ours() -> float:
        ours_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        for rows, media in shards:
            write_shard(ours_dir / rows[0]["shard"], rows, media)
        return time.perf_counter() - t

    write_ours()  # warm-up; its tars give the member bytes the baseline writes
    expected = {rows[0]["shard"]: _tar_members(ours_dir / rows[0]["shard"]) for rows, _ in shards}
    tar_bytes_total = sum(len(d) for members in expected.values() for _, d in members)

    def write_plain() -> float:
        shutil.rmtree(plain_dir, ignore_errors=True)
        plain_dir.mkdir(parents=True)
        t = time.perf_counter()
        for name, members in expected.items():
            plain_tar(plain_dir / name, members)
        return time.perf_counter() - t

    ours_s, plain_s = [], []
    for _ in range(ctx.sizes.tier_reps):  # alternate: neither side always follows the other
        plain_s.append(write_plain())
        ours_s.append(write_ours())
    for name, members in expected.items():  # the same bytes, member by member
        if _tar_members(plain_dir / name) != members:
            raise AssertionError(f"plain tar {name} differs from the tier writer's members")
    ours, plain = statistics.median(ours_s), statistics.median(plain_s)
    return [Row(f"tier writing: write_shard vs plain `tarfile`, {n:,} samples in {len(shards)} shards, same member "
                f"bytes ({tar_bytes_total / 1e6:,.0f} MB; median of {ctx.sizes.tier_reps})",
                n / ours, n / plain, "samples/s",
                "higher is better; ours also writes the Parquet sidecar, fsyncs and hashes each tar",
                details={"ours_s": ours_s, "plain_s": plain_s, "samples": n, "member_bytes": tar_bytes_total})]


# ------------------------------------------------------------------ catalog
CATALOG_VERSION = "1"
# File j is in CATALOG_TIERS[j % 10]: 6:3:1, interleaved so that a small size has every tier.
CATALOG_TIERS = ["alignment", "captioned_detail", "alignment", "ocr_rich", "alignment", "captioned_detail", "alignment",
                 "alignment", "captioned_detail", "alignment"]
QUERIES = {
    "count per tier": "SELECT tier, count(*) AS n, avg(clip_score) AS mean_clip FROM samples GROUP BY tier ORDER BY tier",
    "top 100 filtered": "SELECT uid, clip_score FROM samples WHERE language = 'en' AND width >= 512 "
                        "ORDER BY clip_score DESC, uid LIMIT 100",
    "caption search": "SELECT count(*) AS n FROM samples WHERE text LIKE '%red dog%' AND ocr_text <> ''",
}
_WORDS = ("a the red green blue small large old new wooden metal cat dog bird tree house car boat chair lamp "
          "window door flower cloud river street beach city garden bridge tower road forest lake sky").split()


def _sidecar_sql(first: int, count: int, tier: str, shard: str) -> str:
    """Sidecar rows first..first+count with the contract's types, values from hash(i)
    (deterministic, no Python per row)."""
    words = "[" + ", ".join(f"'{w}'" for w in _WORDS) + "]"

    def pick(options: str, n: int, salt: int) -> str:  # hash() is UBIGINT; list indexes are BIGINT
        return f"{options}[1 + (hash(i, {salt}) % {n})::BIGINT]"

    k = len(_WORDS)
    return f"""
        SELECT printf('%016x', hash(i)) AS uid, 'image_text' AS kind, 'bench' AS source,
               concat_ws(' ', {pick(words, k, 1)}, {pick(words, k, 2)}, {pick(words, k, 3)}, {pick(words, k, 4)}) AS text,
               CAST(64 + hash(i, 5) % 1985 AS BIGINT) AS width, CAST(64 + hash(i, 6) % 1985 AS BIGINT) AS height,
               'jpeg' AS image_format, 'kept' AS status, '{tier}' AS tier, '{shard}' AS shard,
               printf('%016x', hash(i)) AS key, 'bench' AS pipeline, '0123456789abcdef' AS config_hash,
               0.15 + (hash(i, 7) % 10000) / 40000.0 AS clip_score,
               CASE WHEN hash(i, 8) % 5 = 0 THEN 'SALE ' || (hash(i, 9) % 90 + 10) || '%' ELSE '' END AS ocr_text,
               {pick("['en', 'en', 'en', 'en', 'en', 'en', 'de', 'fr', 'es', 'ja']", 10, 10)} AS language,
               (hash(i, 11) % 1000) / 20000.0 AS nsfw
        FROM range({first}, {first + count}) AS r(i)"""


def _quiet_duckdb():
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # the generation is not what is measured
    return con


def catalog_pool(ctx: Context) -> tuple[Path, list[tuple[str, Path, int]]]:
    """Sidecar files for the largest size, generated once by DuckDB into WORK/catalog/pool
    (a size's run links the first files). Returns the pool and (tier, file, rows) in order."""
    s = ctx.sizes
    pool = ctx.work / "catalog" / "pool"
    params = {"version": CATALOG_VERSION, "file_rows": s.catalog_file_rows}
    stamp = pool / "params.json"
    if stamp.exists() and json.loads(stamp.read_text()) != params:
        shutil.rmtree(pool.parent)  # the runs' links too: they point at the old files
    pool.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(params))
    biggest = max(s.catalog_rows)
    files, per_tier = [], {t: 0 for t in CATALOG_TIERS}
    for j, first in enumerate(range(0, biggest, s.catalog_file_rows)):
        tier = CATALOG_TIERS[j % len(CATALOG_TIERS)]
        name = f"{tier}-{per_tier[tier]:06d}"
        per_tier[tier] += 1
        files.append((tier, pool / tier / f"{name}.parquet", min(s.catalog_file_rows, biggest - first), first, name))
    todo = [f for f in files if not f[1].exists()]
    if todo:
        log(f"  catalog: generating {sum(f[2] for f in todo):,} sidecar rows in {len(todo)} files...")
        con = _quiet_duckdb()
        for tier, path, count, first, name in todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            con.execute(f"COPY ({_sidecar_sql(first, count, tier, name + '.tar')}) TO '{tmp}' "
                        "(FORMAT parquet, COMPRESSION zstd)")
            os.replace(tmp, path)
        con.close()
    return pool, [(tier, path, count) for tier, path, count, _, _ in files]


def catalog_run(ctx: Context, rows: int) -> Path:
    """A run root of `rows` sidecar rows: hard links to the pool's first files, and a
    ledger of the same samples (every one kept)."""
    pool, files = catalog_pool(ctx)
    root = ctx.work / "catalog" / f"rows-{rows}"
    if (root / "ledger.parquet").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    total, linked = 0, []
    for tier, path, count in files:
        if total >= rows:
            break
        target = root / "tiers" / tier / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        linked.append(target)
        total += count
    con = _quiet_duckdb()
    tmp = root / "ledger.tmp"
    con.execute(f"COPY (SELECT uid, source, 'curate' AS stage, status, NULL::VARCHAR AS reason, tier, shard "
                f"FROM read_parquet('{root}/tiers/*/*.parquet')) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd)")
    con.close()
    os.replace(tmp, root / "ledger.parquet")
    return root


def _timed(fn) -> tuple[list, float]:
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def _comparable(rows: list[tuple]) -> list[tuple]:
    """Floats to 9 digits: a parallel sum's last bits depend on the order threads finish in."""
    return [tuple(float(f"{v:.9g}") if isinstance(v, float) else v for v in row) for row in rows]


def row_catalog(ctx: Context) -> list[Row]:
    import duckdb

    from curation.catalog import query

    out = []
    for rows in sorted(ctx.sizes.catalog_rows):
        root = catalog_run(ctx, rows)
        direct = f"read_parquet('{root}/tiers/*/*.parquet')"
        ours_total = plain_total = 0.0
        per_query = {}
        for name, sql in QUERIES.items():
            ours_s, plain_s = [], []
            for _ in range(ctx.sizes.catalog_reps):  # alternate; each side opens a fresh connection every time
                ours, t = _timed(lambda: query(sql, root).fetchall())
                ours_s.append(t)
                plain, t = _timed(lambda: duckdb.connect().sql(sql.replace("FROM samples", f"FROM {direct}")).fetchall())
                plain_s.append(t)
                if _comparable(ours) != _comparable(plain):
                    raise AssertionError(f"query {name!r}: the catalog and plain DuckDB disagree")
            per_query[name] = {"ours_s": ours_s, "plain_s": plain_s, "result_rows": len(ours)}
            ours_total += statistics.median(ours_s)
            plain_total += statistics.median(plain_s)
        files = sum(1 for _ in (root / "tiers").glob("*/*.parquet"))
        out.append(Row(f"catalog: {len(QUERIES)} queries through curation.catalog (`curate query`) vs DuckDB on the "
                       f"same Parquet, {rows:,} sidecar rows in {files:,} files (sum of medians of "
                       f"{ctx.sizes.catalog_reps})",
                       ours_total, plain_total, "s",
                       "lower is better; ours also builds the views (ledger, shards) and locks the connection down",
                       details={"rows": rows, "files": files, "queries": per_query}))
    return out


# ------------------------------------------------------------------ trainer
def tier_plan(ctx: Context) -> Path:
    """A one-stage training plan over the tiers row's shards (written here if that row has
    not run): single images with captions."""
    root = tier_run_root(ctx)
    tier_dir = root / "tiers" / TIER
    if not any(tier_dir.glob("*.parquet")):
        from curation.tiers.writer import write_shard

        tier_dir.mkdir(parents=True, exist_ok=True)
        for rows, media in tier_inputs(ctx):
            write_shard(tier_dir / rows[0]["shard"], rows, media)
    import pyarrow.parquet as pq

    shards = {p.with_suffix(".tar").name: None for p in sorted(tier_dir.glob("*.parquet"))}
    samples = sum(pq.ParquetFile(tier_dir / n.replace(".tar", ".parquet")).metadata.num_rows for n in shards)
    plan = {"root": str(root), "stages": [{"name": "bench", "mix": [{"tier": TIER, "samples": samples, "shards": shards}]}]}
    path = root / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def row_trainer(ctx: Context) -> list[Row]:
    import bench_trainer

    if ctx.trainer_plan:
        plan, stage, where = ctx.trainer_plan, ctx.trainer_stage or "stage2_onevision", str(ctx.trainer_plan)
    else:
        plan, stage, where = tier_plan(ctx), "bench", "the tiers row's shards (single images)"
    s = ctx.sizes
    r = bench_trainer.measure(plan, arch=ctx.trainer_arch, stage_name=stage, batch_size=s.trainer_batch_size,
                              batches=s.trainer_batches)
    return [Row(f"trainer: data loader alone vs model step alone ({r['arch']}/{r['size']}, batch {r['batch_size']}, "
                f"{r['workers']} loader worker, {r['threads']} compute thread, {r['batches']} batches; {where})",
                r["loader_samples_per_s"], r["model_samples_per_s"], "samples/s",
                f"> 1: the loader keeps up; the real loop waited for data {100 * r['waiting_share']:.1f}% of the time",
                details=r)]


# ------------------------------------------------------------------ scale
def row_scale(ctx: Context) -> list[Row]:
    import bench_scale

    if ctx.scale_json:
        results = json.loads(Path(ctx.scale_json).read_text())
        rows, source = results["rows"], Path(ctx.scale_json).name
        reference = int(results.get("args", {}).get("reference", 10_000))
    else:
        n = ctx.sizes.scale_size
        args = bench_scale.parse_args(["--sizes", str(n), "--reference", str(n), "--work", str(ctx.work / "scale"),
                                       "--json", str(ctx.work / "scale" / f"results-{n}.json")])
        rows, path = bench_scale.measure(args)
        source, reference = f"one run at {n:,}", n
    out = []
    for check in bench_scale.floor_checks(rows, reference):
        note = f"{check['verdict']}: floor {check['floor']}" if check["floor"] else f"{check['verdict']}: {check['result']}"
        out.append(Row(f"scale ({source}): {check['what']}", check["ours"], check["baseline"], check["units"], note,
                       details=check))
    return out


# ------------------------------------------------------------------ the table
ROW_FUNCTIONS = {"crawl": row_crawl, "clip": row_clip, "ocr": row_ocr, "tiers": row_tiers, "catalog": row_catalog,
                 "trainer": row_trainer, "scale": row_scale}


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def markdown(rows: list[Row]) -> str:
    def cell(text: str) -> str:  # an error message may hold a pipe or a newline
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| what | ours | baseline | ratio (ours / baseline) | units | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {cell(r.what)} | failed | | | | {cell(r.error)} |")
            continue
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {cell(r.what)} | {_num(r.ours)} | {_num(r.baseline)} | {ratio} | {r.units} | {cell(r.note)} |")
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr():
    """What the rows print (img2dataset's progress, its worker processes' included) goes
    to stderr, at the file-descriptor level: stdout carries the table only."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(names: list[str], ctx: Context) -> list[Row]:
    """The rows asked for, in ROWS order; a row that fails is reported as failed and the
    others still run."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in [n for n in ROWS if n in names]:
        log(f"[{name}] running...")
        t = time.perf_counter()
        try:
            with stdout_to_stderr():
                got = ROW_FUNCTIONS[name](ctx)
        except Exception as exc:  # one broken row must not cost the others
            log(traceback.format_exc())
            got = [Row(f"{name}", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])]
        for r in got:
            ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
            log(f"[{name}] {r.what}: " + (f"FAILED {r.error}" if r.error else
                                          f"ours {_num(r.ours)} vs {_num(r.baseline)} {r.units} = {ratio}"))
        log(f"[{name}] done in {time.perf_counter() - t:.0f} s")
        rows.extend(got)
        if name == "ocr" or (name == "clip" and "ocr" not in names):
            _stop_ray()
    return rows


def _stop_ray() -> None:
    """The model rows' local Ray, stopped before the rows that start their own."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def parse_sizes(quick: bool, overrides: list[str]) -> Sizes:
    sizes = dataclasses.replace(QUICK) if quick else Sizes()
    types = {f.name: f.type for f in dataclasses.fields(Sizes)}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        parsed = tuple(int(v) for v in value.split(",")) if "tuple" in str(types[name]) else int(value)
        setattr(sizes, name, parsed)
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 2 minutes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_all"), help="cached inputs and outputs")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run, comma-separated: {','.join(ROWS)}")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one size")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--json", type=Path, help="also write every row with its details here")
    ap.add_argument("--scale-json", type=Path, help="a bench_scale results file (its --json) for the scale rows")
    ap.add_argument("--clip-model", default="ViT-B-32",
                    help="open_clip name or local folder; without --clip-pretrained, random weights (no download)")
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--trainer-plan", type=Path, help="a `curate plan` plan.json instead of the tiers row's shards")
    ap.add_argument("--trainer-stage", default=None)
    ap.add_argument("--trainer-arch", default="llava")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    ctx = Context(args.work.resolve(), parse_sizes(args.quick, args.set), args.clip_model, args.clip_pretrained,
                  args.trainer_plan, args.trainer_stage, args.trainer_arch, args.scale_json)
    t = time.perf_counter()
    rows = run(names, ctx)
    table = markdown(rows)
    print(table)
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {os.cpu_count()} CPUs in "
              f"{time.perf_counter() - t:.0f} s: `python bench/run_all.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "sizes": dataclasses.asdict(ctx.sizes),
                                         "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]},
                                        indent=2, default=str) + "\n")
    log(header)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
