"""Interleaved documents and videos crawled through the fetch policy (hostile server on
127.0.0.1): keep rules, missing images recorded, probes, transient retries."""

import io
import json
import tarfile
import time

import pandas as pd
import pytest

from curation.crawl.media import crawl_media, probe_video
from curation.demo.corpus import _video_bytes
from curation.demo.scenes import random_scene

from .servers import Hostile, hostile_server

pytestmark = pytest.mark.slow
LOOPBACK = ("127.0.0.1/32",)


def members(out, kind):
    found = {}
    for tar_path in sorted(out.glob(f"{kind}-r*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                found[m.name] = tar.extractfile(m).read()
    return found


def test_documents(tmp_path):
    with hostile_server() as base:
        docs = [
            {"doc_id": "ok", "items": [{"type": "text", "text": "intro"}, {"type": "image", "url": f"{base}/img/1.jpg"},
                                       {"type": "text", "text": "middle"}, {"type": "image", "url": f"{base}/img/2.jpg"}]},
            {"doc_id": "lost", "items": [{"type": "image", "url": f"{base}/img/3.jpg"},
                                         {"type": "image", "url": f"{base}/missing.jpg"}]},
            {"doc_id": "flaky", "items": [{"type": "image", "url": f"{base}/img/4.jpg"},
                                          {"type": "image", "url": f"{base}/always-500.jpg"}]},
            {"doc_id": "text-only", "items": [{"type": "text", "text": "no pictures here"}]},
            {"doc_id": "opted-out", "items": [{"type": "image", "url": f"{base}/optout.jpg"}]},
        ]
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        ledger = crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
        # OBELICS-style parallel lists, with `any` as the keep rule
        obelics = pd.DataFrame({"texts": [["a", None, "b", None]],
                                "images": [[None, f"{base}/img/5.jpg", None, f"{base}/missing.jpg"]]})
        obelics.to_parquet(tmp_path / "obelics.parquet")
        ledger_any = crawl_media("interleaved", tmp_path / "obelics.parquet", tmp_path / "raw_any",
                                 allowed_networks=LOOPBACK, retries=0, require_images="any")
    outcome = dict(zip(range(len(docs)), zip(ledger["status"], ledger["reason"])))
    assert outcome == {0: ("kept", None), 1: ("dropped", "missing_images"), 2: ("failed", "missing_images"),
                       3: ("dropped", "no_images"), 4: ("dropped", "missing_images")}
    files = members(tmp_path / "raw", "interleaved")
    meta = json.loads(next(v for k, v in files.items() if k.endswith(".json")))
    key = next(k for k in files if k.endswith(".json"))[: -len(".json")]
    assert [it.get("member") for it in meta["items"]] == [None, "0.jpg", None, "1.jpg"]
    assert files[f"{key}.0.jpg"][:2] == b"\xff\xd8" and f"{key}.1.jpg" in files
    assert meta["missing_images"] == []
    assert ledger_any["status"].tolist() == ["kept"]
    meta_any = json.loads(next(v for k, v in members(tmp_path / "raw_any", "interleaved").items() if k.endswith(".json")))
    assert meta_any["missing_images"] == [f"{base}/missing.jpg"]
    assert Hostile.hits["/img/1.jpg"] == 1


def test_documents_retry_only_transient_docs(tmp_path):
    with hostile_server() as base:
        docs = [{"doc_id": "a", "items": [{"type": "image", "url": f"{base}/img/1.jpg"}]},
                {"doc_id": "b", "items": [{"type": "image", "url": f"{base}/flaky-doc.jpg"}]}]
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        for _ in range(3):  # flaky answers 500, 500, then OK
            ledger = crawl_media("interleaved", path, tmp_path / "raw", allowed_networks=LOOPBACK, retries=0)
        hits = dict(Hostile.hits)
    assert ledger["status"].tolist() == ["kept", "kept"]
    assert hits["/img/1.jpg"] == 1 and hits["/flaky-doc.jpg"] == 3


def test_videos(tmp_path):
    import random

    clip = _video_bytes(random_scene(random.Random(0)), "left to right")
    Hostile.videos = {"/video/good.mp4": clip, "/video/page.mp4": b"<html>nope</html>",
                      "/video/broken.mp4": clip[:40] + b"\x00" * 300, "/video/big.mp4": clip * 200}
    with hostile_server() as base:
        urls = pd.DataFrame({"url": [f"{base}/video/{n}.mp4" for n in ("good", "page", "broken", "big")],
                             "caption": ["a circle moves"] * 4})
        urls.to_parquet(tmp_path / "videos.parquet")
        from curation.crawl.fetch import FetchPolicy

        policy = FetchPolicy(retries=0, allowed_networks=LOOPBACK, max_bytes={"video": 100_000, "any": 100_000})
        ledger = crawl_media("video", tmp_path / "videos.parquet", tmp_path / "raw", policy=policy)
    assert list(zip(ledger["status"], ledger["reason"])) == [
        ("kept", None), ("dropped", "not_video"), ("failed", "probe_error"), ("dropped", "too_large")]
    files = members(tmp_path / "raw", "video")
    meta = json.loads(next(v for k, v in files.items() if k.endswith(".json")))
    assert meta["probe"] == {**probe_video(clip)} and meta["probe"]["num_frames"] == 16
    assert meta["probe"]["duration"] == pytest.approx(2.0) and meta["probe"]["fps"] == pytest.approx(8.0)
    assert next(v for k, v in files.items() if k.endswith(".mp4")) == clip


def test_probe_reads_real_numbers():
    import random

    probe = probe_video(_video_bytes(random_scene(random.Random(1)), "top to bottom", n_frames=24))
    assert (probe["width"], probe["height"], probe["num_frames"], probe["codec"]) == (96, 96, 24, "h264")
    with pytest.raises(Exception):
        probe_video(io.BytesIO(b"not a video").getvalue())


# --------------------------------------------------------------------------- streaming shards
def _clip(seed=0):
    import random

    return _video_bytes(random_scene(random.Random(seed)), "left to right")


def _video_list(tmp_path, base, n):
    urls = pd.DataFrame({"url": [f"{base}/video/{i}.mp4" for i in range(n)], "caption": [f"clip {i}" for i in range(n)]})
    urls.to_parquet(tmp_path / "videos.parquet")
    return tmp_path / "videos.parquet"


def _tar_samples(tar_path):
    """(key, [(ext, data)]) in file order, and the member bytes (headers + padded data)."""
    samples, used = [], 0
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, tar.extractfile(m).read()))
            used += 512 + -(-m.size // 512) * 512
    return samples, used


def test_shards_close_by_bytes_and_by_count(tmp_path):
    from curation.wds import tar_bytes

    clips = {f"/video/{i}.mp4": _clip(i) for i in range(12)}
    Hostile.videos = clips
    cap = 3 * (max(map(len, clips.values())) + 3 * 1024)  # about three samples (video, txt, json)
    with hostile_server() as base:
        path = _video_list(tmp_path, base, 12)
        by_bytes = crawl_media("video", path, tmp_path / "bytes", allowed_networks=LOOPBACK, retries=0, threads=4,
                               max_shard_bytes=cap)
        by_count = crawl_media("video", path, tmp_path / "count", allowed_networks=LOOPBACK, retries=0, threads=4,
                               samples_per_shard=5)
    assert by_bytes["status"].eq("kept").all() and by_count["status"].eq("kept").all()
    for out, expect_shards in ((tmp_path / "bytes", None), (tmp_path / "count", 3)):
        tars = sorted(out.glob("video-r000-*.tar"))
        assert not list(out.glob("*.tmp"))
        if expect_shards:
            assert len(tars) == expect_shards  # 5 + 5 + 2
        uids = []
        for tar_path in tars:
            samples, used = _tar_samples(tar_path)
            assert tar_path.read_bytes() == tar_bytes(samples)  # streamed = written whole, byte for byte
            if out.name == "bytes":
                assert used <= cap and len(samples) >= 2
            listing = pd.read_parquet(tar_path.with_suffix(".parquet"))
            assert listing["raw_key"].tolist() == [k for k, _ in samples]
            uids += [json.loads(dict(m)["json"])["uid"] for _, m in samples]
        assert sorted(uids) == sorted(by_bytes["uid"]) and len(set(uids)) == 12
    assert len(list((tmp_path / "bytes").glob("video-r000-*.tar"))) >= 4


def test_resume_rolls_committed_shards_forward_and_redoes_half_written_ones(tmp_path):
    Hostile.videos = {f"/video/{i}.mp4": _clip(i) for i in range(9)}
    out = tmp_path / "raw"
    with hostile_server() as base:
        path = _video_list(tmp_path, base, 9)
        first = crawl_media("video", path, out, allowed_networks=LOOPBACK, retries=0, threads=2, samples_per_shard=3)
        reference = {p.name: p.read_bytes() for p in out.glob("video-r000-*.tar")}
        # as if killed: shard 1 committed (parquet written) but not yet renamed, shard 2
        # half-written (no parquet), the round not marked done
        (out / "video-r000-00001.tar").rename(out / "video-r000-00001.tar.tmp")
        for suffix in (".parquet", "_stats.json"):
            (out / f"video-r000-00002{suffix}").unlink()
        (out / "video-r000-00002.tar").unlink()
        (out / "video-r000-00002.tar.tmp").write_bytes(b"half a tar")
        (out / "_rounds" / "video" / "r000" / "_DONE").unlink()
        (out / "_SUCCESS-video").unlink()
        hits_before = dict(Hostile.hits)
        again = crawl_media("video", path, out, allowed_networks=LOOPBACK, retries=0, threads=2, samples_per_shard=3)
        hits = dict(Hostile.hits)
    assert not list(out.glob("*.tmp"))
    assert {p.name: p.read_bytes() for p in out.glob("video-r000-*.tar")} == reference
    refetched = {k for k in hits if hits[k] != hits_before.get(k)}
    assert refetched == {f"/video/{i}.mp4" for i in (6, 7, 8)}  # only the half-written shard's samples
    # fetched_at is a real clock (so is the opt-out evidence's): the refetched samples get a
    # new time, every other row its old one
    clocks = ["fetched_at", "optout_evidence"]
    assert again.drop(columns=clocks).equals(first.drop(columns=clocks))
    kept_time = again["shard"] != "video-r000-00002.tar"
    assert again["fetched_at"][kept_time].equals(first["fetched_at"][kept_time])
    assert again["fetched_at"].notna().all() and (again["fetched_at"][~kept_time] > first["fetched_at"][~kept_time]).all()


class _SlowVideos(Hostile):
    def do_GET(self):  # noqa: N802
        time.sleep(0.03)
        super().do_GET()


SIGKILL_SCRIPT = """
import sys
from curation.crawl.media import crawl_media
crawl_media("video", sys.argv[1], sys.argv[2], allowed_networks=("127.0.0.1/32",), retries=0, threads=2,
            samples_per_shard=4, max_shard_bytes=int(sys.argv[3]))
"""


def test_sigkill_mid_video_crawl_then_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from curation.demo.server import serve

    from .conftest import REPO

    clips = {f"/video/{i}.mp4": _clip(i % 7) for i in range(60)}
    Hostile.videos = clips
    cap = 2 * (len(clips["/video/0.mp4"]) + 3 * 1024)
    with serve(_SlowVideos) as base:
        path = _video_list(tmp_path, base, 60)
        run = [sys.executable, "-c", SIGKILL_SCRIPT, str(path)]
        subprocess.run([*run, str(tmp_path / "reference"), str(cap)], cwd=REPO, check=True, timeout=300)
        out = tmp_path / "killed"
        proc = subprocess.Popen([*run, str(out), str(cap)], cwd=REPO, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                len(list(out.glob("video-r000-*.parquet"))) >= 3 and list(out.glob("*.tar.tmp"))):
            time.sleep(0.005)
        assert proc.poll() is None, "crawl finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "_SUCCESS-video").exists()
        for tar_path in out.glob("*.tar"):  # a visible shard is a finished shard
            assert tar_path.with_suffix(".parquet").exists(), tar_path
        subprocess.run([*run, str(out), str(cap)], cwd=REPO, check=True, timeout=300)
    ref = pd.read_parquet(tmp_path / "reference" / "crawl_ledger-video.parquet")
    got = pd.read_parquet(out / "crawl_ledger-video.parquet")
    assert set(got.loc[got["status"] == "kept", "uid"]) == set(ref.loc[ref["status"] == "kept", "uid"])
    assert (got["status"] == "kept").sum() == 60
    uids = []
    for tar_path in sorted(out.glob("video-r*.tar")):
        samples, _ = _tar_samples(tar_path)
        uids += [json.loads(dict(m)["json"])["uid"] for _, m in samples]
    assert len(uids) == len(set(uids)) == 60 and not list(out.glob("*.tmp"))
