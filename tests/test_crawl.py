"""`curate crawl` end to end against a hostile server on 127.0.0.1, on real LAION
caption rows: outcomes, captions kept, transient-only retries, SIGKILL resume."""

import json
import os
import signal
import subprocess
import tarfile
import time

import pandas as pd
import pytest

from .conftest import CURATE, REPO, curate
from .servers import Hostile, hostile_server

pytestmark = pytest.mark.slow

LAION = REPO.parent / "shared" / "data" / "laion_captions_10k.parquet"
HOSTILE_PATHS = {  # path -> (status, reason) in the crawl ledger
    "/missing.jpg": ("failed", "http_error"),
    "/page.jpg": ("dropped", "not_image"),
    "/optout.jpg": ("dropped", "opt_out"),
    "/huge-declared.jpg": ("dropped", "too_large"),
    "/bomb.png": ("dropped", "too_many_pixels"),
    "/redirect-private.jpg": ("dropped", "private_address"),
    "/always-500.jpg": ("failed", "http_error"),
}


def laion_list(tmp_path, base, n=240, hostile=True):
    """LAION rows (real URL/TEXT columns) with urls pointed at our server."""
    if not LAION.exists():
        pytest.skip(f"shared LAION sample not found at {LAION}")
    df = pd.read_parquet(LAION).head(n).copy()
    df["original_url"] = df["URL"]
    df["URL"] = [f"{base}/img/{i}.jpg" for i in range(n)]
    if hostile:
        for i, path in enumerate(HOSTILE_PATHS):
            df.loc[i * 7, "URL"] = base + path
        df.loc[3, "URL"] = "ftp://example.invalid/x.jpg"
        df.loc[5, "URL"] = base + "/flaky-x.jpg"
    path = tmp_path / "laion.parquet"
    df.to_parquet(path, index=False)
    return path, df


def crawl_args(url_list, out, *extra):
    return ["crawl", "--input", url_list, "--out", out, "--url-col", "URL", "--caption-col", "TEXT",
            "--allow-network", "127.0.0.1/32", "--samples-per-shard", "40", "--timeout", "2", *extra]


def test_laion_rows_against_a_hostile_server(tmp_path):
    with hostile_server() as base:
        url_list, df = laion_list(tmp_path, base)
        curate(*crawl_args(url_list, tmp_path / "raw", "--retries", "0"))
    ledger = pd.read_parquet(tmp_path / "raw" / "crawl_ledger-image_text.parquet")
    assert len(ledger) == len(df) and ledger["uid"].is_unique
    by_url = ledger.set_index("url")
    for path, (status, reason) in HOSTILE_PATHS.items():
        row = by_url.loc[base + path]
        assert (row["status"], row["reason"]) == (status, reason), path
    assert (by_url.loc["ftp://example.invalid/x.jpg", "reason"]) == "bad_url"
    assert by_url.loc[base + "/flaky-x.jpg", "status"] == "failed"  # 500 with no retries allowed
    good = ledger[ledger["url"].str.contains("/img/")]
    assert (good["status"] == "kept").all()
    # captions and extra columns travel into the raw shards
    captions = dict(zip(df["URL"], df["TEXT"]))
    n = 0
    for tar_path in sorted((tmp_path / "raw").glob("image_text-r*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert members[name[:-4] + "txt"].decode() == captions[meta["url"]]
                assert json.loads(meta["meta"])["original_url"].startswith("http")
                n += 1
    assert n == len(good)


def test_rerun_retries_only_transient_failures(tmp_path):
    with hostile_server() as base:
        url_list, df = laion_list(tmp_path, base, n=60)
        curate(*crawl_args(url_list, tmp_path / "raw", "--retries", "0"))
        first = pd.read_parquet(tmp_path / "raw" / "crawl_ledger-image_text.parquet")
        hits_before = dict(Hostile.hits)
        curate(*crawl_args(url_list, tmp_path / "raw", "--retries", "0"))
        curate(*crawl_args(url_list, tmp_path / "raw", "--retries", "0"))
        second = pd.read_parquet(tmp_path / "raw" / "crawl_ledger-image_text.parquet")
        hits = dict(Hostile.hits)
    flaky = base + "/flaky-x.jpg"
    assert first.set_index("url").loc[flaky, "status"] == "failed"
    assert second.set_index("url").loc[flaky, "status"] == "kept"  # 500, 500, then OK on the third run
    for path in ("/img/1.jpg", "/img/2.jpg", "/missing.jpg", "/page.jpg", "/optout.jpg"):
        assert hits[path] == hits_before[path] == 1, path  # kept and permanent outcomes: never refetched
    assert hits["/always-500.jpg"] == 3  # transient: tried again on each run
    kept = second[second["status"] == "kept"]
    assert kept["uid"].is_unique and kept["raw_shard"].notna().all()
    # img2dataset's _stats.json, summed over the three rounds, are in the crawl summary
    attempts = json.loads((tmp_path / "raw" / "_SUCCESS-image_text").read_text())["attempts"]
    assert attempts["successes"] == len(kept)
    retried = (first["status"] == "failed") & first["reason"].isin(["http_error"]) & first["url"].str.contains("500|flaky")
    assert attempts["count"] == first["url"].str.startswith("http").sum() + 2 * retried.sum()  # both retried twice
    assert attempts["outcomes"]["failed:http_error"] >= 3


def test_edited_url_list_is_refused_and_half_made_round_is_ignored(tmp_path):
    with hostile_server() as base:
        url_list, df = laion_list(tmp_path, base, n=30, hostile=False)
        curate(*crawl_args(url_list, tmp_path / "raw"))
        (tmp_path / "raw" / "_rounds" / "image_text" / "r001").mkdir()  # as if killed while creating it
        again = curate(*crawl_args(url_list, tmp_path / "raw"))
        assert "crawled 30 urls" in again.stdout
        df.loc[0, "URL"] = base + "/img/999.jpg"
        df.to_parquet(url_list, index=False)
        edited = curate(*crawl_args(url_list, tmp_path / "raw"), check=False)
    assert edited.returncode == 2 and "different input" in edited.stderr


def test_sigkill_mid_crawl_then_resume(tmp_path):
    with hostile_server() as base:
        url_list, _ = laion_list(tmp_path, base, n=400, hostile=False)
        reference = tmp_path / "reference"
        curate(*crawl_args(url_list, reference))
        out = tmp_path / "killed"
        proc = subprocess.Popen([*CURATE, *map(str, crawl_args(url_list, out))], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        work = out / "_rounds" / "image_text" / "r000" / "img2dataset"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(work.glob("*_stats.json"))) < 2 and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "crawl finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "_SUCCESS-image_text").exists()
        curate(*crawl_args(url_list, out))
    ref = pd.read_parquet(reference / "crawl_ledger-image_text.parquet")
    got = pd.read_parquet(out / "crawl_ledger-image_text.parquet")
    assert set(got.loc[got["status"] == "kept", "uid"]) == set(ref.loc[ref["status"] == "kept", "uid"])
    uids_in_shards = []
    for tar_path in sorted(out.glob("image_text-r*.tar")):
        with tarfile.open(tar_path) as tar:
            uids_in_shards += [json.loads(tar.extractfile(m).read())["uid"] for m in tar if m.name.endswith(".json")]
    assert len(uids_in_shards) == len(set(uids_in_shards)) == (got["status"] == "kept").sum()
