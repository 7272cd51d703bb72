"""How long does `curate report` take on a big run, against DuckDB merely counting it?

Writes a synthetic run output (no Ray, no models): ROWS ledger rows, 70% of them kept in
four tiers (image_text, detail captions, documents, video) as real Parquet sidecars with
manifests and real tier tars, the rest dropped or failed under a dozen reasons with their
raw shards still at hand (so thumbnails are read from tier tars and raw shards), a
recorded recipe with training stages (no plan.json: the token bill is computed), a
summary.json and a trainer's loss.jsonl. Then times, in one process:

  baseline  SELECT count(*) over the ledger and the sidecars, through the same catalog
  report    write_report(...) end to end: every plot, the bill, thumbnails, the HTML

    .venv/bin/python bench/bench_report.py --rows 1000000 --work /tmp/bench_report
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

os.environ.setdefault("CURATION_MODELS", "/nonexistent-curation-models")

from curation import config, schemas  # noqa: E402
from curation.catalog import connect  # noqa: E402
from curation.report import write_report  # noqa: E402

PER_SHARD = 4000
REASONS = [("dropped", "duplicate_exact", 0.06), ("dropped", "duplicate_near", 0.05), ("dropped", "clip_score_low", 0.08),
           ("dropped", "too_small", 0.02), ("dropped", "caption_too_short", 0.03), ("dropped", "language", 0.02),
           ("dropped", "nsfw", 0.005), ("failed", "decode_error", 0.01), ("failed", "truncated_member", 0.002),
           ("dropped", "unrouted", 0.003)]
CRAWL = [("failed", "http_404", 0.02), ("dropped", "opt_out", 0.003)]
TIERS = [("alignment", "image_text", 0.55), ("captioned_detail", "image_text", 0.3), ("documents", "interleaved", 0.1),
         ("video", "video", 0.05)]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((24, 16)).save(buf, format="JPEG", quality=60)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> int:
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return path.stat().st_size


def _table(kind: str, columns: dict[str, object], n: int) -> pa.Table:
    """A contract-typed table: the given columns, nulls for every other one."""
    schema = schemas.arrow_schema(kind)
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        textual = pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_dictionary(field.type)
        if value is not None and not textual and any(isinstance(v, str) for v in value[:1]):
            value = None  # a column stored as JSON text elsewhere, typed here (list/struct/map): left null
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def build(root: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out, raw = root / "out", root / "raw"
    for d in (out, raw):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    uids = np.array([f"{i:016x}" for i in rng.permutation(rows)], dtype=object)
    # Outcome of each input: crawl failures, then curate drops and failures, else kept.
    outcome = np.full(rows, -1)
    labels = CRAWL + REASONS
    draw = rng.random(rows)
    edge = 0.0
    for i, (_, _, share) in enumerate(labels):
        outcome[(draw >= edge) & (draw < edge + share)] = i
        edge += share
    kept = outcome < 0
    crawled = ~np.isin(outcome, list(range(len(CRAWL))))
    # Raw shards hold every crawled input, in input order.
    raw_idx = np.cumsum(crawled) - 1
    names = np.array([f"image_text-r000-{i // PER_SHARD:05d}.tar" for i in range(rows)], dtype=object)
    raw_shard = np.where(crawled, names[raw_idx.clip(0)], None)
    raw_key = np.where(crawled, np.array([f"{i:09d}" for i in range(rows)], dtype=object)[raw_idx.clip(0)], None)
    jpg = [_jpeg(s) for s in range(16)]
    sizes = {}
    for name in sorted(set(raw_shard[crawled])):
        idx = np.flatnonzero(raw_shard == name)
        members = [(f"{raw_key[i]}.jpg", jpg[i % 16]) for i in idx] + [(f"{raw_key[i]}.txt", b"a red circle") for i in idx]
        members.sort(key=lambda m: m[0])
        sizes[name] = _write_tar(raw / name, members)

    # Tiers: kept samples, tier by share, shards of PER_SHARD.
    kept_idx = np.flatnonzero(kept)
    tier_of = rng.choice(len(TIERS), size=len(kept_idx), p=[t[2] for t in TIERS])
    tier_col = np.full(rows, None, dtype=object)
    shard_col = np.full(rows, None, dtype=object)
    manifests = {}
    for t, (tier, kind, _) in enumerate(TIERS):
        members_idx = kept_idx[tier_of == t]
        folder = out / "tiers" / tier
        folder.mkdir(parents=True)
        entries = []
        for s, start in enumerate(range(0, len(members_idx), PER_SHARD)):
            idx = members_idx[start:start + PER_SHARD]
            n = len(idx)
            name = f"{tier}-{s:06d}.tar"
            tier_col[idx], shard_col[idx] = tier, name
            ext = {"image_text": "jpg", "interleaved": "0.jpg", "video": "jpg"}[kind]
            size = _write_tar(folder / name, [(f"{uids[i]}.{ext}", jpg[i % 16]) for i in idx])
            w = rng.integers(64, 2048, n)
            h = (w / np.exp(rng.normal(0, 0.35, n))).astype(int).clip(16, 4096)
            words = rng.integers(2, 40, n)
            text = [" ".join(["word"] * k) for k in words]
            cols = {"uid": uids[idx].tolist(), "kind": [kind] * n, "source": ["bench"] * n, "url": [None] * n,
                    "text": text, "width": w.tolist(), "height": h.tolist(), "image_format": ["jpeg"] * n,
                    "num_bytes": [len(jpg[0])] * n, "sha256": ["0" * 64] * n, "phash": ["00ff00ff00ff00ff"] * n,
                    "status": ["kept"] * n, "tier": [tier] * n, "shard": [name] * n, "key": uids[idx].tolist(),
                    "pipeline": ["demo"] * n, "config_hash": ["bench"] * n, "op_versions": ["{}"] * n,
                    "clip_score": rng.normal(0.3, 0.04, n).tolist(), "clip_model": ["bench"] * n,
                    "ocr_text": [("SALE 50%" if r < 0.2 else "") for r in rng.random(n)],
                    "language": rng.choice(["en", "de", "fr", "es", "ja"], n, p=[0.7, 0.1, 0.1, 0.05, 0.05]).tolist(),
                    "nsfw": rng.beta(1, 30, n).tolist()}
            if kind == "interleaved":
                cols["num_images"] = rng.integers(2, 6, n).tolist()
            if kind == "video":
                cols["duration"], cols["num_frames"] = rng.uniform(1, 30, n).tolist(), rng.integers(24, 700, n).tolist()
            cols["source_meta"] = [json.dumps({"qa": [{"q": "what colour?", "a": "red"}]}) if r < 0.3 else None
                                       for r in rng.random(n)]
            pq.write_table(_table("sidecar", cols, n), folder / f"{tier}-{s:06d}.parquet")
            entries.append({"name": name, "samples": n, "bytes": size, "sha256": "0" * 64})
        manifests[tier] = {"tier": tier, "pipeline": "demo", "config_hash": "bench", "num_samples": len(members_idx),
                           "num_bytes": sum(e["bytes"] for e in entries), "shards": entries}
        (folder / "manifest.json").write_text(json.dumps(manifests[tier]))

    status = np.array(["kept"] * rows, dtype=object)
    reason = np.full(rows, None, dtype=object)
    for i, (st, rs, _) in enumerate(labels):
        status[outcome == i], reason[outcome == i] = st, rs
    clip = np.where(crawled & (status != "failed"), rng.normal(0.28, 0.05, rows), np.nan)
    clip[outcome == len(CRAWL) + 2] = rng.uniform(0.1, 0.22, int((outcome == len(CRAWL) + 2).sum()))
    ledger = {"uid": uids.tolist(), "source": ["bench"] * rows, "url": [f"http://example.com/{i}.jpg" for i in range(rows)],
              "stage": np.where(crawled, "curate", "crawl").tolist(), "status": status.tolist(), "reason": reason.tolist(),
              "error": [("corrupt" if s == "failed" else None) for s in status],
              "clip_score": [None if np.isnan(c) else float(c) for c in clip], "tier": tier_col.tolist(),
              "shard": shard_col.tolist(), "raw_shard": raw_shard.tolist(), "raw_key": raw_key.tolist()}
    pq.write_table(_table("ledger", ledger, rows), out / "ledger.parquet")

    cfg = config.load("demo")
    (out / "_work").mkdir()
    (out / "_work" / "run.json").write_text(json.dumps({"pipeline": "demo", "config_hash": "bench", "input": str(raw),
                                                        "raw_shards": sizes, "recipe": cfg.describe()}))
    (out / "summary.json").write_text(json.dumps({
        "pipeline": "demo", "config_hash": "bench", "raw_samples": int(crawled.sum()), "ledger_rows": rows, "seconds": 900.0,
        "startup_seconds": 12.0,
        "stages": {"annotate": {"seconds": 600.0, "samples": int(crawled.sum()), "raw_bytes_read": 6e9},
                   "decide": {"seconds": 90.0, "samples": int(crawled.sum())},
                   "write": {"seconds": 150.0, "samples": int(kept.sum()), "raw_bytes_read": 4e9},
                   "ledger": {"seconds": 20.0, "samples": rows}}}))
    (out / "_SUCCESS").write_text("")
    train = root / "train"
    train.mkdir(exist_ok=True)
    steps = np.arange(1, 5001)
    (train / "loss.jsonl").write_text("".join(json.dumps({"step": int(s), "loss": float(4 * np.exp(-s / 900) + 0.5)}) + "\n"
                                              for s in steps))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="ledger rows (inputs); about 70%% are kept")
    p.add_argument("--work", default="/tmp/bench_report")
    p.add_argument("--keep", action="store_true", help="keep the synthetic run")
    p.add_argument("--reuse", action="store_true", help="time the run a --keep left in --work instead of a new one")
    args = p.parse_args()
    root = Path(args.work)
    out = root / "out"
    if not (args.reuse and (out / "_SUCCESS").exists()):
        t = time.time()
        out = build(root, args.rows)
        print(f"synthetic run: {args.rows:,} ledger rows in {time.time() - t:.0f} s at {out}")

    def timed(fn):  # wall and CPU (every thread of the process, DuckDB's included)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return result, time.perf_counter() - wall, time.process_time() - cpu

    write_report(out, out=root / "warmup.html")  # imports, fonts, the page cache: not what is compared
    con = connect(out)
    counts, base_wall, base_cpu = timed(lambda: (con.sql("SELECT count(*) FROM ledger").fetchall()[0][0],
                                                 con.sql("SELECT count(*) FROM samples").fetchall()[0][0]))
    page, wall, cpu = timed(lambda: write_report(out, train_runs=[root / "train"]))
    print(f"{counts[0]:,} ledger rows, {counts[1]:,} sidecar rows; {os.cpu_count()} CPUs")
    print(f"{'':<36} {'wall s':>8} {'CPU s':>8}")
    print(f"{'baseline: count(*) ledger, samples':<36} {base_wall:>8.2f} {base_cpu:>8.2f}")
    print(f"{'curate report':<36} {wall:>8.2f} {cpu:>8.2f}   ({wall / base_wall:.0f}x the baseline's wall time; "
          f"{page.stat().st_size / 1e6:.2f} MB of HTML)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
