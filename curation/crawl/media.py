"""Crawl interleaved documents and videos through the fetch policy, in rounds.

* interleaved: one sample per document (OBELICS/MMC4 style: an ordered list of text
  blocks and image urls). All of its images are fetched and decoded; the document is
  kept only if the images it needs arrived (`require_images`: "all" or "any"), and its
  json records which are missing. A transient image failure makes the whole document
  retryable on the next crawl.
* video: direct mp4/webm urls with captions, fetched under the video size cap, probed
  with PyAV (duration, fps, resolution, codec, frames; the first frame is decoded to
  prove the file plays) and stored whole.

* Document formats (items, MMC4, OBELICS) are read by documents.py. A malformed
  document is dropped as `bad_document` with what is wrong, one over the caps as
  `document_too_large`; the crawl goes on. What a document carries besides its items
  (document url, per-image metadata) goes into the sample json's `meta`, which curation
  keeps as `source_meta`.

Samples stream into the shard being written as they arrive (in input order), so the
crawler holds about 2 x threads samples, not a shard. A shard closes at
`samples_per_shard` attempted samples or `max_shard_bytes` (1 GiB) of tar, whichever
comes first, and is published atomically: tar (written as NAME.tar.tmp, renamed when
complete), _stats.json, then the parquet (one row per attempted sample) that marks it
finished. A resumed round skips the uids of finished shards and rewrites the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd
import pyarrow.parquet as pq

from ..errors import InputError
from ..fsutil import atomic_write_parquet, atomic_write_text
from ..kinds import INTERLEAVED, VIDEO, is_kind, kind_of
from ..wds import _tarinfo
from .documents import SAMPLE_CAPS, read_documents
from .fetch import FetchPolicy, fetch
from .guard import url_problem
from .optout import HostSignals, OptOutPolicy, evidence_json, merge, round_store
from .rounds import crawl_in_rounds
from .sources import read_url_list

GiB = 1 << 30


# --------------------------------------------------------------------------- fetching
def _image_ext(data: bytes) -> str:
    from PIL import Image

    fmt = Image.open(io.BytesIO(data)).format
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt, "jpg")


def _too_large(error: str) -> dict:
    return {"status": "dropped", "reason": "document_too_large", "error": error, "transient": False}


def fetch_stamp(outcomes: list) -> dict:
    """A document's fetch time and HTTP status for the ledger: when its first image was
    fetched; the first image that did not arrive's status (None: no response), else 200;
    and every image's opt-out evidence."""
    fetched = [o for o in outcomes if o is not None]
    missing = [o for o in fetched if o.status != "kept"]
    return {"fetched_at": fetched[0].fetched_at if fetched else None,
            "http_status": missing[0].http_status if missing else (200 if fetched else None),
            "optout_evidence": merge([e for o in fetched for e in o.evidence]) or None}


def fetch_document(row: dict, policy: FetchPolicy, require_images: str = "all") -> dict:
    doc = json.loads(row["doc"])
    image_urls = [it["url"] for it in doc["items"] if it["type"] == "image"]
    if not image_urls:
        return {"status": "dropped", "reason": "no_images", "error": None, "transient": False}
    # The whole sample must fit what curation reads of one raw sample: stop fetching
    # once the images alone are over it, instead of holding them all first.
    outcomes, fetched_bytes = [], 0
    for u in image_urls:
        o = fetch(u, "image", policy) if url_problem(u) is None else None
        outcomes.append(o)
        fetched_bytes += len(o.data) if o is not None and o.status == "kept" else 0
        if fetched_bytes > SAMPLE_CAPS.max_sample_bytes:
            return {**_too_large(f"its images are over {SAMPLE_CAPS.max_sample_bytes} bytes after {len(outcomes)} "
                                 f"of {len(image_urls)}"), **fetch_stamp(outcomes)}
    stamp = fetch_stamp(outcomes)
    arrived = [o for o in outcomes if o is not None and o.status == "kept"]
    missing = [u for u, o in zip(image_urls, outcomes) if o is None or o.status != "kept"]
    enough = not missing if require_images == "all" else bool(arrived)
    if not enough:
        transient = any(o is not None and o.transient for o in outcomes)
        errors = "; ".join(f"{u}: {o.reason if o else 'bad_url'}" for u, o in zip(image_urls, outcomes)
                           if o is None or o.status != "kept")
        return {"status": "failed" if transient else "dropped", "reason": "missing_images", "error": errors[:2000],
                "transient": transient, **stamp}
    files, members = [], []  # members: per image item, in order (urls need not be hashable, or unique)
    for o in outcomes:
        if o is not None and o.status == "kept":
            name = f"{len(files)}.{_image_ext(o.data)}"
            files.append((name, o.data))
            members.append(name)
        else:
            members.append(None)
    member_iter = iter(members)
    items = [({**it, "member": next(member_iter)} if it["type"] == "image" else it) for it in doc["items"]]
    meta = {"uid": row["uid"], "kind": INTERLEAVED.name, "source": row["source"], "url": row.get("url"),
            "doc_id": doc["doc_id"], "items": items, "missing_images": missing, "meta": row.get("meta"),
            "sha256": hashlib.sha256(b"".join(hashlib.sha256(d).digest() for _, d in files)).hexdigest()}
    res = {"status": "kept", "reason": None, "error": None, "transient": False, "files": files,
           "text": row.get("caption") or "", "meta": meta, **stamp}
    sizes = {ext: len(data) for ext, data in sample_members(res)}
    if sizes["json"] > SAMPLE_CAPS.max_json_bytes:
        return {**_too_large(f"its json is {sizes['json']} bytes (at most {SAMPLE_CAPS.max_json_bytes})"), **stamp}
    if sizes["txt"] > SAMPLE_CAPS.max_text_bytes:
        return {**_too_large(f"its text is {sizes['txt']} bytes (at most {SAMPLE_CAPS.max_text_bytes})"), **stamp}
    if sum(sizes.values()) > SAMPLE_CAPS.max_sample_bytes:
        return {**_too_large(f"the sample is {sum(sizes.values())} bytes (at most {SAMPLE_CAPS.max_sample_bytes})"),
                **stamp}
    return res


def probe_video(data: bytes) -> dict:
    """Duration, fps, size, codec and frame count, with PyAV (decord when PyAV is absent).
    Decodes the first frame, so a file that cannot play fails here, not in training."""
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV is a dependency; decord is the fallback
        import decord

        vr = decord.VideoReader(io.BytesIO(data))
        h, w = vr[0].shape[:2]
        fps = float(vr.get_avg_fps())
        return {"duration": len(vr) / fps if fps else None, "fps": fps, "width": w, "height": h,
                "codec": None, "num_frames": len(vr)}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(video=0))
        duration = (float(container.duration) / av.time_base if container.duration
                    else float(stream.duration * stream.time_base) if stream.duration else None)
        return {"duration": duration, "fps": float(stream.average_rate) if stream.average_rate else None,
                "width": frame.width, "height": frame.height, "codec": stream.codec_context.name,
                "num_frames": stream.frames or None}


def fetch_video(row: dict, policy: FetchPolicy) -> dict:
    o = fetch(row["url"], "video", policy)
    stamp = {"fetched_at": o.fetched_at, "http_status": o.http_status, "optout_evidence": o.evidence or None}
    if o.status != "kept":
        return {"status": o.status, "reason": o.reason, "error": o.error, "transient": o.transient, **stamp}
    try:
        probe = probe_video(o.data)
    except Exception as exc:  # PyAV raises many types for bad media
        return {"status": "failed", "reason": "probe_error", "error": f"{type(exc).__name__}: {exc}", "transient": False,
                **stamp}
    ext = "webm" if o.data[:4] == b"\x1a\x45\xdf\xa3" else "mp4"
    meta = {"uid": row["uid"], "kind": VIDEO.name, "source": row["source"], "url": row["url"],
            "caption": row.get("caption"), "probe": probe, "sha256": hashlib.sha256(o.data).hexdigest(),
            "meta": row.get("meta")}
    return {"status": "kept", "reason": None, "error": None, "transient": False, "files": [(ext, o.data)],
            "text": row.get("caption") or "", "meta": meta, **stamp}


# --------------------------------------------------------------------------- rounds
# A raw shard's listing: one row per attempted sample (fetched_at: a real time, so the
# listing is the one crawl output that differs between two crawls of the same list;
# optout_evidence: JSON text of optout.evaluate entries).
LISTING_COLUMNS = ["uid", "raw_key", "status", "reason", "error", "transient", "http_status", "fetched_at",
                   "optout_evidence"]


def read_media_shard(pq_path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(pq_path, columns=[c for c in LISTING_COLUMNS if c in pq.read_schema(pq_path).names])
    if "optout_evidence" in frame:
        frame["optout_evidence"] = [json.loads(v) if isinstance(v, str) else None for v in frame["optout_evidence"]]
    return frame


def _tar_size(files: list[tuple[str, bytes]]) -> int:
    """Bytes these members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in files)


class ShardWriter:
    """One raw shard, written as its samples arrive: tar members stream into
    NAME.tar.tmp (never visible as a shard). publish() closes and fsyncs the tar, writes
    NAME_stats.json, then NAME.parquet (the commit: the shard is finished), and last
    renames NAME.tar.tmp to NAME.tar. So a visible .tar always has its parquet. A crash
    before the parquet leaves a .tmp that the resumed round deletes; a crash after it
    leaves a complete .tar.tmp that the resumed round renames (roll_forward). The tar is
    byte-identical to wds.tar_bytes of the same samples."""

    def __init__(self, out_dir: Path, name: str, shard_no: int):
        self.out_dir, self.name, self.shard_no = out_dir, name, shard_no
        self.tmp = out_dir / f"{name}.tar.tmp"
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict] = []

    @property
    def bytes(self) -> int:
        return self._tar.offset

    def add(self, item: dict, res: dict) -> None:
        key = f"{self.shard_no:05d}{len(self.rows):05d}"
        kept = res["status"] == "kept"
        self.rows.append({"uid": item["uid"], "raw_key": key if kept else None,
                          **{k: res[k] for k in ("status", "reason", "error", "transient")},
                          "http_status": res.get("http_status"), "fetched_at": res.get("fetched_at"),
                          "optout_evidence": evidence_json(res["optout_evidence"]) if res.get("optout_evidence") else None})
        if kept:
            for ext, data in sample_members(res):
                self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))

    def publish(self) -> None:
        self._tar.close()  # end-of-archive blocks; the file object stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        frame = pd.DataFrame(self.rows, columns=LISTING_COLUMNS)
        frame["http_status"] = frame["http_status"].astype("Int32")
        frame["fetched_at"] = pd.to_datetime(frame["fetched_at"], utc=True).astype("datetime64[us, UTC]")
        stats = frame.groupby(["status", "reason"], dropna=False).size()
        atomic_write_text(self.out_dir / f"{self.name}_stats.json", json.dumps(
            {"count": len(self.rows), "successes": int((frame["status"] == "kept").sum()),
             "status_dict": {("kept" if s == "kept" else f"{s}:{r}"): int(n) for (s, r), n in stats.items()}},
            indent=2))
        atomic_write_parquet(frame, self.out_dir / f"{self.name}.parquet")  # the commit
        os.replace(self.tmp, self.out_dir / f"{self.name}.tar")

    def abandon(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def sample_members(res: dict) -> list[tuple[str, bytes]]:
    return list(res["files"]) + [("txt", res["text"].encode()),
                                 ("json", json.dumps(res["meta"], sort_keys=True).encode())]


def _safe(fetch_one: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """A bug in one sample's handling fails that sample, not the crawl."""
    def run(item: dict) -> dict:
        try:
            return fetch_one(item)
        except Exception as exc:  # noqa: BLE001 - recorded in the ledger
            return {"status": "failed", "reason": "crawl_error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "transient": False}
    return run


def _in_order(pool: ThreadPoolExecutor, fn: Callable[[dict], dict], items: Iterable[dict],
              window: int) -> Iterator[tuple[dict, dict]]:
    """(item, fn(item)) in input order, with at most `window` items submitted and not yet
    taken: memory holds `window` samples, however large the shard."""
    todo = iter(items)
    pending: deque = deque()
    for item in todo:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            break
    while pending:
        item, future = pending.popleft()
        res = future.result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt)))
        yield item, res


def roll_forward(out_dir: Path, prefix: str) -> None:
    """After a crash: a committed shard's tar (parquet written, rename not yet done) is
    renamed into place; every other temporary file of the round is half-written: deleted."""
    for tmp in sorted(out_dir.glob(f"{prefix}-*.tmp")):
        name = tmp.name[: -len(".tar.tmp")] if tmp.name.endswith(".tar.tmp") else None
        if name and (out_dir / f"{name}.parquet").exists():
            os.replace(tmp, out_dir / f"{name}.tar")
        else:
            tmp.unlink(missing_ok=True)


def _run_round(round_dir: Path, prefix: str, out_dir: Path, fetch_one: Callable[[dict], dict], *,
               threads: int, samples_per_shard: int, max_shard_bytes: int = GiB,
               signals: HostSignals | None = None) -> None:
    """Fetch the round's items into shards of at most `samples_per_shard` rows and (unless
    one sample alone is larger) `max_shard_bytes` bytes of tar. Shards are written in input
    order, one at a time, so the finished ones (those with a parquet) cover a prefix of
    the items; a resumed round skips their uids and goes on with the next shard number."""
    items = pd.read_parquet(round_dir / "items.parquet").to_dict(orient="records")
    if signals is not None:  # each round asks the hosts again, and keeps what they said
        signals.__init__(round_store(round_dir))
    roll_forward(out_dir, prefix)
    done: set = set()
    next_no = 0
    for pq_path in sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9].parquet")):
        done.update(pd.read_parquet(pq_path, columns=["uid"])["uid"])
        next_no = max(next_no, int(pq_path.stem.rsplit("-", 1)[1]) + 1)
    todo = [it for it in items if it["uid"] not in done]
    writer: ShardWriter | None = None
    try:
        with ThreadPoolExecutor(threads) as pool:
            for item, res in _in_order(pool, _safe(fetch_one), todo, window=2 * threads):
                size = _tar_size(sample_members(res)) if res["status"] == "kept" else 0
                if writer is not None and (len(writer.rows) >= samples_per_shard
                                           or (writer.bytes and writer.bytes + size > max_shard_bytes)):
                    writer.publish()
                    writer = None
                if writer is None:
                    writer = ShardWriter(out_dir, f"{prefix}-{next_no:05d}", next_no)
                    next_no += 1
                writer.add(item, res)
                del res
            if writer is not None:
                writer.publish()
                writer = None
    finally:
        if writer is not None:  # an exception (or KeyboardInterrupt) mid-shard
            writer.abandon()


def document_items(input_path, policy: FetchPolicy, source: str | None, require_images: str):
    """A document crawl's (items, valid, refusals, fetch_one): documents as read_documents
    reads them, those it refused as refusals."""
    items = read_documents(input_path, source)
    valid = items["problem"].isna()
    refusals = pd.DataFrame({"reason": items["problem_reason"], "error": items["problem"]}, index=items.index)
    return items, valid, refusals, lambda row: fetch_document(row, policy, require_images)


def video_items(input_path, policy: FetchPolicy, url_col: str | None, caption_col: str | None, source: str | None):
    """A video crawl's (items, valid, refusals, fetch_one): a url list."""
    items = read_url_list(input_path, url_col=url_col, caption_col=caption_col, source=source)
    valid = items["url"].map(lambda u: url_problem(u) is None)
    return items, valid, None, lambda row: fetch_video(row, policy)


def crawl_media(kind: str, input_path: str | Path, out_dir: str | Path, *, url_col: str | None = None,
                caption_col: str | None = None, source: str | None = None, allow_private: bool = False,
                allowed_networks: tuple[str, ...] = (), threads: int = 16, samples_per_shard: int = 100,
                timeout: float = 10, retries: int = 2, require_images: str = "all",
                max_shard_bytes: int = GiB, policy: FetchPolicy | None = None,
                optout: OptOutPolicy | None = None) -> pd.DataFrame:
    """Crawl (or resume) documents (kind="interleaved") or videos (kind="video"). A raw
    shard closes at `samples_per_shard` attempted samples or `max_shard_bytes` of tar,
    whichever comes first; memory holds about 2 x `threads` samples, not a shard."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = policy or FetchPolicy(timeout=timeout, retries=retries, allow_private=allow_private,
                                   allowed_networks=tuple(allowed_networks), optout=optout or OptOutPolicy())
    if not is_kind(kind):
        raise InputError(f"unknown crawl kind {kind!r}")
    items, valid, refusals, fetch_one = kind_of(kind).crawl_items(  # curation.kinds: which reader and fetch
        input_path, policy, url_col=url_col, caption_col=caption_col, source=source, require_images=require_images)
    return crawl_in_rounds(items, valid, out_dir, kind,
                           lambda round_dir, prefix: _run_round(round_dir, prefix, out_dir, fetch_one, threads=threads,
                                                                samples_per_shard=samples_per_shard,
                                                                max_shard_bytes=max_shard_bytes,
                                                                signals=policy.signals),
                           read_media_shard, refusals)
