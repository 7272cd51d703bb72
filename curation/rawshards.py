"""Read raw shards: WebDataset tars (from our crawl, img2dataset, or any producer), and
through the same walk HF parquet, `save_to_disk` folders and plain folders of media
(curation/sources.py: their rows and files become the same samples, with the same caps).

Members are grouped into samples by key (the basename up to the first dot). Metadata
is read with json.loads only: nothing from a shard is ever unpickled or evaluated, and a
member's name is only ever a string (never a path we open or write).

A shard is a ShardRef (curation/inputs.py: a local file or an s3:// object, named
uniquely within its input) or a local path (named by its file name). The `raw_shard`
column and the uids derived from a place use that name. Compression is told by the
data's magic bytes: gzip (.tar.gz, .tgz), bzip2 and xz are inflated streamed, never
whole, and count against a cap: min_inflate_bytes + max_inflate_ratio x the compressed
size. A compression bomb stops reading there (rule 2, `decompressed_too_large`), so it
costs bounded work and only its own shard.

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
   members; `decompressed_too_large` when the inflate cap stopped it), unless it already
   failed for another reason.
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
5. The listing's failed rows, when the shard says so (ShardRef.listing_failures: an
   input without our crawl ledger, e.g. img2dataset's own output): every listed url
   that was not written gives a row last, sorted by key (rows without a key after them,
   in listing order), unless the tar holds its key: failed `download_error`
   (img2dataset's failed_to_download) or `decode_error` (failed_to_resize), with its
   error_message; our crawl's listing keeps its own status, reason and error; any
   other status fails `crawl_failed`. The url and uid come from the listing (uid as in
   rule 3; a row without a key: make_uid(source/shard, "<listing row i>")). A key listed
   twice counts once. These rows are the crawler's outcomes: their `stage` is "crawl"
   (every other row's is None: curate). A local path is read without them (our crawl's
   ledger has them).

Metadata (`sample_row`, which never raises): the json member must be UTF-8 and a JSON
object (else `bad_metadata`; too deep nesting too). NaN/Infinity become null (pandas
writes them for missing values). url, caption, source, probe.codec must be strings or
null, probe an object, missing_images an array of strings, items an array of objects
(type text or image; text, url, member strings or null; other item fields are not kept);
anything else fails the row `bad_metadata` naming the field. Numeric probe fields must be
non-negative finite numbers (an integral float counts as an int: 640.0 -> 640); strings,
booleans, fractions in int fields and out-of-range values fail. A kind that is not one of
curation.kinds fails `unknown_kind`; a json without a kind (or no json) gets the kind its
members say (`kinds.infer`: a video member (mp4, webm, mkv, mov) -> video, several images
("0.jpg", "1.png", ... see kinds.NUMBERED_IMAGE, or jpg + png) -> interleaved with its images
as the document's items, else image_text); a video's facts then come from the file
(media.tier_members probes it when stage A validates the media). A uid that is not ours
(a number, another format) is not an error: the row gets the uid derived from its place.
source_meta is `meta` as it was written (a string as is when it is JSON, else as a JSON
string; JSON as its text), unless
the json has fields of the producer's own (any non-empty field not in KNOWN_FIELDS:
license, width, original_width, similarity, ...): then it is one JSON object of them
with meta's fields on top (meta that is not an object goes under "meta"). A sha256 that is not 64 hex chars is ignored and recomputed from the content:
a video's bytes, or for a document every image in order plus its text items and caption
(`doc_content_sha256`). A txt/caption member that is not UTF-8 fails `bad_text`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .ids import make_uid
from .inputs import ShardIOError, ShardRef, as_shard, open_listing, open_shard
from .kinds import RAW_IMAGE_EXTS, RAW_VIDEO_EXTS, UnknownKind, kind_of, names, ordered_images
from .kinds import infer as infer_kind

# Columns every raw sample starts with, whatever its kind, so Ray blocks from shards of
# different kinds share one schema. Operators add their outputs to these.
READ_COLUMNS = ("uid", "kind", "source", "url", "text", "source_meta", "raw_shard", "raw_key", "status", "reason",
                "error", "media", "image_bytes", "num_images", "missing_images", "doc", "doc_sha256", "duration",
                "fps", "num_frames", "codec", "width", "height", "sha256", "num_bytes",
                "stage")  # "crawl" for a listing's failed rows (rule 5), else None: the ledger's stage
UID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
IMAGE_EXTS, VIDEO_EXTS = RAW_IMAGE_EXTS, RAW_VIDEO_EXTS  # a raw sample's media (curation.kinds)
# Json fields this reader uses; every other non-null field is the producer's and goes
# into source_meta. key/status/error_message are img2dataset's bookkeeping of the
# sample itself (its key, "success", null), nothing about the data.
KNOWN_FIELDS = frozenset({"uid", "kind", "source", "url", "caption", "meta", "probe", "missing_images", "items",
                          "doc_id", "sha256", "key", "status", "error_message"})
TEXT_EXTS = ("txt", "caption")
SHARD_KEY = "<shard>"  # the position a whole-shard row's uid is derived from
LISTING_SUCCESS = ("success", "kept")  # img2dataset, our crawl
# img2dataset's failure statuses -> our reasons (as curation/crawl/image_text.py classifies them)
LISTING_FAILURES = {"failed_to_download": "download_error", "failed_to_resize": "decode_error"}
OUR_ERROR_PREFIX = "curation:"  # crawl.fetch.encode_outcome: our crawl's own outcome, as JSON
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
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
    max_rows_per_file: int = 10_000_000  # a parquet/arrow input file claiming more is unreadable_shard
    # A parquet row group is decoded a column chunk at a time (pyarrow holds one whole):
    # one larger than this, uncompressed, fails its rows `row_group_too_large` unread.
    max_row_group_bytes: int = 1 << 30
    # A compressed shard (.tar.gz, .tgz, or any gzip/bz2/xz data) is read until it has
    # inflated to min_inflate_bytes + max_inflate_ratio x its compressed size; past that
    # it is a compression bomb and reading stops there (`decompressed_too_large`).
    max_inflate_ratio: int = 100
    min_inflate_bytes: int = 64 << 20


# ------------------------------------------------------------------------ small helpers
def list_raw_shards(raw_input: str | Path) -> list[ShardRef]:
    """The raw shards an --input names (curation/inputs.py), in order."""
    from .inputs import resolve_input

    return list(resolve_input(raw_input).shards)


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


def _describe(exc: BaseException, shard: ShardRef | None = None) -> str:
    """One line naming the problem; never the shard's full path or url (it may hold a user
    name or a secret from the environment), only its name."""
    if isinstance(exc, _InflateLimit):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        msg = f"{type(exc).__name__}: {exc.strerror}"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    if shard is not None:
        places = {shard.url, shard.url.rpartition("/")[0], shard.listing_url}
        if shard.remote:  # pyarrow names objects as bucket/key, bucket and key apart too
            bucket_key = shard.url[len("s3://"):]
            places |= {bucket_key, bucket_key.rpartition("/")[0], bucket_key.partition("/")[2],
                       bucket_key.partition("/")[0], shard.listing_url[len("s3://"):]}
        else:
            path = Path(shard.url)
            places |= {str(path.absolute()), str(path.absolute().parent)}
        for p in sorted(places, key=len, reverse=True):
            if len(p) > 1:
                msg = msg.replace(p, shard.name)
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


# --------------------------------------------------------------------- the tar walk
class _HostileHeader(Exception):
    """A tar header that claims something we refuse to act on."""


class _InflateLimit(Exception):
    """A compressed shard inflated past its cap (ReadCaps.max_inflate_ratio)."""


class _Inflated:
    """The decompressed bytes of a compressed shard as a forward-only file for tarfile
    ("r:" mode: reads, tell, forward seeks by reading), counted: past `limit` bytes it
    raises _InflateLimit, so a compression bomb costs bounded work and only its shard."""

    def __init__(self, inner, limit: int, compressed_size: int):
        self.inner, self.limit, self.compressed_size, self.pos = inner, limit, compressed_size, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _CHUNK  # tarfile never asks for "all"; never read unbounded
        data = self.inner.read(min(n, self.limit - self.pos + 1))
        self.pos += len(data)
        if self.pos > self.limit:
            raise _InflateLimit(f"the shard inflates past {self.limit} bytes ({self.compressed_size} compressed): "
                                "a compression bomb; the rest of it is not read")
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.pos
        elif whence != 0:
            raise io.UnsupportedOperation("a compressed shard is read forward only")
        if pos < self.pos:
            raise io.UnsupportedOperation("a compressed shard is read forward only")
        while self.pos < pos:
            if not self.read(min(pos - self.pos, _CHUNK)):
                break
        return self.pos


def _open_tar(shard: ShardRef, caps: ReadCaps) -> tuple[tarfile.TarFile, list]:
    """The shard as a TarFile (headers through _SafeTarInfo) and what to close after it.
    Compression is told by the data's magic bytes, not by the name: gzip, bzip2 and xz are
    read streamed through _Inflated; a plain tar is read with seeks."""
    raw, size = open_shard(shard)
    closers = [raw]
    try:
        magic = raw.peek(6)[:6]
        if magic[:2] == b"\x1f\x8b":
            inner = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic[:3] == b"BZh":
            inner = bz2.BZ2File(raw, "rb")
        elif magic == b"\xfd7zXZ\x00":
            inner = lzma.LZMAFile(raw, "rb")
        else:
            inner = None
        if inner is None:
            return tarfile.open(fileobj=raw, mode="r:", tarinfo=_SafeTarInfo), closers
        closers.insert(0, inner)
        limit = caps.min_inflate_bytes + caps.max_inflate_ratio * size
        return tarfile.open(fileobj=_Inflated(inner, limit, size), mode="r:", tarinfo=_SafeTarInfo), closers
    except BaseException:
        _close_all(closers)
        raise


def _close_all(closers: list) -> None:
    for c in closers:
        try:
            c.close()
        except Exception:
            pass


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

    def admit(self, ext: str, size: int, caps: ReadCaps, sparse: bool = False) -> bool:
        """Count a member of `size` bytes against the caps (the sample fails at the first
        one it breaks); True when the sample may keep its data."""
        self.members += 1
        if self.members > caps.max_members_per_sample:
            self.fail("too_many_members", f"more than {caps.max_members_per_sample} members")
        elif sparse:
            self.fail("unsupported_member", f"member .{ext[:40]} is a GNU sparse file")
        elif size > caps.max_member_bytes:
            self.fail("member_too_large", f"member .{ext[:40]} is {size} bytes, over the {caps.max_member_bytes} cap")
        elif self.size + size > caps.max_sample_bytes:
            self.fail("sample_too_large", f"members add up to over the {caps.max_sample_bytes} bytes cap")
        elif ext == "json" and size > caps.max_json_bytes:
            self.fail("json_too_large", f"json member is {size} bytes, over the {caps.max_json_bytes} cap")
        elif ext in TEXT_EXTS and size > caps.max_text_bytes:
            self.fail("text_too_large", f"{ext} member is {size} bytes, over the {caps.max_text_bytes} cap")
        elif ext in self.exts:
            self.fail("duplicate_member", f"member .{ext[:40]} appears twice in the sample")
        self.exts.add(ext)
        self.size += size
        return self.reason is None


@dataclass
class _WalkState:
    opened: bool = False
    stop_error: str | None = None  # why reading stopped early (None: clean end)
    stop_reason: str = "truncated_member"  # what the sample reading stopped in fails with
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


def _stopped(state: _WalkState, exc: BaseException, shard: ShardRef) -> None:
    state.stop_error = _describe(exc, shard)
    if isinstance(exc, _InflateLimit):
        state.stop_reason = "decompressed_too_large"


def _walk(shard: ShardRef, caps: ReadCaps, want_data: bool, state: _WalkState) -> Iterator[_Sample]:
    """Samples in tar order. Decides everything from the headers, so the same samples,
    with the same failures, come out whether or not data is read (want_data). Other
    formats (ShardRef.format) are walked by curation/sources.py."""
    if shard.format != "tar":
        from .sources import walk_source

        yield from walk_source(shard, caps, want_data, state)
        return
    try:
        tar, closers = _open_tar(shard, caps)
    except ShardIOError:
        raise
    except Exception as exc:  # not a tar, empty, unreadable file, hostile first header
        _stopped(state, exc, shard)
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
            except ShardIOError:
                raise
            except Exception as exc:
                _stopped(state, exc, shard)
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
            size = member.size
            cur.admit(ext, size, caps, member.issparse())
            keep = want_data and (cur.reason is None or (
                cur.occurrence == 0 and ext == "json" and "json" not in cur.files and size <= caps.max_json_bytes))
            try:
                if keep:
                    cur.files[ext] = _read_data(fileobj, member)
                elif compressed:
                    _skip_data(fileobj, member)
            except ShardIOError:
                raise
            except Exception as exc:
                _stopped(state, exc, shard)
                break
        if state.stop_error and cur is not None:
            cur.fail(state.stop_reason, f"reading stopped in or after this sample: {state.stop_error}")
        if cur is not None:
            yield cur
    finally:
        _close_all([tar, *closers])


# ----------------------------------------------------------------------- the listing
@dataclass
class _Listing:
    written: dict[str, dict]  # key -> {"uid", "url"}: samples the listing says are in the tar
    failed: list[tuple]       # (key | None, row index, {"uid", "url", "status", "reason", "error"})


def _text(value, limit: int = ERROR_CHARS * 4) -> str | None:
    return _clean_name(value[:limit]) if isinstance(value, str) else None


def _listing_outcome(status, reason, error) -> tuple[str, str, str]:
    """A listing row that was not written -> (status, reason, error) for the ledger."""
    message = _text(error)
    if message and message.startswith(OUR_ERROR_PREFIX):  # our crawl's own outcome, kept as it said
        try:
            ours = json.loads(message[len(OUR_ERROR_PREFIX):])
        except (ValueError, RecursionError):
            ours = None
        if (isinstance(ours, dict) and ours.get("status") in ("failed", "dropped")
                and isinstance(ours.get("reason"), str) and _REASON.match(ours["reason"])):
            return ours["status"], ours["reason"], _one_line(_text(ours.get("error")) or ours["reason"])
    if status in LISTING_FAILURES:
        return "failed", LISTING_FAILURES[status], _one_line(message or status)
    if status in ("failed", "dropped"):  # our crawl's listing: its reason and error
        ok = isinstance(reason, str) and _REASON.match(reason)
        return status, reason if ok else "crawl_failed", _one_line(message or _text(reason) or status)
    shown = _one_line(repr(status), 60) if status is not None else "none"
    return "failed", "crawl_failed", _one_line(f"the listing says status {shown}" + (f": {message}" if message else ""))


def _read_listing(shard: ShardRef, caps: ReadCaps) -> _Listing | None:
    """What the shard's listing says (written keys; the rows that failed, when
    shard.listing_failures), or None when it has none or it cannot be used."""
    try:
        f = open_listing(shard)
        if f is None:
            return None
        with f:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            key_col = "key" if "key" in names else "raw_key" if "raw_key" in names else None
            if key_col is None or "status" not in names or pf.metadata.num_rows > caps.max_listing_rows:
                return None
            cols = [key_col, "status"] + [c for c in ("uid", "url") if c in names]
            if shard.listing_failures:
                cols += [c for c in ("error_message", "error", "reason") if c in names]
            table = pf.read(columns=cols)
            data = {c: table.column(c).to_pylist() for c in cols}
    except ShardIOError:  # the network, not the listing (inputs.ShardIOError)
        raise
    except Exception:  # unreadable or hostile listing: as if there were none
        return None
    written: dict[str, dict] = {}
    failed: dict = {}
    n = len(data[key_col])
    for i in range(n):
        key, status = data[key_col][i], data["status"][i]
        uid = data["uid"][i] if "uid" in data else None
        url = data["url"][i] if "url" in data else None
        facts = {"uid": uid if isinstance(uid, str) and UID_PATTERN.match(uid) else None,
                 "url": _clean_name(url) if isinstance(url, str) else None}
        key = _clean_name(key) if isinstance(key, str) and key else None
        if status in LISTING_SUCCESS:
            if key is not None and key not in written:
                written[key] = facts
        elif shard.listing_failures and (key is None or key not in failed):
            error = data.get("error_message", data.get("error", [None] * n))[i]
            status_, reason, error = _listing_outcome(status, data["reason"][i] if "reason" in data else None, error)
            failed[key if key is not None else ("\x00", i)] = (key, i, {**facts, "status": status_, "reason": reason,
                                                                       "error": error})
    rows = [v for v in failed.values() if v[0] is None or v[0] not in written]
    return _Listing(written, sorted(rows, key=lambda r: (r[0] is None, r[0] or "", r[1])))


# ------------------------------------------------------------------------- the plan
@dataclass
class _Entry:
    sample: _Sample | None = None
    key: str | None = None      # a listed key not in the tar
    listed: dict | None = None
    reason: str | None = None
    error: str | None = None
    status: str = "failed"
    row: int | None = None      # a failed listing row without a key: its index
    crawl: bool = False         # a listing's failed row: the crawler's outcome (ledger stage crawl)


def _entries(shard: ShardRef, caps: ReadCaps, want_data: bool) -> Iterator[_Entry]:
    """What read_shard yields, one entry per row (see the module docstring)."""
    state = _WalkState()
    n = 0
    for sample in _walk(shard, caps, want_data, state):
        n += 1
        yield _Entry(sample=sample)
    listing = _read_listing(shard, caps) if shard.format == "tar" else None  # listings sit beside tars only
    written = listing.written if listing else {}
    missing = sorted(k for k in written if k not in state.keys)
    listing_name = shard.listing_url.rpartition("/")[2]
    if not state.opened:
        reason, why = "unreadable_shard", f"the tar could not be read: {state.stop_error}"
    elif state.stop_error:
        reason, why = "missing_from_shard", f"listed as written but not in the tar, which is cut short or corrupt: {state.stop_error}"
    else:
        reason, why = "missing_from_shard", f"listed as written in {listing_name} but not in the tar (the tar is short)"
    for key in missing:
        n += 1
        yield _Entry(key=key, listed=written[key], reason=reason, error=_one_line(why))
    if n == 0 and (not state.opened or state.stop_error):
        yield _Entry(reason="unreadable_shard",
                     error=_one_line(f"raw shard {shard.name} could not be read: {state.stop_error}"))
    for key, i, facts in (listing.failed if listing else ()):
        if key is not None and key in state.keys:
            continue  # the tar has it after all: the sample is its row
        yield _Entry(key=key, listed=facts, reason=facts["reason"], error=facts["error"], status=facts["status"],
                     row=None if key is not None else i, crawl=True)


def count_samples(shard: ShardRef | Path | str, caps: ReadCaps = ReadCaps()) -> int:
    """How many rows read_shard(shard) yields. Reads headers only; never raises."""
    try:
        return sum(1 for _ in _entries(as_shard(shard), caps, want_data=False))
    except ShardIOError:
        raise
    except Exception:  # pragma: no cover - _entries handles everything; the shard row is the fallback
        return 1


def read_shard(shard: ShardRef | Path | str, source: str, caps: ReadCaps = ReadCaps()
               ) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(row, files) for exactly count_samples(shard) samples: tar order, then listed
    samples missing from the tar sorted by key, then (shard.listing_failures) the
    listing's failed rows. files is {ext: bytes}, {} for a sample that could not be read.
    Never raises on content: problems are failed rows."""
    ref = as_shard(shard)
    name = ref.name
    for entry in _entries(ref, caps, want_data=True):
        s = entry.sample
        if s is not None and s.reason is None:
            yield sample_row(name, s.key, s.files, source), s.files
        elif s is not None:
            if s.occurrence:
                row = _blank_row(name, s.key, source, make_uid(f"{source}/{name}", f"{s.key}\x1f{s.occurrence}"))
            else:  # the json, when it was read, still names the sample (uid, kind, url)
                row = sample_row(name, s.key, {"json": s.files["json"]} if "json" in s.files else {}, source)
                row.update(media=None, num_bytes=None, image_bytes=b"", num_images=None, doc=None,
                           missing_images=None, doc_sha256=None, sha256=None)
            row.update(status="failed", reason=s.reason, error=s.error)
            yield row, {}
        elif entry.listed is not None:
            listed = entry.listed
            position = entry.key if entry.row is None else f"<listing row {entry.row}>"
            row = _blank_row(name, entry.key, source, listed.get("uid") or make_uid(f"{source}/{name}", position))
            row.update(url=listed.get("url"), status=entry.status, reason=entry.reason, error=entry.error,
                       stage="crawl" if entry.crawl else None)
            yield row, {}
        else:
            row = _blank_row(name, None, source, make_uid(f"{source}/{name}", SHARD_KEY))
            row.update(status="failed", reason=entry.reason, error=entry.error)
            yield row, {}


def scan_keys(shard: ShardRef | Path | str) -> list[str]:
    """Sample keys in tar order (headers only). Raises InputError if the tar is unreadable,
    cut short, or a key repeats after other keys."""
    ref = as_shard(shard)
    state = _WalkState()
    keys = []
    for s in _walk(ref, ReadCaps(), False, state):
        if s.occurrence:
            raise InputError(f"raw shard {ref.name}: a sample's files are not contiguous (key {_show(s.key)} repeats); "
                             "not a WebDataset tar")
        keys.append(s.key)
    if state.stop_error:
        raise InputError(f"raw shard {ref.name} is not a readable tar: {state.stop_error}")
    return keys


def iter_samples(shard: ShardRef | Path | str, caps: ReadCaps = ReadCaps()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, for callers that need every sample whole (tier
    shards, training on trusted shards). Raises InputError at the first sample that cannot
    be read, or where the tar is unreadable or cut short."""
    ref = as_shard(shard)
    state = _WalkState()
    for s in _walk(ref, caps, True, state):
        if s.reason is not None:
            raise InputError(f"raw shard {ref.name}: sample {_show(s.key)}: {s.reason}: {s.error}")
        yield s.key, s.files
    if state.stop_error:
        raise InputError(f"raw shard {ref.name} is not a readable tar: {state.stop_error}")


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
    inferred = kind is None or kind == ""
    if inferred:  # no json, or a producer that does not say: the members tell
        kind = infer_kind(files)
    else:
        try:
            kind = kind_of(kind)
        except UnknownKind:
            fail("unknown_kind", f"kind {_one_line(repr(kind), 50)} is not one of {list(names())}")
            kind = kind_of("image_text")  # a failed row still needs a shape; its media are not used
    row["kind"] = kind.name
    try:
        source = _opt_str(meta, "source")
        row["source"] = source or default_source
        row["url"] = _opt_str(meta, "url")
        caption = _opt_str(meta, "caption")
        raw_meta = meta.get("meta")
        extra = _producer_fields(meta)
        if extra:
            row["source_meta"] = _merged_meta(extra, raw_meta)
        elif raw_meta is None or isinstance(raw_meta, str):
            row["source_meta"] = _json_text(_utf8(raw_meta, "meta")) if raw_meta is not None else None
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

    media = kind.media_members(files)
    row["media"] = media
    row["num_bytes"] = sum(len(files[m]) for m in media)  # all media: what a tier shard will carry
    # The media the operators look at: the image, a document's first image, or the clip
    # (video operators decode frames from it; image operators do not take video rows).
    row["image_bytes"] = files[media[0]] if media else b""
    kind.read_fields(row, meta, files, media, inferred, fail)
    return row


def document_fields(row: dict, meta: dict, files: dict[str, bytes], media: list[str], inferred: bool, fail) -> None:
    """A document's (kind interleaved) json fields: missing_images, items, doc_id, sha256."""
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
        items = [_doc_item(it) for it in items]
        doc_id = meta.get("doc_id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise _Bad("bad_metadata", f"json field 'doc_id' must be a string, got {_type_name(doc_id)}")
        if inferred and not items:  # a document without items: its images in order
            items = [{"type": "image", "member": m} for m in media]
        row["missing_images"] = missing
        row["doc"] = {"doc_id": None if doc_id is None else str(doc_id), "items": items}
        texts = [it["text"] for it in items if isinstance(it.get("text"), str)]
        if row["text"] is not None:
            texts.append(row["text"])
        row["doc_sha256"] = _sha256_field(meta) or doc_content_sha256([files[m] for m in media], texts)
    except _Bad as bad:
        fail(bad.reason, bad.error)
    except (ValueError, RecursionError):
        fail("bad_metadata", "json field 'items' cannot be kept as JSON (nested too deeply or a number out of range)")


def video_fields(row: dict, meta: dict, files: dict[str, bytes], media: list[str], fail) -> None:
    """A video's json fields: the probe (duration, fps, frames, size, codec) and sha256."""
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
        fail("no_video", f"sample has no {'/'.join(VIDEO_EXTS)} member")


ITEM_FIELDS = ("type", "text", "url", "member")  # a document item's fields (the sidecar's doc struct)


def _doc_item(item: dict) -> dict:
    """A document item as the sidecar's doc struct holds it: type text or image, text,
    url and member strings or null; other fields are not kept."""
    if item.get("type") not in ("text", "image"):
        raise _Bad("bad_metadata", f"a document item's type must be 'text' or 'image', got {_one_line(repr(item.get('type')), 50)}")
    for name in ITEM_FIELDS[1:]:
        if item.get(name) is not None and not isinstance(item[name], str):
            raise _Bad("bad_metadata", f"a document item's {name} must be a string, got {_type_name(item[name])}")
    return {name: item.get(name) for name in ITEM_FIELDS}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN/Infinity; DuckDB does not


def _json_text(text: str) -> str:
    """`meta` written as a string: kept as is when it is JSON text, else as a JSON string
    (source_meta is a JSON column)."""
    try:
        json.loads(text, parse_constant=_no_constant, parse_int=_parse_int)
        return text
    except (ValueError, RecursionError):
        return json.dumps(text)


def _producer_fields(meta: dict) -> dict:
    """The json's fields this reader does not use (license, width, similarity, ...).
    Empty values (null, "", [], {}, and "{}": img2dataset writes exif as "{}" when an
    image has none) say nothing and are left out; so is a value JSON cannot hold (a
    number out of range)."""
    extra = {}
    for k, v in meta.items():
        if k in KNOWN_FIELDS or v is None or v in ("", "{}") or (isinstance(v, (list, dict)) and not v):
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (ValueError, RecursionError):
            continue
        extra[k] = v
    return extra


def _merged_meta(extra: dict, raw_meta) -> str:
    """source_meta when the producer wrote fields of its own: one JSON object with them,
    and the fields of `meta` (an object, or a string holding one) on top; any other
    `meta` under the key "meta"."""
    merged = dict(extra)
    inner = raw_meta
    if isinstance(raw_meta, str):
        try:
            parsed = json.loads(_utf8(raw_meta, "meta"), parse_constant=lambda _c: None, parse_int=_parse_int)
        except (ValueError, RecursionError):
            parsed = None
        inner = parsed if isinstance(parsed, dict) else raw_meta
    if isinstance(inner, dict):
        merged.update(inner)
    elif inner is not None:
        merged["meta"] = inner
    return json.dumps(merged, sort_keys=True, allow_nan=False)
