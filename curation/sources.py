"""Raw inputs that are not WebDataset tars: Hugging Face parquet, a `save_to_disk` folder
and a plain folder of images or videos with sidecar captions.

Each is read into the same samples as a tar (`rawshards._walk` dispatches here on
`ShardRef.format`): a key and its members `{ext: bytes}`, with the same caps
(member_too_large, sample_too_large, text_too_large, ...), so `sample_row`, stage A,
stage C and the exports see no difference. Nothing in the data is ever opened as a path.

* "parquet": one shard per parquet file, read in record batches of BATCH_ROWS rows, never
  a whole file; pyarrow holds one column chunk of a row group at a time (HF writes image
  datasets in row groups of 100 rows), so a row group over ReadCaps.max_row_group_bytes
  fails its rows `row_group_too_large` unread. "arrow": one shard per Arrow IPC file of a `save_to_disk` folder
  (stream format, as `datasets` writes it; the file format too), read batch by batch as
  written. A row is a sample keyed by its index, zero padded ("000000042"):
  - the image column as HF's Image struct {bytes, path}, plain binary, or a list of them
    (several images -> members "0.jpg", "1.png", ...: a document);
  - the video column likewise; the text column (a string) -> the `txt` member; the url
    column -> the sample's url;
  - every other column -> the sample's producer metadata (source_meta, queryable):
    bytes left out, values over MAX_META_VALUE_BYTES of JSON left out, at most
    MAX_META_BYTES in all.
  A member is named by its bytes (png, webp, else jpg; webm, else mp4); a tier names it
  by its real format anyway. An image struct with null bytes and a path fails the row
  `image_not_embedded` (the path is never opened).
  Columns are named by ShardRef's *_column fields, else found (`plan_columns`): the HF
  features in the schema's "huggingface" metadata (Image, Video, a List of Image), else
  by type (a {bytes, path} struct, binary) and name; the text column is the first string
  column named as in TEXT_NAMES, the url column as in URL_NAMES. A file without an image
  or video column is unreadable_shard.
  A file that cannot be opened is one unreadable_shard row; a parquet row group that
  cannot be decoded fails each of its rows `unreadable_rows` (the footer says how many,
  so counting reads only the footer); an Arrow stream that breaks off gives its rows
  before and one `unreadable_rows` row for the rest. A file claiming more than
  ReadCaps.max_rows_per_file rows is unreadable_shard.
* "files": a chunk of FILES_PER_SHARD samples of a folder, in path order. A sample is the
  files of one stem in one folder (`cat.jpg`, `cat.txt` or `cat.caption`, `cat.json`
  with the producer's metadata, read as a tar's json member), keyed by its path without
  the extension ("sub/cat"). Only stems with an image or video file are samples. Videos
  (mp4, webm, mkv, mov) are probed from the file later, as in a tar.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

from .errors import InputError
from .inputs import ShardIOError, ShardRef, open_shard
from .rawshards import (IMAGE_EXTS, TEXT_EXTS, VIDEO_EXTS, ReadCaps, _describe, _one_line, _Sample, _stopped,
                        _WalkState)

BATCH_ROWS = 16            # parquet rows decoded at a time (a batch of images is a few MB)
FILES_PER_SHARD = 1000     # samples per chunk of a plain folder
KEY_WIDTH = 9              # row keys: "000000042"
MAX_META_VALUE_BYTES = 16 << 10  # one column's value in source_meta (as JSON); a bigger one is left out
MAX_META_BYTES = 256 << 10       # all of them (columns in schema order; the rest are left out)
MAX_INFO_BYTES = 16 << 20        # state.json, dataset_info.json, dataset_dict.json
TEXT_NAMES = ("text", "caption", "txt", "alt", "alt_text", "prompt", "description", "sentence")
URL_NAMES = ("url", "image_url", "video_url", "link")
IMAGE_NAMES = ("image", "images", "img", "jpg", "jpeg", "png", "webp", "picture", "photo", "image_bytes")
VIDEO_NAMES = ("video", "videos", "mp4", "webm", "video_bytes")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
SIDECAR_EXTS = TEXT_EXTS + ("json",)
_HF_IMAGE, _HF_VIDEO, _HF_LISTS = "Image", "Video", ("List", "LargeList", "Sequence")


# --------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Columns:
    """Which column is what in one file (plan_columns)."""
    image: str | None
    image_list: bool
    video: str | None
    video_list: bool
    text: str | None
    url: str | None
    meta: tuple[str, ...]


def hf_features(schema) -> dict:
    """The HF features a parquet or arrow schema declares ({} when none or unreadable)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw or len(raw) > MAX_INFO_BYTES:
        return {}
    try:
        info = json.loads(raw)
        features = info.get("info", {}).get("features", {})
    except (ValueError, AttributeError, RecursionError):
        return {}
    return features if isinstance(features, dict) else {}


def _feature_media(feature) -> tuple[str | None, bool]:
    """An HF feature -> ("Image" | "Video" | None, is a list)."""
    if isinstance(feature, list) and len(feature) == 1:  # the old `[Image()]` spelling
        return _feature_media(feature[0])[0], True
    if not isinstance(feature, dict):
        return None, False
    kind = feature.get("_type")
    if kind in (_HF_IMAGE, _HF_VIDEO):
        return kind, False
    if kind in _HF_LISTS:
        inner = _feature_media(feature.get("feature"))
        return (inner[0], True) if not inner[1] else (None, False)
    return None, False


def _arrow_media(pa_type) -> tuple[str | None, bool]:
    """An Arrow type -> ("struct" | "binary" | None, is a list): what may hold media."""
    import pyarrow as pa

    def single(t) -> str | None:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        if pa.types.is_struct(t):
            fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            b = fields.get("bytes")
            if b is not None and (pa.types.is_binary(b) or pa.types.is_large_binary(b)):
                return "struct"
        return None

    if pa.types.is_list(pa_type) or pa.types.is_large_list(pa_type):
        return single(pa_type.value_type), True
    return single(pa_type), False


def _is_string(pa_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(pa_type) or pa.types.is_large_string(pa_type)


def _by_name(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {}
    for n in names:
        lowered.setdefault(n.lower(), n)
    return next((lowered[w] for w in wanted if w in lowered), None)


def plan_columns(schema, ref: ShardRef, features: dict | None = None) -> Columns:
    """Which columns of `schema` hold the image(s), video, text and url. Named columns
    (ref.*_column) win; else the HF features (`features`, or the schema's own), then
    types and names. Raises InputError when a named column is missing or of the wrong
    type, or when no column holds an image or a video."""
    types = {f.name: f.type for f in schema}
    names = list(types)
    feats = features if features is not None else hf_features(schema)

    def named(col: str | None, role: str, media: bool):
        if col is None:
            return None, False
        if col not in types:
            raise InputError(f"no column {col!r} (the {role} column); columns: {', '.join(names)[:300]}")
        if media:
            shape, is_list = _arrow_media(types[col])
            if shape is None:
                raise InputError(f"column {col!r} is {types[col]}: an {role} column must be binary, a "
                                 "{bytes, path} struct (HF Image/Video) or a list of them")
            return col, is_list
        if not _is_string(types[col]):
            raise InputError(f"column {col!r} is {types[col]}: the {role} column must hold strings")
        return col, False

    image, image_list = named(ref.image_column, "image", True)
    video, video_list = named(ref.video_column, "video", True)
    if image is None and video is None:
        for col in names:  # the features say
            kind, is_list = _feature_media(feats.get(col))
            if kind is not None and _arrow_media(types[col])[0] is not None:
                if kind == _HF_IMAGE and image is None:
                    image, image_list = col, is_list
                elif kind == _HF_VIDEO and video is None:
                    video, video_list = col, is_list
        if image is None and video is None:  # the types and names say
            media = {c: _arrow_media(types[c]) for c in names if _arrow_media(types[c])[0] is not None}
            structs = [c for c in media if media[c][0] == "struct"]
            video = _by_name(list(media), VIDEO_NAMES)
            image = _by_name([c for c in media if c != video], IMAGE_NAMES) or next(
                (c for c in structs if c != video), None)
            if image is None and video is None and len(media) == 1:
                image = next(iter(media))
            image_list = media[image][1] if image else False
            video_list = media[video][1] if video else False
    if image is None and video is None:
        raise InputError("no image or video column found (an HF Image/Video feature, a {bytes, path} struct or "
                         "a binary column named like image or video); name one with --image-column or --video-column")
    text = named(ref.text_column, "text", False)[0] or _by_name(
        [c for c in names if _is_string(types[c])], TEXT_NAMES)
    url = named(ref.url_column, "url", False)[0] or _by_name(
        [c for c in names if _is_string(types[c]) and c != text], URL_NAMES)
    used = {image, video, text, url}
    return Columns(image, image_list, video, video_list, text, url, tuple(c for c in names if c not in used))


# --------------------------------------------------------------------------- rows
def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # JPEG, or a format the tier converts anyway (media.py names it truly)


def _video_ext(data: bytes) -> str:
    return "webm" if data[:4] == b"\x1a\x45\xdf\xa3" else "mp4"  # Matroska/WebM, else ISO BMFF (mp4, mov)


def _json_safe(value):
    """A column value as JSON (None when it cannot or should not be kept: bytes, NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        out = {str(k): _json_safe(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None} or None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None


def _producer_meta(row: dict, columns: tuple[str, ...]) -> dict:
    meta, total = {}, 0
    for col in columns:
        value = _json_safe(row.get(col))
        if value is None or value == "" or value == [] or value == {}:
            continue
        try:
            size = len(json.dumps(value, allow_nan=False))
        except (ValueError, RecursionError):
            continue
        if size > MAX_META_VALUE_BYTES or total + size > MAX_META_BYTES:
            continue
        meta[col], total = value, total + size + len(col) + 4
    return meta


def _media_values(value, is_list: bool) -> list:
    if not is_list:
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _media_bytes(value) -> tuple[bytes | None, str | None]:
    """A binary value or an HF {bytes, path} struct -> (bytes, path)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (bytes(data) if data else None), (path if isinstance(path, str) and path else None)
    return (bytes(value) if value else None), None


def _row_sample(key: str, row: dict, cols: Columns, caps: ReadCaps) -> _Sample:
    s = _Sample(key, 0)
    meta: dict = {}
    url = row.get(cols.url) if cols.url else None
    if isinstance(url, str) and url:
        meta["url"] = url
    producer = _producer_meta(row, cols.meta)
    if producer:
        meta["meta"] = producer  # nested: a column named like one of our fields (kind, uid) is not read as it
    if meta:  # first: a sample that fails later keeps its json (its url), as a tar's does
        data = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
        if s.admit("json", len(data), caps):
            s.files["json"] = data
    members: list[tuple[str, bytes]] = []
    for col, is_list, ext_of in ((cols.video, cols.video_list, _video_ext), (cols.image, cols.image_list, _image_ext)):
        if col is None:
            continue
        values = _media_values(row.get(col), is_list)
        n = 0
        for i, value in enumerate(values):
            data, path = _media_bytes(value)
            if data is None and path is not None:
                s.fail("image_not_embedded" if ext_of is _image_ext else "video_not_embedded",
                       f"column {col!r}{f' item {i}' if is_list else ''} holds a path ({path[:80]!r}) and no bytes; "
                       "embed the files (datasets: embed_external_files) to read them")
            elif data is not None:
                members.append((f"{n}.{ext_of(data)}" if is_list else ext_of(data), data))
                n += 1
    text = row.get(cols.text) if cols.text else None
    if isinstance(text, str):
        members.append(("txt", text.encode("utf-8", "surrogatepass")))
    for ext, data in members:
        if s.admit(ext, len(data), caps):
            s.files[ext] = data
    return s


def _key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def _refused_rows(n: int, caps: ReadCaps) -> Exception | None:
    if n > caps.max_rows_per_file:
        return ValueError(f"the file claims {n} rows, over the {caps.max_rows_per_file} rows cap")
    return None


# -------------------------------------------------------------------------- walkers
def walk_source(shard: ShardRef, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    """rawshards._walk for the formats of this module (see the module docstring)."""
    if shard.format == "parquet":
        return _walk_parquet(shard, caps, want_data, state)
    if shard.format == "arrow":
        return _walk_arrow(shard, caps, want_data, state)
    if shard.format == "files":
        return _walk_files(shard, caps, want_data, state)
    raise InputError(f"raw shard {shard.name}: unknown format {shard.format!r}")


def _walk_parquet(shard: ShardRef, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    import pyarrow.parquet as pq

    raw = None
    try:
        raw, _ = open_shard(shard)
        pf = pq.ParquetFile(raw, buffer_size=1 << 20)
        cols = plan_columns(pf.schema_arrow, shard)
        md = pf.metadata
        claims = [md.row_group(rg).num_rows for rg in range(md.num_row_groups)]
        group_bytes = [md.row_group(rg).total_byte_size for rg in range(md.num_row_groups)]
        if any(n < 0 for n in claims):
            raise ValueError("a row group claims a negative row count")
        refused = _refused_rows(sum(claims), caps)
        if refused:
            raise refused
    except ShardIOError:
        raise
    except Exception as exc:  # not parquet, empty, no media column, an absurd row count
        if raw is not None:
            raw.close()
        _stopped(state, exc, shard)
        return
    state.opened = True
    try:
        start = 0
        for rg, claimed in enumerate(claims):
            done = 0
            if want_data and group_bytes[rg] > caps.max_row_group_bytes:
                problem = (f"row group {rg} holds {group_bytes[rg]} bytes, over the {caps.max_row_group_bytes} cap "
                           "(a column chunk is decoded whole)")
                reason = "row_group_too_large"
            elif want_data:  # counting needs only the footer: every claimed row is a row
                try:
                    for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], use_threads=False):
                        for row in batch.to_pylist():
                            if done == claimed:
                                break  # more data than the footer claims: the footer is what was counted
                            yield _row_sample(_key(start + done), row, cols, caps)
                            done += 1
                    problem = None if done == claimed else f"row group {rg} holds {done} of its {claimed} rows"
                except ShardIOError:
                    raise
                except Exception as exc:
                    problem = f"row group {rg} cannot be read: {_describe(exc, shard)}"
                reason = "unreadable_rows"
            for i in range(done, claimed):
                s = _Sample(_key(start + i), 0)
                if want_data:
                    s.fail(reason, problem)
                yield s
            start += claimed
    finally:
        raw.close()


def _walk_arrow(shard: ShardRef, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    """Arrow IPC (a save_to_disk file): the stream has no row count, so counting reads
    the batches too (memory-mapped when local, without touching their data)."""
    import pyarrow as pa

    source = None
    try:
        if shard.remote:
            source, _ = open_shard(shard)
            magic = source.peek(6)[:6]
        else:
            source = pa.memory_map(shard.url)
            magic = source.read(6)
            source.seek(0)
        if magic == b"ARROW1":  # the file format (Feather v2)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        cols = plan_columns(reader.schema, shard)
    except ShardIOError:
        raise
    except Exception as exc:
        if source is not None:
            source.close()
        _stopped(state, exc, shard)
        return
    state.opened = True
    index = 0
    try:
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    break
                refused = _refused_rows(index + batch.num_rows, caps)
                if refused:
                    raise refused
                rows = batch.to_pylist() if want_data else [None] * batch.num_rows
            except ShardIOError:
                raise
            except Exception as exc:
                s = _Sample(_key(index), 0)
                s.fail("unreadable_rows", f"reading stopped at row {index}: {_describe(exc, shard)}; the rest of "
                                          "the file is not read")
                yield s
                break
            for row in rows:
                yield _row_sample(_key(index), row, cols, caps) if want_data else _Sample(_key(index), 0)
                index += 1
    finally:
        source.close()


def _split_file(rel: str) -> tuple[str, str]:
    """"sub/cat.JPG" -> ("sub/cat", "jpg"): a sample is one stem in one folder."""
    stem, dot, ext = rel.rpartition(".")
    if not dot or not stem or "/" in ext or stem.endswith("/"):
        return rel, ""
    return stem, ext.lower()


def _read_member(shard: ShardRef, rel: str, caps: ReadCaps, sample: _Sample, ext: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        sample.fail("unreadable_member", f"member {rel[:80]!r} is not a path below the folder")
        return
    url = f"{shard.url.rstrip('/')}/{rel}"
    try:
        f, size = open_shard(ShardRef(name=shard.name, url=url, endpoint=shard.endpoint, region=shard.region))
    except ShardIOError:
        raise
    except OSError as exc:  # gone or unreadable since it was listed
        sample.fail("unreadable_member", f"{rel[-120:]}: {exc.strerror or type(exc).__name__}")
        return
    with f:
        if not sample.admit(ext, size, caps):
            return
        data = f.read(size + 1)
    if len(data) != size:
        sample.fail("unreadable_member", f"{rel[-120:]} changed size while it was read")
    else:
        sample.files[ext] = data


def _walk_files(shard: ShardRef, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    state.opened = True
    groups: dict[str, list[tuple[str, str]]] = {}
    for rel in shard.members:  # in key order (files_shards)
        key, ext = _split_file(rel)
        groups.setdefault(key, []).append((rel, ext))
    for key, members in groups.items():
        s = _Sample(key, 0)
        if want_data:
            for rel, ext in members:
                if s.reason is None:
                    _read_member(shard, rel, caps, s, ext)
        yield s


# -------------------------------------------------------------------- resolution
def pick_format(rels: list[str], forced: str, crawl_folder: bool, is_shard_name) -> str:
    """A folder's format from its files: tars make a WebDataset input (parquet beside
    them are listings; so is a crawl folder without tars), else parquet files an HF
    parquet input, else media files a plain folder."""
    if forced != "auto":
        return forced
    if crawl_folder or any(is_shard_name(r.rpartition("/")[2]) for r in rels):
        return "tar"
    if any(r.endswith(".parquet") for r in rels):
        return "parquet"
    if any(_split_file(r)[1] in MEDIA_EXTS for r in rels):
        return "files"
    return "tar"  # nothing to read: the tar resolver says what it looked for


def files_shards(entries: list[tuple[str, int]], make_ref) -> list[ShardRef]:
    """A plain folder's files (relative path, size) -> shards of FILES_PER_SHARD samples in
    key order, named part-00000, part-00001, ... `make_ref(name, members, size)`."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for rel, size in entries:
        key, ext = _split_file(rel)
        if ext in MEDIA_EXTS or ext in SIDECAR_EXTS:
            groups.setdefault(key, []).append((rel, size))
    keys = sorted(k for k, members in groups.items() if any(_split_file(r)[1] in MEDIA_EXTS for r, _ in members))
    shards = []
    for n, start in enumerate(range(0, len(keys), FILES_PER_SHARD)):
        members = [m for k in keys[start:start + FILES_PER_SHARD] for m in sorted(groups[k])]
        shards.append(make_ref(f"part-{n:05d}", tuple(r for r, _ in members), sum(s for _, s in members)))
    return shards


_SAFE_PART = re.compile(r"^[^/\\\x00]+\Z")


def _info_json(read_text, rel: str) -> dict:
    try:
        doc = json.loads(read_text(rel))
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{rel} is not JSON: {_one_line(str(exc), 120)}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{rel} is not a JSON object")
    return doc


def disk_files(rels: set[str], read_text) -> list[tuple[str, dict]]:
    """A `save_to_disk` folder (a Dataset: state.json; a DatasetDict: dataset_dict.json
    and a folder per split) -> [(relative path of each .arrow file, the split's HF
    features)], as state.json lists them (other .arrow files, such as cache files, are
    not the dataset). `read_text(rel)` reads a small file of the folder."""
    if "dataset_dict.json" in rels:
        splits = _info_json(read_text, "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) and _SAFE_PART.match(s) and s not in (".", "..")
                                                   for s in splits):
            raise InputError("dataset_dict.json: 'splits' must be a list of folder names")
        prefixes = [f"{s}/" for s in splits]
    else:
        prefixes = [""]
    out = []
    for prefix in prefixes:
        state = _info_json(read_text, f"{prefix}state.json")
        files = state.get("_data_files")
        names = [f.get("filename") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else None
        if not names or not all(isinstance(n, str) and _SAFE_PART.match(n) and n not in (".", "..") for n in names):
            raise InputError(f"{prefix}state.json: '_data_files' must list the dataset's .arrow files")
        info = _info_json(read_text, f"{prefix}dataset_info.json") if f"{prefix}dataset_info.json" in rels else {}
        features = info.get("features") if isinstance(info.get("features"), dict) else {}
        for n in names:
            if f"{prefix}{n}" not in rels:
                raise InputError(f"{prefix}state.json lists {n}, which is not in the folder")
            out.append((f"{prefix}{n}", features))
    return out


def columns_from_features(features: dict, ref: ShardRef) -> dict:
    """dataset_info.json's features -> the ShardRef column fields they name (only where
    the user named none)."""
    found = {}
    if ref.image_column is None and ref.video_column is None:
        for col, feature in features.items():
            kind = _feature_media(feature)[0]
            if kind == _HF_IMAGE:
                found.setdefault("image_column", col)
            elif kind == _HF_VIDEO:
                found.setdefault("video_column", col)
    return found


def check_first(ref: ShardRef) -> None:
    """Open the first shard of a parquet or arrow input and plan its columns, so that a
    column named wrong, or none found, is one InputError before any work (a later file
    that differs is that file's unreadable_shard row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw, _ = open_shard(ref)
    with raw:
        try:
            if ref.format == "parquet":
                schema = pq.ParquetFile(raw).schema_arrow
            elif raw.peek(6)[:6] == b"ARROW1":
                schema = pa.ipc.open_file(raw).schema
            else:
                schema = pa.ipc.open_stream(raw).schema
        except ShardIOError:
            raise
        except Exception as exc:
            raise InputError(f"{ref.name} is not a readable {ref.format} file: {_describe(exc, ref)}") from None
    try:
        plan_columns(schema, ref)
    except InputError as exc:
        raise InputError(f"{ref.name}: {exc}") from None


def local_reader(root: str):
    def read_text(rel: str) -> str:
        path = os.path.join(root, rel)
        with open(path, "rb") as f:
            data = f.read(MAX_INFO_BYTES + 1)
        if len(data) > MAX_INFO_BYTES:
            raise InputError(f"{rel} is over {MAX_INFO_BYTES} bytes")
        return data.decode("utf-8", "replace")
    return read_text
