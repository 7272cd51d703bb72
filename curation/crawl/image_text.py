"""image_text crawl through img2dataset.

1. Read the url list, give every row its uid.
2. Judge each url with the address guard; refused rows go straight to the ledger.
3. Hand the rest to img2dataset (its `ray` distributor when a Ray address is given,
   `multiprocessing` otherwise). Original bytes are stored untouched
   (disable_all_reencoding) so curation sees exactly what the server sent.
4. Read img2dataset's per-shard parquet and _stats.json into the crawl ledger:
   every input row ends there once, kept (in a raw shard), dropped or failed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from .. import schemas
from ..errors import AccountingError
from ..fsutil import atomic_write_text
from .guard import Verdict, check_url
from .sources import read_url_list

log = logging.getLogger(__name__)

USER_AGENT_TOKEN = "curation-vlm"
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
CRAWL_LEDGER = "crawl_ledger.parquet"


def _classify_img2dataset(status: str, error: str | None) -> tuple[str, str | None]:
    """img2dataset's (status, error_message) -> our (status, reason)."""
    if status == "success":
        return "kept", None
    error = error or ""
    if "X-Robots-Tag" in error:
        return "dropped", "opt_out"
    if "HTTP Error" in error:
        return "failed", "http_error"
    if "timed out" in error.lower():
        return "failed", "timeout"
    if status == "failed_to_resize":
        return "failed", "decode_error"
    return "failed", "download_error"


def _judge_all(urls: list[str | None], allow_private: bool) -> list[Verdict]:
    """Guard verdicts, resolving each host once, in parallel (DNS is slow)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda u: check_url(u, allow_private), urls))


def crawl_image_text(input_path: str | Path, out_dir: str | Path, *, url_col: str | None = None,
                     caption_col: str | None = None, source: str | None = None,
                     allow_private: bool = False, ray_address: str | None = None,
                     processes: int | None = None, threads: int = 32, samples_per_shard: int = 500,
                     timeout: int = 10, retries: int = 1) -> pd.DataFrame:
    """Crawl `input_path` into raw shards under `out_dir`; return the crawl ledger."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = read_url_list(input_path, url_col=url_col, caption_col=caption_col, source=source)

    verdicts = _judge_all(urls["url"].tolist(), allow_private)
    allowed = [v.allowed for v in verdicts]
    refused = urls[[not a for a in allowed]]
    refused_rows = [
        {"uid": r.uid, "source": r.source, "url": r.url, "stage": "crawl",
         "status": "failed" if v.reason == "dns_error" else "dropped",
         "reason": v.reason, "error": v.error or (v.reason if v.reason == "dns_error" else None)}
        for r, v in zip(refused.itertuples(), [v for v in verdicts if not v.allowed])
    ]

    to_fetch = urls[allowed]
    fetched_rows: list[dict] = []
    if not to_fetch.empty:
        input_dir = out_dir / "_input"
        input_dir.mkdir(exist_ok=True)
        list_path = input_dir / "urls.parquet"
        to_fetch.assign(caption=to_fetch["caption"].fillna("") if "caption" in to_fetch else "").to_parquet(list_path, index=False)
        _run_img2dataset(list_path, out_dir, ray_address=ray_address, processes=processes, threads=threads,
                         samples_per_shard=samples_per_shard, timeout=timeout, retries=retries)
        fetched_rows = _read_img2dataset_results(out_dir, to_fetch)

    ledger = pd.DataFrame(refused_rows + fetched_rows)
    if len(ledger) != len(urls) or ledger["uid"].nunique() != len(urls):
        raise AccountingError(f"crawl ledger has {len(ledger)} rows ({ledger['uid'].nunique()} uids) for {len(urls)} inputs")
    ledger = ledger.set_index("uid").loc[urls["uid"]].reset_index()  # input order
    table = schemas.to_table("ledger", ledger)
    tmp = out_dir / (CRAWL_LEDGER + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / CRAWL_LEDGER)
    counts = ledger["status"].value_counts().to_dict()
    atomic_write_text(out_dir / "_SUCCESS", json.dumps({"inputs": len(urls), **counts}, indent=2) + "\n")
    return ledger


def _run_img2dataset(list_path: Path, out_dir: Path, *, ray_address, processes, threads,
                     samples_per_shard, timeout, retries) -> None:
    from img2dataset import download

    distributor = "multiprocessing"
    if ray_address:
        import ray

        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        distributor = "ray"
    n_rows = pq.ParquetFile(list_path).metadata.num_rows
    n_shards = max(1, -(-n_rows // samples_per_shard))
    download(
        url_list=str(list_path),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", "source", "meta"],
        output_format="webdataset",
        output_folder=str(out_dir),
        processes_count=processes or max(1, min(os.cpu_count() or 1, n_shards)),
        thread_count=threads,
        number_sample_per_shard=samples_per_shard,
        resize_mode="no",
        disable_all_reencoding=True,
        compute_hash="sha256",
        timeout=timeout,
        retries=retries,
        distributor=distributor,
        incremental_mode="incremental",
        user_agent_token=USER_AGENT_TOKEN,
        disallowed_header_directives=OPT_OUT_DIRECTIVES,
        enable_wandb=False,
    )


def _read_img2dataset_results(out_dir: Path, to_fetch: pd.DataFrame) -> list[dict]:
    """Per-shard parquet -> ledger rows. A row img2dataset never reported (a shard lost
    to a crash it did not retry) is recorded as failed, never silently dropped."""
    frames = []
    for pq_path in sorted(glob.glob(str(out_dir / "[0-9]*.parquet"))):
        df = pd.read_parquet(pq_path, columns=["uid", "key", "status", "error_message"])
        df["raw_shard"] = Path(pq_path).with_suffix(".tar").name
        frames.append(df)
    results = pd.concat(frames) if frames else pd.DataFrame(columns=["uid", "key", "status", "error_message", "raw_shard"])
    results = results.drop_duplicates("uid", keep="last").set_index("uid")
    rows = []
    for r in to_fetch.itertuples():
        base = {"uid": r.uid, "source": r.source, "url": r.url, "stage": "crawl"}
        if r.uid not in results.index:
            rows.append({**base, "status": "failed", "reason": "not_reported",
                         "error": "img2dataset reported no result for this url (shard lost)"})
            continue
        res = results.loc[r.uid]
        status, reason = _classify_img2dataset(res["status"], res["error_message"])
        row = {**base, "status": status, "reason": reason}
        if status == "kept":
            row.update(raw_shard=res["raw_shard"], raw_key=res["key"], tier="raw", shard=res["raw_shard"])
        else:
            row["error"] = res["error_message"] or res["status"]
        rows.append(row)
    return rows


def crawl_stats(out_dir: str | Path) -> dict:
    """img2dataset's _stats.json files summed: counts and the error histogram."""
    total: dict = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "errors": {}}
    for path in sorted(glob.glob(str(Path(out_dir) / "*_stats.json"))):
        stats = json.loads(Path(path).read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[k] += int(stats.get(k, 0))
        for err, n in (stats.get("status_dict") or {}).items():
            total["errors"][err] = total["errors"].get(err, 0) + n
    return total
