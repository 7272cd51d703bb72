"""Sample-level resume for every crawl kind: crawling in rounds.

Layout inside a crawl folder (one folder may hold several kinds):
  _input/<kind>/items.parquet      the normalised input (uid per row), fixed at the first run
  _rounds/<kind>/rNNN/             one round: items.parquet (its subset of uids), _DONE
  <kind>-rNNN-SSSSS.tar/.parquet   raw shards of finished rounds; the parquet has one row
                                   per attempted sample (kept or not)
  crawl_ledger-<kind>.parquet      every input row once: kept (in a raw shard), dropped, failed
  _SUCCESS-<kind>

Round 0 attempts every valid row. A later crawl of the same input first finishes a
round that was interrupted, then starts one new round with exactly the uids whose latest
attempt failed transiently. A uid once kept is never fetched again: a killed and resumed
crawl keeps the same set as an uninterrupted one, with no duplicates.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from .. import schemas
from ..errors import AccountingError, InputError
from ..fsutil import atomic_write_parquet, atomic_write_text
from . import ledger_name

# fetched_at/http_status: absent from shards an older crawl wrote (read as null).
# optout_evidence: a list of optout.evaluate entries per row (absent from older crawls).
RESULT_COLUMNS = ["uid", "raw_key", "raw_shard", "status", "reason", "error", "transient", "http_status", "fetched_at",
                  "optout_evidence"]


def fix_input(items: pd.DataFrame, out_dir: Path, kind: str) -> None:
    """The input is fixed at the first run: resuming with another list would mix crawls."""
    path = out_dir / "_input" / kind / "items.parquet"
    if path.exists():
        # uids come from positions, so compare content too: an edited list must not resume.
        cols = [c for c in ("uid", "url", "caption", "doc") if c in items.columns]
        before = pd.read_parquet(path, columns=cols)
        if not before.fillna("").astype(str).equals(items[cols].reset_index(drop=True).fillna("").astype(str)):
            raise InputError(f"{out_dir} holds a {kind} crawl of a different input; use a new --out folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(items, path)


def round_dirs(out_dir: Path, kind: str) -> list[Path]:
    return sorted(p for p in (out_dir / "_rounds" / kind).glob("r[0-9][0-9][0-9]") if p.is_dir())


def shard_prefix(kind: str, round_dir: Path) -> str:
    return f"{kind}-{round_dir.name}"


def round_results(out_dir: Path, kind: str, round_dir: Path, read_shard: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    frames = []
    for pq_path in sorted(glob.glob(str(out_dir / f"{shard_prefix(kind, round_dir)}-*.parquet"))):
        df = read_shard(Path(pq_path))
        df["raw_shard"] = Path(pq_path).with_suffix(".tar").name
        frames.append(df.reindex(columns=RESULT_COLUMNS))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)


def latest_outcomes(out_dir: Path, kind: str, read_shard) -> pd.DataFrame:
    """Each uid's most recent outcome over all finished rounds."""
    frames = [round_results(out_dir, kind, r, read_shard).assign(round=i)
              for i, r in enumerate(round_dirs(out_dir, kind)) if (r / "_DONE").exists()]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS + ["round"])
    everything = pd.concat(frames, ignore_index=True)
    kept = everything[everything["status"] == "kept"]
    if kept["uid"].duplicated().any():
        raise AccountingError(f"uid {kept.loc[kept['uid'].duplicated(), 'uid'].iloc[0]} was kept in two rounds")
    return everything.sort_values("round", kind="stable").drop_duplicates("uid", keep="last")


def crawl_in_rounds(items: pd.DataFrame, valid: pd.Series, out_dir: Path, kind: str,
                    run_round: Callable[[Path, str], None], read_shard,
                    refusals: pd.DataFrame | None = None) -> pd.DataFrame:
    """Finish an interrupted round, run one new round over what is left, write the ledger.

    `valid` marks the rows worth fetching; the others are dropped without a request, with
    the reason and error in `refusals` (columns reason, error; indexed like items) or, by
    default, bad_url and what is wrong with the url.
    `run_round(round_dir, prefix)` must leave `prefix-SSSSS.tar/.parquet` files in out_dir
    and may be called again on the same round after a crash (it must skip finished shards
    and publish each shard atomically).
    """
    fix_input(items, out_dir, kind)
    rounds = round_dirs(out_dir, kind)
    if rounds and not (rounds[-1] / "items.parquet").exists():  # killed while creating it
        shutil.rmtree(rounds[-1])
        rounds = rounds[:-1]
    if rounds and not (rounds[-1] / "_DONE").exists():
        run_round(rounds[-1], shard_prefix(kind, rounds[-1]))
        atomic_write_text(rounds[-1] / "_DONE", "")
    latest = latest_outcomes(out_dir, kind, read_shard)
    retry = latest.loc[(latest["status"] == "failed") & latest["transient"].eq(True), "uid"]
    todo = items[valid & (~items["uid"].isin(latest["uid"]) | items["uid"].isin(retry))]
    if not todo.empty:
        round_dir = out_dir / "_rounds" / kind / f"r{len(rounds):03d}"
        round_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(todo, round_dir / "items.parquet")
        run_round(round_dir, shard_prefix(kind, round_dir))
        atomic_write_text(round_dir / "_DONE", "")
        latest = latest_outcomes(out_dir, kind, read_shard)
    return write_ledger(items, valid, latest, out_dir, kind, refusals)


def _refusals(items: pd.DataFrame, valid: pd.Series, refusals: pd.DataFrame | None) -> pd.DataFrame:
    from .guard import url_problem

    bad = items.loc[~valid]
    errors = [url_problem(u) or "no fetchable http(s) url" for u in bad["url"]]
    out = pd.DataFrame({"reason": "bad_url", "error": errors}, index=bad.index)
    if refusals is not None:
        given = refusals.reindex(out.index)
        out["reason"] = given["reason"].where(given["reason"].notna(), out["reason"])
        out["error"] = given["error"].where(given["error"].notna(), out["error"])
    out["error"] = out["error"].astype(str).str.slice(0, 2000)
    return out


def write_ledger(items: pd.DataFrame, valid: pd.Series, latest: pd.DataFrame, out_dir: Path, kind: str,
                 refusals: pd.DataFrame | None = None) -> pd.DataFrame:
    base = items[["uid", "source", "url"]].assign(stage="crawl")
    why = _refusals(items, valid, refusals)
    bad = base[~valid].assign(status="dropped", reason=why["reason"], error=why["error"])
    got = base[valid].merge(latest.drop(columns=["round"]), on="uid", how="left")
    missing = got["status"].isna()
    if missing.any():
        got.loc[missing, ["status", "reason", "error"]] = ["failed", "not_reported", "the crawler reported no result"]
    kept = got["status"] == "kept"
    got["tier"] = got["shard"] = None  # also when nothing was fetchable (got is empty)
    got.loc[kept, "tier"] = "raw"
    got.loc[kept, "shard"] = got.loc[kept, "raw_shard"]
    got.loc[~kept, ["raw_shard", "raw_key"]] = None
    ledger = pd.concat([bad, got], ignore_index=True).set_index("uid").loc[items["uid"]].reset_index()
    if len(ledger) != len(items) or not ledger["uid"].is_unique:
        raise AccountingError(f"crawl ledger has {len(ledger)} rows for {len(items)} inputs")
    atomic_write_parquet(schemas.to_table("ledger", ledger), out_dir / ledger_name(kind))
    counts = ledger["status"].value_counts().to_dict()
    transient = int(ledger["transient"].eq(True).sum()) if "transient" in ledger else 0
    atomic_write_text(out_dir / f"_SUCCESS-{kind}", json.dumps(
        {"inputs": len(items), **counts, "transient_failures": transient, "attempts": crawl_stats(out_dir, kind)},
        indent=2) + "\n")
    return ledger


def crawl_stats(out_dir: str | Path, kind: str) -> dict:
    """Every round's per-shard _stats.json summed: attempts (retries count again),
    successes, and the outcome histogram (img2dataset's error messages decoded to our
    reasons), plus img2dataset's own download-time figures where present."""
    from .fetch import decode_error  # not via img2dataset_bridge: that imports img2dataset

    total: dict = {"shards": 0, "count": 0, "successes": 0, "outcomes": {}}
    for path in sorted(glob.glob(str(Path(out_dir) / f"{kind}-r[0-9][0-9][0-9]-*_stats.json"))):
        stats = json.loads(Path(path).read_text())
        total["shards"] += 1
        total["count"] += int(stats.get("count", 0))
        total["successes"] += int(stats.get("successes", 0))
        for key in ("failed_to_download", "failed_to_resize", "duration"):
            if key in stats:
                total[key] = round(total.get(key, 0) + stats[key], 3)
        for outcome, n in (stats.get("status_dict") or {}).items():
            decoded = decode_error(outcome)
            label = f"{decoded['status']}:{decoded['reason']}" if decoded else ("kept" if outcome == "success" else outcome)
            total["outcomes"][label] = total["outcomes"].get(label, 0) + n
    return total
