"""Thumbnails of a few kept samples per tier and dropped or failed samples per reason.

Which samples: seeded hash order in DuckDB, concentrated on purpose so that little is
read. Per tier, the kept samples come from one tier shard (the first in the seeded order
of its shard names). Per reason, the dropped samples come from one raw shard (the first
in the seeded order among the shards that hold that reason, so reasons tend to share
it), and only while the raw shards are still at hand (the run's local --input, read as
run.json recorded, each shard the size it recorded); at most MAX_RAW_SHARDS are read.
A plain tar is read by offset through its header index (curation/browse/tarindex.py:
only the wanted members' bytes are read); any other raw shard (compressed, parquet, ...)
is streamed by rawshards.read_shard only up to its last wanted sample.

Media are hostile input as everywhere else: images decode through media.open_image
(pixel cap, EXIF, modes), videos are probed (pixel cap) before their first frame is
decoded, members over MAX_MEMBER_BYTES are not read. What cannot be shown becomes a tile
with a note instead of a picture.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import duckdb

from .. import rawshards
from ..inputs import raw_shards_at_hand
from ..media import open_image, probe_video, thumbnail

THUMB_SIDE = 128          # pixels, longest side
THUMB_QUALITY = 70        # JPEG
PER_GROUP = 6             # tiles per tier and per reason
MAX_GROUPS = 60           # reasons shown (the most frequent first)
MAX_RAW_SHARDS = 8        # raw shards read for dropped samples
MAX_MEMBER_BYTES = 64 << 20
CAPTION_CHARS = 140


@dataclasses.dataclass
class Tile:
    uid: str
    caption: str = ""
    jpeg: bytes | None = None
    note: str = ""  # what the tile is (kind), or why it has no picture
    alert: bool = False  # the note is an error (a failed sample's, or why there is no picture)


def _caption(text) -> str:
    text = text if isinstance(text, str) else ""
    text = " ".join(text.split())
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"


def _encode(img) -> bytes:
    small = thumbnail(img.convert("RGB"), THUMB_SIDE)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def _video_still(data: bytes):
    import av

    probe_video(data)  # pixel cap and a decodable frame, or MediaError
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(container.streams.video[0]):
            return frame.to_image()
    return None


def _shown_members(names) -> tuple[list[str], int]:
    """(the members a tile reads: the video or first image, and the caption; how many
    images the sample has)."""
    names = dict.fromkeys(names)
    video = next((e for e in rawshards.VIDEO_EXTS if e in names), None)
    images = rawshards.ordered_images(names) or [e for e in rawshards.IMAGE_EXTS if e in names]
    media = [video] if video is not None else images[:1]
    return media + [e for e in rawshards.TEXT_EXTS if e in names], len(images)


def _slim(files: dict[str, bytes]) -> dict[str, bytes]:
    """Only what a tile shows (a sample may hold 256 members of 256 MiB)."""
    keep, _ = _shown_members(files)
    return {e: (files[e][:4096] if e in rawshards.TEXT_EXTS else files[e]) for e in keep}


def picture(files: dict[str, bytes | None], images: int = 1) -> tuple[bytes | None, str]:
    """(JPEG thumbnail, note) of a sample's first image or its video's first frame;
    `images`: how many the sample has."""
    media = [e for e in _shown_members(files)[0] if e not in rawshards.TEXT_EXTS]
    if not media:
        return None, "no media"
    if files[media[0]] is None:
        return None, f"not shown: over {MAX_MEMBER_BYTES >> 20} MiB"
    try:
        if media[0] in rawshards.VIDEO_EXTS:
            still = _video_still(files[media[0]])
            return (_encode(still), f"video ({media[0]})") if still is not None else (None, "no video frame")
        return _encode(open_image(files[media[0]])), (f"document, {images} images" if images > 1 else "")
    except Exception as exc:  # hostile media: any decoder error means no picture, never no report
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return None, f"not shown: {reason}"


# ----------------------------------------------------------------- reading
def _indexed_samples(path: Path, keys: set[str]) -> dict[str, tuple[dict[str, bytes], int]]:
    """{key: (files a tile shows, images in the sample)} of the wanted samples of a plain
    local tar, read by offset through its header index (browse.tarindex: hostile headers
    handled there); raises ValueError for a compressed file or one that is not a tar."""
    from ..browse.tarindex import TarIndex, read_range

    index = TarIndex(path)
    found = {}
    for key in keys:
        names = index.sample_members(key)
        if not names:
            continue
        shown, images = _shown_members(names)
        files = {}
        for ext in shown:
            member = index.members[f"{key}.{ext}"]
            text = ext in rawshards.TEXT_EXTS
            small = text or member.size <= MAX_MEMBER_BYTES
            files[ext] = b"".join(read_range(path, member, end=4095 if text else None)) if small else None
        found[key] = (files, images)
    return found


def _raw_samples(ref, keys: set[str], source: str) -> dict[str, tuple[dict[str, bytes], int]]:
    """{raw_key: (files a tile shows, images)} of the wanted samples of a raw shard: by offset when it is a plain
    local tar, else streamed by read_shard (never raises on content) only up to the last
    of them."""
    if getattr(ref, "format", "tar") == "tar" and not ref.remote:
        try:
            return _indexed_samples(Path(ref.url), keys)
        except ValueError:
            pass  # compressed: streamed below
    found = {}
    for row, files in rawshards.read_shard(ref, source):
        key = row.get("raw_key")
        if key in keys:
            found[key] = (_slim(files), _shown_members(files)[1])
            if len(found) == len(keys):
                break
    return found


def _text_of(files: dict[str, bytes]) -> str:
    for ext in rawshards.TEXT_EXTS:
        data = files.get(ext)
        if data:
            return data[:4096].decode("utf-8", errors="replace")
    return ""


# ----------------------------------------------------------------- choosing
def kept_tiles(con: duckdb.DuckDBPyConnection, run_root: Path, seed: int,
               per_group: int = PER_GROUP) -> dict[str, list[Tile]]:
    """{tier: tiles} of seeded random kept samples, each tier's from one of its shards."""
    picks = con.execute("""
        SELECT tier, arg_min(shard, hash(shard, $seed)), arg_min(path, hash(shard, $seed))
        FROM shards WHERE samples > 0 GROUP BY tier ORDER BY tier""", {"seed": seed}).fetchall()
    tiers_dir = (run_root / "tiers").resolve()
    out: dict[str, list[Tile]] = {}
    for tier, shard, path in picks:
        rows = con.execute("""
            SELECT key, uid, kind, text FROM samples WHERE tier = $tier AND shard = $shard
            ORDER BY hash(uid, $seed) LIMIT $k""", {"tier": tier, "shard": shard, "seed": seed, "k": per_group}).fetchall()
        tar = Path(path).resolve()
        media: dict[str, tuple[dict[str, bytes], int]] = {}
        note = ""
        if tar.parent.parent != tiers_dir or not tar.is_file():  # only the run's own tier tars
            note = "not shown: tier shard missing"
        else:
            try:
                media = _indexed_samples(tar, {r[0] for r in rows})
            except (OSError, ValueError) as exc:
                note = f"not shown: {type(exc).__name__}"
        tiles = []
        for key, uid, kind, text in rows:
            jpeg, why = picture(*media[key]) if key in media else (None, note or "not shown: not in its shard")
            tiles.append(Tile(uid, _caption(text), jpeg, why or kind, alert=jpeg is None))
        out[tier] = tiles
    return out


def dropped_tiles(con: duckdb.DuckDBPyConnection, run_root: Path, seed: int, per_group: int = PER_GROUP,
                  max_raw_shards: int = MAX_RAW_SHARDS) -> dict[tuple[str, str], list[Tile]]:
    """{(status, reason): tiles} of seeded random dropped and failed samples per reason."""
    rows = con.execute("""
        WITH groups AS (
            SELECT status, coalesce(reason, '') AS reason, count(*) AS n,
                   arg_min(raw_shard, hash(raw_shard, $seed)) FILTER (WHERE raw_shard IS NOT NULL) AS pick
            FROM ledger WHERE status <> 'kept' GROUP BY ALL ORDER BY n DESC, status, reason LIMIT $groups)
        SELECT g.status, g.reason, l.uid, l.raw_shard, l.raw_key, l.url, l.error
        FROM ledger l JOIN groups g
          ON l.status = g.status AND coalesce(l.reason, '') = g.reason AND l.raw_shard IS NOT DISTINCT FROM g.pick
        QUALIFY row_number() OVER (PARTITION BY g.status, g.reason ORDER BY hash(l.uid, $seed)) <= $k
        ORDER BY g.n DESC, g.status, g.reason, hash(l.uid, $seed)""",
                       {"seed": seed, "k": per_group, "groups": MAX_GROUPS}).fetchall()
    wanted: dict[str, set[str]] = {}
    for _, _, _, shard, key, _, _ in rows:
        if shard is not None and key is not None:
            wanted.setdefault(shard, set()).add(key)
    refs, source, _ = raw_shards_at_hand(run_root) if wanted else ({}, "", "")
    # The shards most groups need first; the rest are not read.
    order = sorted((s for s in wanted if s in refs), key=lambda s: -sum(1 for r in rows if r[3] == s))
    read = {}
    for shard in order[:max_raw_shards]:
        try:
            read[shard] = _raw_samples(refs[shard], wanted[shard], source)
        except Exception as exc:  # an object store or disk error: those tiles say so
            read[shard] = exc
    out: dict[tuple[str, str], list[Tile]] = {}
    for status, reason, uid, shard, key, url, error in rows:
        got = read.get(shard)
        if shard is None:
            tile = Tile(uid, _caption(url), None, _caption(error) or "never reached a raw shard")
        elif isinstance(got, Exception):
            tile = Tile(uid, _caption(url), None, f"not shown: {type(got).__name__}")
        elif got is None:
            tile = Tile(uid, _caption(url), None, "not shown: raw shard not at hand" if shard not in refs
                        else "not shown: raw shard not read (bound)")
        elif key not in got:
            tile = Tile(uid, _caption(url), None, "not shown: not in its raw shard")
        else:
            files, images = got[key]
            jpeg, why = picture(files, images)
            if jpeg is not None and status == "failed":
                why = _caption(error)
            tile = Tile(uid, _caption(_text_of(files) or url), jpeg, why, alert=jpeg is None or status == "failed")
        out.setdefault((status, reason), []).append(tile)
    return out
