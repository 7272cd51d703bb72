"""image_text crawl: img2dataset with our fetch policy, resumable in rounds (see
rounds.py): each round is one img2dataset run over a subset of uids; its finished
shards are moved up as image_text-rNNN-SSSSS.tar/.parquet. img2dataset's per-shard
parquet (status, error_message) becomes the crawl ledger; its _stats.json are kept.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ..errors import AccountingError
# decode_error from fetch, not img2dataset_bridge: reading a listing needs no img2dataset
from .fetch import OPT_OUT_DIRECTIVES, USER_AGENT_TOKEN, FetchPolicy, decode_error
from .guard import url_problem
from .optout import HostSignals, OptOutPolicy, round_store, stored_evidence
from .rounds import crawl_in_rounds
from .sources import read_url_list

KIND = "image_text"


def valid_url(url) -> bool:
    """Worth a request: an http(s) url with a host, no credentials, not overlong (guard.url_problem)."""
    return url_problem(url) is None


def _classify(status: str, message: str | None, stored: list | None = None) -> dict:
    """img2dataset's (status, error_message) -> ledger fields (+ transient flag). Our
    fetch keeps an image only from an HTTP 200; img2dataset's listing has no fetch
    time for it, so a kept row's fetched_at is null. A failure carries what our fetch
    encoded in the message. A kept row's opt-out evidence is `stored`: its host's records
    as the round stored them (optout.stored_evidence)."""
    if status == "success":
        return {"status": "kept", "reason": None, "error": None, "transient": False, "http_status": 200,
                "fetched_at": None, "optout_evidence": stored}
    ours = decode_error(message)
    if ours:
        return {"status": ours["status"], "reason": ours["reason"], "error": ours["error"], "transient": ours["transient"],
                "http_status": ours.get("http_status"), "fetched_at": ours.get("fetched_at"),
                "optout_evidence": ours.get("evidence") or None}
    return {"status": "failed", "reason": "download_error" if status == "failed_to_download" else "decode_error",
            "error": message or status, "transient": status == "failed_to_download", "http_status": None,
            "fetched_at": None, "optout_evidence": None}


def read_img2dataset_shard(pq_path: Path) -> pd.DataFrame:
    df = pd.read_parquet(pq_path, columns=["uid", "key", "status", "error_message", "url"])
    store = round_store(pq_path.parent / "_rounds" / KIND / pq_path.name.split("-")[1])  # image_text-rNNN-SSSSS
    fields = pd.DataFrame([_classify(s, m, stored_evidence(store, u) if s == "success" else None)
                           for s, m, u in zip(df["status"], df["error_message"], df["url"])], index=df.index,
                          columns=["status", "reason", "error", "transient", "http_status", "fetched_at", "optout_evidence"])
    fields["http_status"] = fields["http_status"].astype("Int32")
    fields["fetched_at"] = pd.to_datetime(fields["fetched_at"], utc=True, format="ISO8601")
    return pd.concat([df[["uid"]].assign(raw_key=df["key"]), fields], axis=1)


def _run_round(round_dir: Path, prefix: str, out_dir: Path, policy: FetchPolicy, *, ray_address, processes,
               threads, samples_per_shard) -> None:
    """Run (or finish) img2dataset over the round's list, then move its shards up."""
    from img2dataset import download

    from .img2dataset_bridge import policy_downloads

    # Host signals are stored with the round, so its workers share them and the
    # listing's kept rows get their evidence from the same records.
    policy = replace(policy, signals=HostSignals(round_store(round_dir)))
    work = round_dir / "img2dataset"
    n_rows = pq.ParquetFile(round_dir / "items.parquet").metadata.num_rows
    n_shards = max(1, -(-n_rows // samples_per_shard))
    if len(list(work.glob("*_stats.json"))) + len(glob.glob(str(out_dir / f"{prefix}-*_stats.json"))) < n_shards:
        distributor = "multiprocessing"
        if ray_address:
            from ..runtime.ray_env import start_ray

            start_ray(ray_address)
            distributor = "ray"
        with policy_downloads(policy):
            download(
                url_list=str(round_dir / "items.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=["uid", "source", "meta"], output_format="webdataset", output_folder=str(work),
                processes_count=processes or max(1, min(os.cpu_count() or 1, n_shards)), thread_count=threads,
                number_sample_per_shard=samples_per_shard, resize_mode="no", disable_all_reencoding=True,
                compute_hash="sha256", timeout=int(policy.timeout), retries=0,  # our fetch retries
                distributor=distributor, incremental_mode="incremental", user_agent_token=USER_AGENT_TOKEN,
                disallowed_header_directives=list(OPT_OUT_DIRECTIVES), enable_wandb=False,
            )
    done = len(list(work.glob("*_stats.json"))) + len(glob.glob(str(out_dir / f"{prefix}-*_stats.json")))
    if done != n_shards:  # leave them in place: img2dataset's incremental mode resumes from them
        raise AccountingError(f"round {round_dir.name}: img2dataset finished {done} of {n_shards} shards; "
                              "run the same crawl again to resume")
    # Move finished shards up (idempotent: a kill half-way leaves some moved, some not).
    for src in sorted(work.glob("[0-9]*.*")):
        dest = out_dir / f"{prefix}-{src.name}"
        if not dest.exists():
            os.replace(src, dest)
    shutil.rmtree(work / "_tmp", ignore_errors=True)


def crawl_image_text(input_path: str | Path, out_dir: str | Path, *, url_col: str | None = None,
                     caption_col: str | None = None, source: str | None = None,
                     allow_private: bool = False, allowed_networks: tuple[str, ...] = (),
                     ray_address: str | None = None, processes: int | None = None, threads: int = 32,
                     samples_per_shard: int = 500, timeout: float = 10, retries: int = 2,
                     policy: FetchPolicy | None = None, optout: OptOutPolicy | None = None) -> pd.DataFrame:
    """Crawl (or resume crawling) `input_path` into raw shards under `out_dir`; return the ledger."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = read_url_list(input_path, url_col=url_col, caption_col=caption_col, source=source)
    urls["caption"] = urls["caption"].fillna("") if urls["caption"].notna().any() else ""
    # Crawl-time image checks stop at the header (pixel cap); curation decodes fully later.
    policy = policy or FetchPolicy(timeout=timeout, retries=retries, allow_private=allow_private,
                                   allowed_networks=tuple(allowed_networks), verify_images=False,
                                   optout=optout or OptOutPolicy())
    run = dict(ray_address=ray_address, processes=processes, threads=threads, samples_per_shard=samples_per_shard)
    return crawl_in_rounds(urls, urls["url"].map(valid_url), out_dir, KIND,
                           lambda round_dir, prefix: _run_round(round_dir, prefix, out_dir, policy, **run),
                           read_img2dataset_shard)
