"""Read raw shards: WebDataset tars (from our crawl, img2dataset, or any producer).

Members are grouped into samples by key (the basename up to the first dot). Metadata
is read with json.loads only: nothing from a shard is ever unpickled or evaluated, and a
member's name is only ever a string (never a path we open or write).

Shards are hostile input. `read_shard` never raises on content and never holds more
than one sample (capped by `ReadCaps`) in memory; every problem becomes a row with
status "failed", a short snake_case `reason` and a one-line `error` (no paths).

Which rows a shard gives (`count_samples` runs the same walk over the headers only, so
it predicts `read_shard` exactly):

1. One row per sample in tar order. A sample is a run of consecutive regular members
   with the same key; symlinks, hard links, devices, directories and other non-regular
   members are skipped and counted nowhere (a sample made only of them does not exist).
   Per sample, checked on the headers before any data is read (a member that fails is
   skipped by streaming through it, never held):
   `member_too_large` (one member > max_member_bytes), `sample_too_large` (all members >
   max_sample_bytes), `json_too_large`, `text_too_large` (a txt/caption member longer than
   max_text_bytes fails the sample; it is not truncated), `too_many_members`,
   `duplicate_member` (the same extension twice), `unsupported_member` (GNU sparse).
   A key that comes back after other keys gives a row `duplicate_key` (the first
   occurrence is the sample; the later one gets uid make_uid(source/shard, key\\x1f<n>)).
   Content problems are found by `sample_row`: `bad_metadata`, `bad_text`,
   `unknown_kind`, `no_video`.
2. If reading stops abnormally (data cut inside a member, a corrupt gzip stream, a header
   that is corrupt or claims an absurd size, or the archive ends without its
   end-of-archive zero block, e.g. cut at a member boundary), the samples before are
   kept as read and the last sample started fails `truncated_member` (it may have lost
   members), unless it already failed for another reason.
3. The listing: img2dataset and our crawl write `<stem>.parquet` beside `<stem>.tar`,
   one row per attempted sample. Keys are read from column `key` (img2dataset) or
   `raw_key` (our media crawl), and a key counts as written when `status` is "success"
   (img2dataset) or "kept" (our crawl). Every written key that is not in the tar gives a
   row after the tar's rows, sorted by key: `missing_from_shard`, or `unreadable_shard`
   when the tar could not be opened at all. Its uid is the listing's `uid` when it is a
   valid uid, else make_uid(source/shard, key). A listing that cannot be read, has
   no key/status column, or has more than max_listing_rows rows is ignored.
4. A shard that could not be opened, or stopped abnormally, and gives no row by the
   rules above (garbage named .tar, an empty file, no listing) gives ONE row for the shard:
   uid make_uid(source/shard, "<shard>"), raw_key None, failed `unreadable_shard`.

Metadata (`sample_row`, which never raises): the json member must be UTF-8 and a JSON
object (else `bad_metadata`; too deep nesting too). NaN/Infinity become null (pandas
writes them for missing values). url, caption, source, probe.codec must be strings or
null, probe an object, missing_images an array of strings, items an array of objects;
anything else fails the row `bad_metadata` naming the field. Numeric probe fields must be
non-negative finite numbers (an integral float counts as an int: 640.0 -> 640); strings,
booleans, fractions in int fields and out-of-range values fail. A kind that is not one of
KINDS fails `unknown_kind`. A uid that is not ours (a number, another format) is not an
error: the row gets the uid derived from its place. A non-string `meta` is kept as its
JSON text. A sha256 that is not 64 hex chars is ignored and recomputed from the content:
a video's bytes, or for a document every image in order plus its text items and caption
(`doc_content_sha256`). A txt/caption member that is not UTF-8 fails `bad_text`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .ids import make_uid

# Columns every raw sample starts with, whatever its kind, so Ray blocks from shards of
# different kinds share one schema. Operators add their outputs to these.
READ_COLUMNS = ("uid", "kind", "source", "url", "text", "source_meta", "raw_shard", "raw_key", "status", "reason",
                "error", "media", "image_bytes", "num_images", "missing_images", "doc", "doc_sha256", "duration",
                "fps", "num_frames", "codec", "width", "height", "sha256", "num_bytes")
KINDS = ("image_text", "interleaved", "video")
UID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm")
TEXT_EXTS = ("txt", "caption")
SHARD_KEY = "<shard>"  # the position a whole-shard row's uid is derived from
LISTING_SUCCESS = ("success", "kept")  # img2dataset, our crawl
ERROR_CHARS = 300
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name header data (tarfile reads it whole)
_CHUNK = 1 << 20
_INT_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class ReadCaps:
    """Limits on what one sample of a raw shard may hold (defaults fit web data)."""
    max_member_bytes: int = 256 << 20  # one member (a video may be big)
    max_sample_bytes: int = 512 << 20  # all members of one sample
    max_json_bytes: int = 1 << 20
    max_text_bytes: int = 1 << 20      # txt/caption member; longer fails 'text_too_large'
    max_members_per_sample: int = 256
    max_listing_rows: int = 10_000_000  # a longer `<stem>.parquet` listing is ignored


# ------------------------------------------------------------------------ small helpers
def ordered_images(files: dict[str, bytes]) -> list[str]:
    """Members "0.jpg", "1.png", ... of a multi-image sample, in their order."""
    numbered = []
    for e in files:
        num, dot, ext = e.partition(".")
        if dot and ext in IMAGE_EXTS and num.isascii() and num.isdigit() and len(num) <= 9:
            numbered.append((int(num), e))
    return [e for _, e in sorted(numbered)]


def media_members(kind: str, files: dict[str, bytes]) -> list[str]:
    """The sample's media member names in order, by kind."""
    if kind == "interleaved":
        return ordered_images(files)
    if kind == "video":
        return [e for e in VIDEO_EXTS if e in files][:1]
    return [e for e in IMAGE_EXTS if e in files][:1]


def list_raw_shards(raw_dir: str | Path) -> list[Path]:
    raw_dir = Path(raw_dir)
    if not raw_dir.exists():
        raise InputError(f"input folder not found: {raw_dir}")
    if not raw_dir.is_dir():
        raise InputError(f"input must be a folder of raw shards (.tar), got a file: {raw_dir}")
    shards = sorted(raw_dir.glob("*.tar"))
    if not shards:
        raise InputError(f"no raw shards (*.tar) in {raw_dir}")
    return shards


def split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext.lower()


def _one_line(text: str, limit: int = ERROR_CHARS) -> str:
    text = " ".join(str(text)[: limit * 4].split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException, path: Path | None = None) -> str:
    """One line naming the problem; never the shard's full path (it may hold a user name or
    a secret from the environment), only its file name."""
    if isinstance(exc, OSError) and exc.strerror:
        msg = f"{type(exc).__name__}: {exc.strerror}"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    if path is not None:
        for p in sorted({str(path), str(path.parent), str(path.absolute()), str(path.absolute().parent)},
                        key=len, reverse=True):
            if len(p) > 1:
                msg = msg.replace(p, path.name)
    return _one_line(msg)


def _show(key: str, limit: int = 60) -> str:
    return repr(key if len(key) <= limit else key[:limit] + "...")


def _clean_name(name: str) -> str:
    """A member name as a string Arrow can store: undecodable bytes (tarfile keeps them as
    surrogate escapes) become visible \\xNN escapes, so distinct names stay distinct."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def _listing_path(path: Path) -> Path:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)] + ".parquet")
    return path.with_name(path.stem + ".parquet")


# --------------------------------------------------------------------- the tar walk
class _HostileHeader(Exception):
    """A tar header that claims something we refuse to act on."""


class _SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses pax / GNU long-name headers over MAX_HEADER_BYTES (tarfile
    reads those whole into memory) and negative sizes (tarfile would loop backwards), and
    remembers the last header block it read so the walk can tell a clean end from a cut."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        tarfile_._safe_last_block = buf
        obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        if obj.size < 0:
            raise _HostileHeader(f"a header at byte {obj.offset} has a negative size")
        if obj.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                        tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and obj.size > MAX_HEADER_BYTES:
            raise _HostileHeader(f"an extended header at byte {obj.offset} claims {obj.size} bytes")
        member = obj._proc_member(tarfile_)
        if member.size < 0:
            raise _HostileHeader(f"a header at byte {obj.offset} has a negative size")
        return member


@dataclass
class _Sample:
    key: str
    occurrence: int  # 0 for the first time a key appears in the shard
    files: dict[str, bytes] = field(default_factory=dict)
    exts: set[str] = field(default_factory=set)
    size: int = 0
    members: int = 0
    reason: str | None = None
    error: str | None = None

    def fail(self, reason: str, error: str) -> None:
        if self.reason is None:
            self.reason, self.error = reason, _one_line(error)
            self.files = {k: v for k, v in self.files.items() if k == "json"}  # json only: for the uid


@dataclass
class _WalkState:
    opened: bool = False
    stop_error: str | None = None  # why reading stopped early (None: clean end)
    keys: dict[str, int] = field(default_factory=dict)  # key -> how many times it started a sample


def _end_problem(tar: tarfile.TarFile) -> str | None:
    """After tarfile reported the end: None if it was the end-of-archive zero block."""
    block = getattr(tar, "_safe_last_block", None)
    if block is None:
        return None
    if len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE:
        return None
    if not block:
        return "the tar ends without its end-of-archive block (cut short at a member boundary)"
    if len(block) < tarfile.BLOCKSIZE:
        return "the tar ends inside a header (cut short)"
    return "a corrupt header: the rest of the tar cannot be read"


def _skip_data(fileobj, member: tarfile.TarInfo) -> None:
    """Stream through a member's data in bounded chunks (compressed tars: forward only)."""
    remaining = member.offset_data + member.size - fileobj.tell()
    while remaining > 0:
        chunk = fileobj.read(min(remaining, _CHUNK))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        remaining -= len(chunk)


def _read_data(fileobj, member: tarfile.TarInfo) -> bytes:
    if fileobj.tell() != member.offset_data:
        fileobj.seek(member.offset_data)
    parts, remaining = [], member.size
    while remaining > 0:
        chunk = fileobj.read(min(remaining, _CHUNK))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        parts.append(chunk)
        remaining -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _walk(path: Path, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    """Samples in tar order. Decides everything from the headers, so the same samples,
    with the same failures, come out whether or not data is read (want_data)."""
    try:
        tar = tarfile.open(path, "r:*", tarinfo=_SafeTarInfo)
    except Exception as exc:  # not a tar, empty, unreadable file, hostile first header
        state.stop_error = _describe(exc, path)
        return
    state.opened = True
    seen = state.keys
    cur: _Sample | None = None
    try:
        fileobj = tar.fileobj
        compressed = not isinstance(fileobj, io.BufferedReader)  # gzip/bz2/xz: no cheap seeks
        last_offset = -1
        while True:
            try:
                member = tar.next()
            except Exception as exc:
                state.stop_error = _describe(exc, path)
                break
            if member is None:
                state.stop_error = _end_problem(tar)
                break
            tar.members.clear()  # tarfile keeps every header; we need none of them
            if member.offset <= last_offset:
                state.stop_error = "tar headers go backwards"
                break
            last_offset = member.offset
            if not member.isreg():
                continue  # symlink, hard link, device, dir, fifo: never followed, counted nowhere
            key, ext = split_member(_clean_name(member.name))
            if cur is None or key != cur.key:
                if cur is not None:
                    yield cur
                n = seen.get(key, 0)
                seen[key] = n + 1
                cur = _Sample(key, n)
                if n:
                    cur.fail("duplicate_key", f"key {_show(key)} appears again after other keys "
                                              f"(occurrence {n + 1}); the first one is the sample")
            cur.members += 1
            size = member.size
            if cur.members > caps.max_members_per_sample:
                cur.fail("too_many_members", f"more than {caps.max_members_per_sample} members")
            elif member.issparse():
                cur.fail("unsupported_member", f"member .{ext[:40]} is a GNU sparse file")
            elif size > caps.max_member_bytes:
                cur.fail("member_too_large", f"member .{ext[:40]} is {size} bytes, over the {caps.max_member_bytes} cap")
            elif cur.size + size > caps.max_sample_bytes:
                cur.fail("sample_too_large", f"members add up to over the {caps.max_sample_bytes} bytes cap")
            elif ext == "json" and size > caps.max_json_bytes:
                cur.fail("json_too_large", f"json member is {size} bytes, over the {caps.max_json_bytes} cap")
            elif ext in TEXT_EXTS and size > caps.max_text_bytes:
                cur.fail("text_too_large", f"{ext} member is {size} bytes, over the {caps.max_text_bytes} cap")
            elif ext in cur.exts:
                cur.fail("duplicate_member", f"member .{ext[:40]} appears twice in the sample")
            cur.exts.add(ext)
            cur.size += size
            keep = want_data and (cur.reason is None or (
                cur.occurrence == 0 and ext == "json" and "json" not in cur.files and size <= caps.max_json_bytes))
            try:
                if keep:
                    cur.files[ext] = _read_data(fileobj, member)
                elif compressed:
                    _skip_data(fileobj, member)
            except Exception as exc:
                state.stop_error = _describe(exc, path)
                break
        if state.stop_error and cur is not None:
            cur.fail("truncated_member", f"reading stopped in or after this sample: {state.stop_error}")
        if cur is not None:
            yield cur
    finally:
        try:
            tar.close()
        except Exception:
            pass


# ----------------------------------------------------------------------- the listing
def _read_listing(path: Path, caps: ReadCaps) -> dict[str, dict] | None:
    """{key: {"uid", "url"}} of the samples the listing says were written, or None."""
    listing = _listing_path(path)
    try:
        if not listing.is_file():
            return None
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(listing)
        names = pf.schema_arrow.names
        key_col = "key" if "key" in names else "raw_key" if "raw_key" in names else None
        if key_col is None or "status" not in names or pf.metadata.num_rows > caps.max_listing_rows:
            return None
        cols = [key_col, "status"] + [c for c in ("uid", "url") if c in names]
        table = pf.read(columns=cols)
        data = {c: table.column(c).to_pylist() for c in cols}
    except Exception:  # unreadable or hostile listing: as if there were none
        return None
    written: dict[str, dict] = {}
    n = len(data[key_col])
    for i in range(n):
        key, status = data[key_col][i], data["status"][i]
        if not isinstance(key, str) or not key or status not in LISTING_SUCCESS or key in written:
            continue
        uid = data["uid"][i] if "uid" in data else None
        url = data["url"][i] if "url" in data else None
        written[_clean_name(key)] = {"uid": uid if isinstance(uid, str) and UID_PATTERN.match(uid) else None,
                                     "url": _clean_name(url) if isinstance(url, str) else None}
    return written


# ------------------------------------------------------------------------- the plan
@dataclass
class _Entry:
    sample: _Sample | None = None
    key: str | None = None      # a listed key not in the tar
    listed: dict | None = None
    reason: str | None = None
    error: str | None = None


def _entries(path: Path, caps: ReadCaps, want_data: bool) -> Iterator[_Entry]:
    """What read_shard yields, one entry per row (see the module docstring)."""
    path = Path(path)
    state = _WalkState()
    n = 0
    for sample in _walk(path, caps, want_data, state):
        n += 1
        yield _Entry(sample=sample)
    listing = _read_listing(path, caps)
    missing = sorted(k for k in (listing or {}) if k not in state.keys)
    if not state.opened:
        reason, why = "unreadable_shard", f"the tar could not be read: {state.stop_error}"
    elif state.stop_error:
        reason, why = "missing_from_shard", f"listed as written but not in the tar, which is cut short or corrupt: {state.stop_error}"
    else:
        reason, why = "missing_from_shard", f"listed as written in {_listing_path(path).name} but not in the tar (the tar is short)"
    for key in missing:
        n += 1
        yield _Entry(key=key, listed=listing[key], reason=reason, error=_one_line(why))
    if n == 0 and (not state.opened or state.stop_error):
        yield _Entry(reason="unreadable_shard",
                     error=_one_line(f"raw shard {path.name} could not be read: {state.stop_error}"))


def count_samples(path: Path, caps: ReadCaps = ReadCaps()) -> int:
    """How many rows read_shard(path) yields. Reads headers only; never raises."""
    try:
        return sum(1 for _ in _entries(Path(path), caps, want_data=False))
    except Exception:  # pragma: no cover - _entries handles everything; the shard row is the fallback
        return 1


def read_shard(path: Path, source: str, caps: ReadCaps = ReadCaps()) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(row, files) for exactly count_samples(path) samples: tar order, then listed samples
    missing from the tar sorted by key. files is {ext: bytes}, {} for a sample that could
    not be read. Never raises on content: problems are failed rows."""
    path = Path(path)
    shard = path.name
    for entry in _entries(path, caps, want_data=True):
        s = entry.sample
        if s is not None and s.reason is None:
            yield sample_row(shard, s.key, s.files, source), s.files
        elif s is not None:
            if s.occurrence:
                row = _blank_row(shard, s.key, source, make_uid(f"{source}/{shard}", f"{s.key}\x1f{s.occurrence}"))
            else:  # the json, when it was read, still names the sample (uid, kind, url)
                row = sample_row(shard, s.key, {"json": s.files["json"]} if "json" in s.files else {}, source)
                row.update(media=None, num_bytes=None, image_bytes=b"", num_images=None, doc=None,
                           missing_images=None, doc_sha256=None, sha256=None)
            row.update(status="failed", reason=s.reason, error=s.error)
            yield row, {}
        elif entry.key is not None:
            listed = entry.listed or {}
            row = _blank_row(shard, entry.key, source, listed.get("uid") or make_uid(f"{source}/{shard}", entry.key))
            row.update(url=listed.get("url"), status="failed", reason=entry.reason, error=entry.error)
            yield row, {}
        else:
            row = _blank_row(shard, None, source, make_uid(f"{source}/{shard}", SHARD_KEY))
            row.update(status="failed", reason=entry.reason, error=entry.error)
            yield row, {}


def scan_keys(path: Path) -> list[str]:
    """Sample keys in tar order (headers only). Raises InputError if the tar is unreadable,
    cut short, or a key repeats after other keys."""
    path = Path(path)
    state = _WalkState()
    keys = []
    for s in _walk(path, ReadCaps(), False, state):
        if s.occurrence:
            raise InputError(f"raw shard {path.name}: a sample's files are not contiguous (key {_show(s.key)} repeats); "
                             "not a WebDataset tar")
        keys.append(s.key)
    if state.stop_error:
        raise InputError(f"raw shard {path.name} is not a readable tar: {state.stop_error}")
    return keys


def iter_samples(path: Path, caps: ReadCaps = ReadCaps()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, for callers that need every sample whole (tier
    shards, training on trusted shards). Raises InputError at the first sample that cannot
    be read, or where the tar is unreadable or cut short."""
    path = Path(path)
    state = _WalkState()
    for s in _walk(path, caps, True, state):
        if s.reason is not None:
            raise InputError(f"raw shard {path.name}: sample {_show(s.key)}: {s.reason}: {s.error}")
        yield s.key, s.files
    if state.stop_error:
        raise InputError(f"raw shard {path.name} is not a readable tar: {state.stop_error}")


# ------------------------------------------------------------------------ sample rows
class _Bad(Exception):
    """Metadata that cannot be used: the row fails (reason, one-line error)."""

    def __init__(self, reason: str, error: str):
        super().__init__(error)
        self.reason, self.error = reason, error


def _blank_row(shard_name: str, key: str | None, source: str, uid: str) -> dict:
    row = dict.fromkeys(READ_COLUMNS)
    row.update(uid=uid, kind="image_text", source=source, raw_shard=shard_name, raw_key=key, status="kept",
               image_bytes=b"")
    return row


def _parse_int(s: str):
    return int(s) if len(s) <= 40 else float(s)  # float: huge literals become inf, then fail a range check


def _load_json(data: bytes) -> dict:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Bad("bad_metadata", f"json member is not UTF-8 (byte {exc.start})") from None
    try:
        # NaN / Infinity / -Infinity (not JSON, but pandas writes them for missing values) -> null
        meta = json.loads(text, parse_constant=lambda _c: None, parse_int=_parse_int)
    except RecursionError:
        raise _Bad("bad_metadata", "json member is nested too deeply") from None
    except ValueError as exc:  # no addresses in the decoder's messages
        raise _Bad("bad_metadata", f"json member is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _Bad("bad_metadata", f"metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _utf8(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad("bad_metadata", f"json field {name!r} holds an unpaired surrogate") from None
    return value


def _opt_str(meta: dict, name: str, label: str | None = None) -> str | None:
    value = meta.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad("bad_metadata", f"json field {label or name!r} must be a string, got {_type_name(value)}")
    return _utf8(value, label or name)


def _number(probe: dict, name: str, integer: bool) -> int | float | None:
    value = probe.get(name)
    if value is None:
        return None
    bad = _Bad("bad_metadata", f"json field 'probe.{name}' must be a non-negative "
                               f"{'integer' if integer else 'number'}, got {_one_line(repr(value), 40)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if value < 0 or value > _INT_MAX:
        raise bad
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise bad
        return int(value)
    return float(value)


def _sha256_field(meta: dict) -> str | None:
    value = meta.get("sha256")
    return value.lower() if isinstance(value, str) and SHA256_PATTERN.match(value) else None


def doc_content_sha256(images: list[bytes], texts: list[str]) -> str:
    """A document's identity when its producer recorded none: every image in order, then
    every text, each hashed, under a domain prefix."""
    h = hashlib.sha256(b"curation-doc-v1\x00")
    h.update(len(images).to_bytes(8, "big"))
    for data in images:
        h.update(hashlib.sha256(data).digest())
    h.update(len(texts).to_bytes(8, "big"))
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def sample_row(shard_name: str, key: str, files: dict[str, bytes], default_source: str) -> dict:
    """One raw sample -> the row the curation job starts from. Never raises: metadata that
    cannot be used makes the row failed (bad_metadata, bad_text, unknown_kind, no_video)."""
    try:
        return _sample_row(shard_name, key, files, default_source)
    except Exception as exc:  # pragma: no cover - a last resort; _sample_row checks every field
        row = _blank_row(shard_name, key, default_source, make_uid(f"{default_source}/{shard_name}", key))
        row.update(status="failed", reason="bad_metadata", error=_describe(exc))
        return row


def _sample_row(shard_name: str, key: str, files: dict[str, bytes], default_source: str) -> dict:
    row = _blank_row(shard_name, key, default_source, make_uid(f"{default_source}/{shard_name}", key))

    def fail(reason: str, error: str) -> None:
        if row["status"] == "kept":
            row.update(status="failed", reason=reason, error=_one_line(error))

    meta: dict = {}
    if "json" in files:
        try:
            meta = _load_json(files["json"])
        except _Bad as bad:
            fail(bad.reason, bad.error)
    # A uid that is not ours (another producer's format, a number) is not an error: the
    # sample gets the uid derived from where it is, as when there is none.
    uid = meta.get("uid")
    if isinstance(uid, str) and UID_PATTERN.match(uid):
        row["uid"] = uid
    kind = meta.get("kind")
    if kind is None or kind == "":
        kind = "image_text"
    if not isinstance(kind, str) or kind not in KINDS:
        fail("unknown_kind", f"kind {_one_line(repr(kind), 50)} is not one of {list(KINDS)}")
        kind = "image_text"
    row["kind"] = kind
    try:
        source = _opt_str(meta, "source")
        row["source"] = source or default_source
        row["url"] = _opt_str(meta, "url")
        caption = _opt_str(meta, "caption")
        raw_meta = meta.get("meta")
        if raw_meta is None or isinstance(raw_meta, str):
            row["source_meta"] = _utf8(raw_meta, "meta") if raw_meta is not None else None
        else:  # JSON already: keep it as its JSON text
            row["source_meta"] = json.dumps(raw_meta, sort_keys=True, allow_nan=False)
    except _Bad as bad:
        fail(bad.reason, bad.error)
        caption = None
    except (ValueError, RecursionError):
        fail("bad_metadata", "json field 'meta' cannot be kept as JSON (nested too deeply or a number out of range)")
        caption = None

    text_ext = next((e for e in TEXT_EXTS if e in files), None)
    if text_ext is not None:
        try:
            row["text"] = files[text_ext].decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            fail("bad_text", f"{text_ext} member is not UTF-8 (byte {exc.start})")
    else:
        row["text"] = caption

    media = media_members(kind, files)
    row["media"] = json.dumps(media)
    row["num_bytes"] = sum(len(files[m]) for m in media)  # all media: what a tier shard will carry
    # The media the operators look at: the image, a document's first image, or the clip
    # (video operators decode frames from it; image operators do not take video rows).
    row["image_bytes"] = files[media[0]] if media else b""
    if kind == "interleaved":
        row["num_images"] = len(media)
        try:
            missing = meta.get("missing_images")
            if missing is None:
                missing = []
            if not isinstance(missing, list) or not all(isinstance(u, str) for u in missing):
                raise _Bad("bad_metadata", "json field 'missing_images' must be an array of strings")
            items = meta.get("items")
            if items is None:
                items = []
            if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
                raise _Bad("bad_metadata", "json field 'items' must be an array of objects")
            doc_id = meta.get("doc_id")
            if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
                raise _Bad("bad_metadata", f"json field 'doc_id' must be a string, got {_type_name(doc_id)}")
            row["missing_images"] = json.dumps(missing)
            row["doc"] = json.dumps({"doc_id": doc_id, "items": items}, allow_nan=False)
            texts = [it["text"] for it in items if isinstance(it.get("text"), str)]
            if row["text"] is not None:
                texts.append(row["text"])
            row["doc_sha256"] = _sha256_field(meta) or doc_content_sha256([files[m] for m in media], texts)
        except _Bad as bad:
            fail(bad.reason, bad.error)
        except (ValueError, RecursionError):
            fail("bad_metadata", "json field 'items' cannot be kept as JSON (nested too deeply or a number out of range)")
    elif kind == "video":
        try:
            probe = meta.get("probe")
            if probe is None:
                probe = {}
            if not isinstance(probe, dict):
                raise _Bad("bad_metadata", f"json field 'probe' must be an object, got {_type_name(probe)}")
            row["duration"] = _number(probe, "duration", integer=False)
            row["fps"] = _number(probe, "fps", integer=False)
            for name in ("num_frames", "width", "height"):
                row[name] = _number(probe, name, integer=True)
            row["codec"] = _opt_str(probe, "codec", "probe.codec")
        except _Bad as bad:
            fail(bad.reason, bad.error)
        row["sha256"] = _sha256_field(meta) or (hashlib.sha256(files[media[0]]).hexdigest() if media else None)
        if not media:
            fail("no_video", "sample has no mp4/webm member")
    return row
