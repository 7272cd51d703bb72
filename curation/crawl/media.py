"""Crawl interleaved documents and videos through the fetch policy, in rounds.

* interleaved: one sample per document (OBELICS/MMC4 style: an ordered list of text
  blocks and image urls). All of its images are fetched and decoded; the document is
  kept only if the images it needs arrived (`require_images`: "all" or "any"), and its
  json records which are missing. A transient image failure makes the whole document
  retryable on the next crawl.
* video: direct mp4/webm urls with captions, fetched under the video size cap, probed
  with PyAV (duration, fps, resolution, codec, frames; the first frame is decoded to
  prove the file plays) and stored whole.

Each round's items are cut into shards of `samples_per_shard`; a shard is written as
tar + parquet (one row per attempted sample) + _stats.json, atomically, and skipped
when a crawl resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pandas as pd

from ..errors import InputError
from ..fsutil import atomic_write_bytes, atomic_write_parquet, atomic_write_text
from ..ids import make_uid
from ..wds import tar_bytes
from .fetch import FetchPolicy, fetch
from .image_text import valid_url
from .rounds import crawl_in_rounds
from .sources import read_url_list


# --------------------------------------------------------------------------- inputs
def _normalise_items(row: dict) -> list[dict]:
    """Either `items: [{type: text|image, text|url}]` or OBELICS' parallel `texts`/`images`."""
    if isinstance(row.get("items"), (list, tuple)) or hasattr(row.get("items"), "tolist"):
        items = list(row["items"])
        return [{"type": "image", "url": it.get("url")} if it.get("type") == "image"
                else {"type": "text", "text": it.get("text") or ""} for it in items]
    texts, images = row.get("texts"), row.get("images")
    if texts is None or images is None:
        raise InputError("a document needs 'items' or both 'texts' and 'images'")
    out = []
    for text, image in zip(list(texts), list(images)):
        if image:
            out.append({"type": "image", "url": image})
        elif text:
            out.append({"type": "text", "text": text})
    return out


def read_documents(path: str | Path, source: str | None = None) -> pd.DataFrame:
    """Columns: uid, position, source, url (the document's own url, if any), caption (its
    text, for the ledger), doc (JSON items), meta."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"document list not found: {path}")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
    except Exception as exc:
        raise InputError(f"cannot read document list {path}: {type(exc).__name__}: {exc}") from None
    if df.empty:
        raise InputError(f"document list {path} has no rows")
    source = source or path.stem
    rows = []
    for position, rec in enumerate(df.to_dict(orient="records")):
        try:
            items = _normalise_items(rec)
        except InputError as exc:
            raise InputError(f"document list {path}, row {position}: {exc}") from None
        doc_id = rec.get("doc_id") or rec.get("id")
        rows.append({"uid": make_uid(source, position), "position": position, "source": source,
                     "url": rec.get("url") if isinstance(rec.get("url"), str) else None,
                     "caption": "\n".join(i["text"] for i in items if i["type"] == "text"),
                     "doc": json.dumps({"doc_id": None if doc_id is None else str(doc_id), "items": items}),
                     "meta": None})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- fetching
def _image_ext(data: bytes) -> str:
    from PIL import Image

    fmt = Image.open(io.BytesIO(data)).format
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt, "jpg")


def fetch_document(row: dict, policy: FetchPolicy, require_images: str = "all") -> dict:
    doc = json.loads(row["doc"])
    image_urls = [it["url"] for it in doc["items"] if it["type"] == "image"]
    if not image_urls:
        return {"status": "dropped", "reason": "no_images", "error": None, "transient": False}
    outcomes = [fetch(u, "image", policy) if valid_url(u) else None for u in image_urls]
    arrived = [o for o in outcomes if o is not None and o.status == "kept"]
    missing = [u for u, o in zip(image_urls, outcomes) if o is None or o.status != "kept"]
    enough = not missing if require_images == "all" else bool(arrived)
    if not enough:
        transient = any(o is not None and o.transient for o in outcomes)
        errors = "; ".join(f"{u}: {o.reason if o else 'bad_url'}" for u, o in zip(image_urls, outcomes)
                           if o is None or o.status != "kept")
        return {"status": "failed" if transient else "dropped", "reason": "missing_images", "error": errors[:2000],
                "transient": transient}
    files, member_of = [], {}
    for u, o in zip(image_urls, outcomes):
        if o is not None and o.status == "kept":
            name = f"{len(files)}.{_image_ext(o.data)}"
            files.append((name, o.data))
            member_of[u] = name
    items = [({**it, "member": member_of.get(it["url"])} if it["type"] == "image" else it) for it in doc["items"]]
    meta = {"uid": row["uid"], "kind": "interleaved", "source": row["source"], "url": row.get("url"),
            "doc_id": doc["doc_id"], "items": items, "missing_images": missing,
            "sha256": hashlib.sha256(b"".join(hashlib.sha256(d).digest() for _, d in files)).hexdigest()}
    return {"status": "kept", "reason": None, "error": None, "transient": False, "files": files,
            "text": row.get("caption") or "", "meta": meta}


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
    if o.status != "kept":
        return {"status": o.status, "reason": o.reason, "error": o.error, "transient": o.transient}
    try:
        probe = probe_video(o.data)
    except Exception as exc:  # PyAV raises many types for bad media
        return {"status": "failed", "reason": "probe_error", "error": f"{type(exc).__name__}: {exc}", "transient": False}
    ext = "webm" if o.data[:4] == b"\x1a\x45\xdf\xa3" else "mp4"
    meta = {"uid": row["uid"], "kind": "video", "source": row["source"], "url": row["url"],
            "caption": row.get("caption"), "probe": probe, "sha256": hashlib.sha256(o.data).hexdigest(),
            "meta": row.get("meta")}
    return {"status": "kept", "reason": None, "error": None, "transient": False, "files": [(ext, o.data)],
            "text": row.get("caption") or "", "meta": meta}


# --------------------------------------------------------------------------- rounds
def read_media_shard(pq_path: Path) -> pd.DataFrame:
    return pd.read_parquet(pq_path, columns=["uid", "raw_key", "status", "reason", "error", "transient"])


def _run_round(round_dir: Path, prefix: str, out_dir: Path, fetch_one: Callable[[dict], dict], *,
               threads: int, samples_per_shard: int) -> None:
    items = pd.read_parquet(round_dir / "items.parquet").to_dict(orient="records")
    with ThreadPoolExecutor(threads) as pool:
        for shard_no, start in enumerate(range(0, len(items), samples_per_shard)):
            name = f"{prefix}-{shard_no:05d}"
            if (out_dir / f"{name}.parquet").exists():
                continue  # committed before a crash
            chunk = items[start:start + samples_per_shard]
            results = list(pool.map(fetch_one, chunk))
            samples, rows = [], []
            for i, (item, res) in enumerate(zip(chunk, results)):
                key = f"{shard_no:05d}{i:05d}"
                rows.append({"uid": item["uid"], "raw_key": key if res["status"] == "kept" else None,
                             **{k: res[k] for k in ("status", "reason", "error", "transient")}})
                if res["status"] == "kept":
                    members = list(res["files"]) + [("txt", res["text"].encode()),
                                                    ("json", json.dumps(res["meta"], sort_keys=True).encode())]
                    samples.append((key, members))
            atomic_write_bytes(out_dir / f"{name}.tar", tar_bytes(samples))
            frame = pd.DataFrame(rows)
            stats = frame.groupby(["status", "reason"], dropna=False).size()
            atomic_write_text(out_dir / f"{name}_stats.json", json.dumps(
                {"count": len(rows), "successes": int((frame["status"] == "kept").sum()),
                 "status_dict": {("kept" if s == "kept" else f"{s}:{r}"): int(n) for (s, r), n in stats.items()}},
                indent=2))
            atomic_write_parquet(frame, out_dir / f"{name}.parquet")  # last: marks the shard done


def crawl_media(kind: str, input_path: str | Path, out_dir: str | Path, *, url_col: str | None = None,
                caption_col: str | None = None, source: str | None = None, allow_private: bool = False,
                allowed_networks: tuple[str, ...] = (), threads: int = 16, samples_per_shard: int = 100,
                timeout: float = 10, retries: int = 2, require_images: str = "all",
                policy: FetchPolicy | None = None) -> pd.DataFrame:
    """Crawl (or resume) documents (kind="interleaved") or videos (kind="video")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = policy or FetchPolicy(timeout=timeout, retries=retries, allow_private=allow_private,
                                   allowed_networks=tuple(allowed_networks))
    if kind == "interleaved":
        items = read_documents(input_path, source)
        valid = pd.Series(True, index=items.index)
        fetch_one = lambda row: fetch_document(row, policy, require_images)  # noqa: E731
    elif kind == "video":
        items = read_url_list(input_path, url_col=url_col, caption_col=caption_col, source=source)
        valid = items["url"].map(valid_url)
        fetch_one = lambda row: fetch_video(row, policy)  # noqa: E731
    else:
        raise InputError(f"unknown crawl kind {kind!r}")
    return crawl_in_rounds(items, valid, out_dir, kind,
                           lambda round_dir, prefix: _run_round(round_dir, prefix, out_dir, fetch_one, threads=threads,
                                                                samples_per_shard=samples_per_shard),
                           read_media_shard)
