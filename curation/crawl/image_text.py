"""image_text crawl: img2dataset with our fetch policy, in resumable rounds.

Layout of a crawl folder:
  _input/urls.parquet        the normalised url list (uid per row), fixed at the first run
  _rounds/rNNN/              one img2dataset run over a subset of uids (urls.parquet, _DONE)
  rNNN-SSSSS.tar/.parquet    raw shards, moved up from a round once it is complete
  crawl_ledger.parquet       every input row once: kept (in a raw shard), dropped or failed
  _SUCCESS

Round 0 fetches every valid url. A later `curate crawl` on the same folder first
finishes a round that was interrupted (img2dataset redoes only its unfinished shards),
then starts one new round with exactly the uids whose latest attempt failed
transiently. A uid that was kept is never fetched again, so the kept set of a killed and
resumed crawl equals that of an uninterrupted one, without duplicates.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from .. import schemas
from ..errors import AccountingError, InputError
from ..fsutil import atomic_write_text
from . import CRAWL_LEDGER
from .fetch import OPT_OUT_DIRECTIVES, USER_AGENT_TOKEN, FetchPolicy
from .guard import ALLOWED_SCHEMES
from .img2dataset_bridge import decode_error, policy_downloads
from .sources import read_url_list

ROUNDS = "_rounds"


def _valid_url(url) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in ALLOWED_SCHEMES and "://" in url


def _fixed_input(urls: pd.DataFrame, out_dir: Path) -> None:
    """The url list is fixed at the first run: resuming with another list would mix crawls."""
    path = out_dir / "_input" / "urls.parquet"
    if path.exists():
        before = pd.read_parquet(path, columns=["uid", "url"])
        if before["uid"].tolist() != urls["uid"].tolist() or before["url"].tolist() != urls["url"].tolist():
            raise InputError(f"{out_dir} holds a crawl of a different url list; use a new --out folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("urls.parquet.tmp")
    urls.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _classify(status: str, message: str | None) -> dict:
    """img2dataset's (status, error_message) -> ledger fields (+ transient flag)."""
    if status == "success":
        return {"status": "kept", "reason": None, "error": None, "transient": False}
    ours = decode_error(message)
    if ours:
        return {"status": ours["status"], "reason": ours["reason"], "error": ours["error"], "transient": ours["transient"]}
    return {"status": "failed", "reason": "download_error" if status == "failed_to_download" else "decode_error",
            "error": message or status, "transient": status == "failed_to_download"}


def _round_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in (out_dir / ROUNDS).glob("r[0-9][0-9][0-9]") if p.is_dir())


def _round_results(out_dir: Path, round_dir: Path) -> pd.DataFrame:
    """One row per uid attempted in a finished round, with its outcome and raw shard."""
    frames = []
    for pq_path in sorted(glob.glob(str(out_dir / f"{round_dir.name}-*.parquet"))):
        df = pd.read_parquet(pq_path, columns=["uid", "key", "status", "error_message"])
        df["raw_shard"] = Path(pq_path).with_suffix(".tar").name
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["uid", "raw_key", "raw_shard", "status", "reason", "error", "transient"])
    df = pd.concat(frames, ignore_index=True)
    fields = pd.DataFrame([_classify(s, m) for s, m in zip(df["status"], df["error_message"])])
    return pd.concat([df[["uid", "raw_shard"]].assign(raw_key=df["key"]), fields], axis=1)


def _run_round(round_dir: Path, out_dir: Path, policy: FetchPolicy, *, ray_address, processes, threads,
               samples_per_shard) -> None:
    """Run (or finish) img2dataset over the round's list, then move its shards up."""
    from img2dataset import download

    if not (round_dir / "_DONE").exists():
        distributor = "multiprocessing"
        if ray_address:
            from ..runtime.ray_env import start_ray

            start_ray(ray_address)
            distributor = "ray"
        n_rows = pq.ParquetFile(round_dir / "urls.parquet").metadata.num_rows
        n_shards = max(1, -(-n_rows // samples_per_shard))
        with policy_downloads(policy):
            download(
                url_list=str(round_dir / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=["uid", "source", "meta"], output_format="webdataset",
                output_folder=str(round_dir / "img2dataset"),
                processes_count=processes or max(1, min(os.cpu_count() or 1, n_shards)), thread_count=threads,
                number_sample_per_shard=samples_per_shard, resize_mode="no", disable_all_reencoding=True,
                compute_hash="sha256", timeout=int(policy.timeout), retries=0,  # our fetch retries
                distributor=distributor, incremental_mode="incremental", user_agent_token=USER_AGENT_TOKEN,
                disallowed_header_directives=list(OPT_OUT_DIRECTIVES), enable_wandb=False,
            )
        produced = sorted((round_dir / "img2dataset").glob("*_stats.json"))
        if len(produced) != n_shards:
            raise AccountingError(f"round {round_dir.name}: img2dataset finished {len(produced)} of {n_shards} shards; "
                                  "run the same crawl again to resume")
        atomic_write_text(round_dir / "_DONE", "")
    # Move finished shards up (idempotent: a kill half-way leaves some moved, some not).
    for src in sorted((round_dir / "img2dataset").glob("[0-9]*.*")):
        dest = out_dir / f"{round_dir.name}-{src.name}"
        if not dest.exists():
            os.replace(src, dest)
    shutil.rmtree(round_dir / "img2dataset" / "_tmp", ignore_errors=True)


def crawl_image_text(input_path: str | Path, out_dir: str | Path, *, url_col: str | None = None,
                     caption_col: str | None = None, source: str | None = None,
                     allow_private: bool = False, allowed_networks: tuple[str, ...] = (),
                     ray_address: str | None = None, processes: int | None = None, threads: int = 32,
                     samples_per_shard: int = 500, timeout: float = 10, retries: int = 2,
                     policy: FetchPolicy | None = None) -> pd.DataFrame:
    """Crawl (or resume crawling) `input_path` into raw shards under `out_dir`; return the ledger."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = read_url_list(input_path, url_col=url_col, caption_col=caption_col, source=source)
    _fixed_input(urls, out_dir)
    # Crawl-time image checks stop at the header (pixel cap); curation decodes fully later.
    policy = policy or FetchPolicy(timeout=timeout, retries=retries, allow_private=allow_private,
                                   allowed_networks=tuple(allowed_networks), verify_images=False)
    valid = urls["url"].map(_valid_url)
    run = dict(ray_address=ray_address, processes=processes, threads=threads, samples_per_shard=samples_per_shard)

    rounds = _round_dirs(out_dir)
    if rounds:
        last = rounds[-1]
        unfinished = not (last / "_DONE").exists() or any((last / "img2dataset").glob("[0-9]*.*"))
        if unfinished:
            _run_round(last, out_dir, policy, **run)  # finish what a kill interrupted
    latest = _latest(out_dir, rounds)
    retry = latest.loc[(latest["status"] == "failed") & latest["transient"].astype(bool), "uid"]
    todo = urls[valid & (~urls["uid"].isin(latest["uid"]) | urls["uid"].isin(retry))]
    if not todo.empty:
        round_dir = out_dir / ROUNDS / f"r{len(rounds):03d}"
        round_dir.mkdir(parents=True, exist_ok=True)
        lst = todo.assign(caption=todo["caption"].fillna("") if todo["caption"].notna().any() else "")
        lst.to_parquet(round_dir / "urls.parquet.tmp", index=False)
        os.replace(round_dir / "urls.parquet.tmp", round_dir / "urls.parquet")
        _run_round(round_dir, out_dir, policy, **run)
        rounds = _round_dirs(out_dir)
        latest = _latest(out_dir, rounds)
    return _write_ledger(urls, valid, latest, out_dir)


def _latest(out_dir: Path, rounds: list[Path]) -> pd.DataFrame:
    """Each uid's most recent outcome over all finished rounds."""
    frames = [_round_results(out_dir, r).assign(round=i) for i, r in enumerate(rounds) if (r / "_DONE").exists()]
    if not frames:
        return pd.DataFrame(columns=["uid", "status", "reason", "error", "transient", "raw_shard", "raw_key", "round"])
    all_rounds = pd.concat(frames, ignore_index=True)
    kept = all_rounds[all_rounds["status"] == "kept"]
    if kept["uid"].duplicated().any():
        raise AccountingError(f"uid {kept.loc[kept['uid'].duplicated(), 'uid'].iloc[0]} was kept in two rounds")
    return all_rounds.sort_values("round").drop_duplicates("uid", keep="last")


def _write_ledger(urls: pd.DataFrame, valid: pd.Series, latest: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    base = urls[["uid", "source", "url"]].assign(stage="crawl")
    bad = base[~valid].assign(status="dropped", reason="bad_url", error="not an http(s) url")
    got = base[valid].merge(latest.drop(columns=["round"]), on="uid", how="left")
    missing = got["status"].isna()
    got.loc[missing, ["status", "reason", "error"]] = ["failed", "not_reported", "img2dataset reported no result"]
    kept = got["status"] == "kept"
    got.loc[kept, "tier"] = "raw"
    got.loc[kept, "shard"] = got.loc[kept, "raw_shard"]
    got.loc[~kept, ["raw_shard", "raw_key"]] = None
    ledger = pd.concat([bad, got], ignore_index=True).set_index("uid").loc[urls["uid"]].reset_index()
    if len(ledger) != len(urls) or not ledger["uid"].is_unique:
        raise AccountingError(f"crawl ledger has {len(ledger)} rows for {len(urls)} inputs")
    tmp = out_dir / (CRAWL_LEDGER + ".tmp")
    pq.write_table(schemas.to_table("ledger", ledger), tmp)
    os.replace(tmp, out_dir / CRAWL_LEDGER)
    counts = ledger["status"].value_counts().to_dict()
    transient = int(ledger.get("transient", pd.Series(dtype=bool)).fillna(False).astype(bool).sum())
    atomic_write_text(out_dir / "_SUCCESS", json.dumps({"inputs": len(urls), **counts, "transient_failures": transient},
                                                       indent=2) + "\n")
    return ledger


def crawl_stats(out_dir: str | Path) -> dict:
    """img2dataset's _stats.json files summed over every round: counts and error histogram."""
    total: dict = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "errors": {}}
    for path in sorted(glob.glob(str(Path(out_dir) / "r[0-9][0-9][0-9]-*_stats.json"))):
        stats = json.loads(Path(path).read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[k] += int(stats.get(k, 0))
        for err, n in (stats.get("status_dict") or {}).items():
            reason = (decode_error(err) or {}).get("reason", err)
            total["errors"][reason] = total["errors"].get(reason, 0) + n
    return total
