"""Interleaved documents and videos crawled through the fetch policy (hostile server on
127.0.0.1): keep rules, missing images recorded, probes, transient retries."""

import io
import json
import tarfile

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
    assert (probe["width"], probe["height"], probe["num_frames"], probe["codec"]) == (96, 96, 24, "mpeg4")
    with pytest.raises(Exception):
        probe_video(io.BytesIO(b"not a video").getvalue())
