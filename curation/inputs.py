"""What `curate run --input` reads: one place that turns the argument into an ordered
list of raw shard references, and opens them.

Accepted inputs (raw shards are files ending in .tar, .tar.gz or .tgz):

* a local folder, searched recursively. Hidden entries (".*"), folders whose name starts
  with "_" (work folders: img2dataset's _tmp, the crawl's _rounds) and `curate run`
  output folders (they hold `_work/`) are skipped;
* one local shard file;
* a glob, `/data/**/*.tar` (`**` crosses folders);
* a brace pattern, WebDataset style: `shard-{00000..00099}.tar` (zero padding kept,
  an optional step `{0..98..2}`), `{a,b}`; braces and globs combine. Every name a brace
  pattern spells out without a glob must exist;
* an object store url, `s3://bucket/prefix/` (recursive, with the folder rules above),
  `s3://bucket/key.tar`, or a glob or brace pattern after `s3://bucket/`. The endpoint
  comes from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, the region from AWS_REGION or
  AWS_DEFAULT_REGION (default us-east-1), credentials from the AWS SDK's usual chain.
  Shards are read streamed, in ranged reads of STREAM_BUFFER bytes; nothing is downloaded
  whole. A network failure is raised (ShardIOError), never recorded as bad data.

Every shard gets a NAME that is unique and stable: its path relative to the input's root
(the folder, the pattern's folder part, or the bucket prefix) with "/" and the characters
that glob or escape ("%", "\\\\", "*", "?", "[", "]", control characters) written as %XX. A
shard directly in the root keeps its file name, so a flat folder names its shards as
before. The name is what the ledger's raw_shard column, stage A's commit markers and the
uids of samples without one are derived from. Names over MAX_NAME_BYTES become a hash of
the whole relative path plus its tail.

Beside each shard, `<stem>.parquet` is its listing (rawshards.py). Failed rows of a
listing (img2dataset's failed_to_download, ...) become ledger rows when the input has
no crawl ledger (`ShardRef.listing_failures`); with our crawl's folder, whose
`crawl_ledger-*.parquet` already accounts for every url, they are not read.
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .crawl import CRAWL_LEDGER_GLOB
from .errors import InputError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LISTING_SUFFIX = ".parquet"
MAX_NAME_BYTES = 200  # a name becomes file names under _work (plus ".done.json"): under 255
MAX_EXPANSIONS = 100_000  # names one brace pattern may spell out
STREAM_BUFFER = 8 << 20  # bytes per ranged read of an object store shard
TOKEN_PREFIX = "shard-ref:"
_GLOB_CHARS = frozenset("*?[")
_UNSAFE_NAME_CHARS = re.compile(r"[%/\\*?\[\]\x00-\x1f\x7f]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


class ShardIOError(InputError):
    """An object store shard or listing could not be read (after the AWS SDK's own
    retries). Raised, never turned into ledger rows: a network failure says nothing about
    the data, and a shard read halfway would disagree with its count. The task fails;
    running the same command again resumes."""


def _io_error(ref_url: str, exc: BaseException) -> ShardIOError:
    return ShardIOError(f"cannot read {ref_url}: {' '.join(str(exc).split())[:300]}; run the same command again to resume")


@dataclass(frozen=True)
class ShardRef:
    """One raw shard: its unique name, where it is (an absolute local path or an
    s3://bucket/key url), its size when listed, and how its listing is read. Pickles and
    travels to Ray tasks as `token()`."""
    name: str
    url: str
    size: int = -1
    listing_failures: bool = False  # failed listing rows are inputs to account for
    endpoint: str | None = None     # s3 only: scheme://host:port, when not AWS itself
    region: str | None = None

    @property
    def stem(self) -> str:
        """What stage A names the shard's work files by (Path(name).stem, as annotate does)."""
        return Path(self.name).stem

    @property
    def remote(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def listing_url(self) -> str:
        """`<stem>.parquet` beside the shard."""
        head, _, base = self.url.rpartition("/")
        for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
            if base.endswith(suffix) and len(base) > len(suffix):
                return f"{head}/{base[: -len(suffix)]}{LISTING_SUFFIX}"
        stem = base.rsplit(".", 1)[0] if "." in base else base
        return f"{head}/{stem}{LISTING_SUFFIX}"

    def token(self) -> str:
        return TOKEN_PREFIX + json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_token(cls, token: str) -> "ShardRef":
        return cls(**json.loads(token[len(TOKEN_PREFIX):]))

    def __str__(self) -> str:
        return self.url


def as_shard(shard) -> ShardRef:
    """A ShardRef from a ShardRef, its token, an s3:// url or a local path (named by its
    file name, as a flat folder names its shards)."""
    if isinstance(shard, ShardRef):
        return shard
    text = os.fspath(shard)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(TOKEN_PREFIX):
        return ShardRef.from_token(text)
    if text.startswith("s3://"):
        endpoint, region = _s3_settings()
        return ShardRef(name=shard_name(text.rstrip("/").rpartition("/")[2]), url=text, endpoint=endpoint, region=region)
    try:
        size = os.stat(text).st_size
    except OSError:
        size = -1  # the reader reports it as an unreadable shard
    return ShardRef(name=shard_name(Path(text).name), url=text, size=size)


@dataclass(frozen=True)
class RawInput:
    """The resolved --input: what the run reads and how it is identified."""
    spec: str                          # the input as given (local paths made absolute)
    shards: tuple[ShardRef, ...]       # ordered by name
    source: str                        # samples' default source: the root's name
    crawl_ledgers: tuple[Path, ...]    # our crawl's ledgers (a local folder input only)


# ------------------------------------------------------------------------------ names
def shard_name(relative: str) -> str:
    """A relative path (with "/") -> the shard's name (see the module docstring)."""
    name = _UNSAFE_NAME_CHARS.sub(lambda m: "%%%02X" % ord(m.group()), relative)
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        # bytes that are not UTF-8 (a file name from another locale) become visible \\xNN
        return raw.decode("utf-8", "backslashreplace")
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tail = raw[-(MAX_NAME_BYTES - 17):].decode("utf-8", "ignore")  # a cut character is dropped
    return f"{digest}~{tail}"


def is_shard_name(name: str) -> bool:
    return any(name.endswith(s) and len(name) > len(s) for s in SHARD_SUFFIXES)


def _check_unique(shards: list[ShardRef], spec: str) -> None:
    """Stage A keys its work files by the name's stem: x.tar and x.tgz side by side would
    share them (and hold the same samples, most likely)."""
    seen: dict[str, ShardRef] = {}
    for ref in shards:
        other = seen.setdefault(ref.stem, ref)
        if other is not ref:
            raise InputError(f"raw shards {other.name} and {ref.name} in {spec} differ only by their suffix "
                             "(a copy of the same shard?); keep one of them")


# ----------------------------------------------------------------------- braces, globs
def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _range(body: str) -> list[str] | None:
    m = _RANGE.match(body)
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    step = abs(int(m.group(3))) if m.group(3) else 1
    if step == 0:
        raise InputError(f"brace range {{{body}}} has step 0")
    if abs(b - a) // step + 1 > MAX_EXPANSIONS:
        raise InputError(f"brace range {{{body}}} spells out more than {MAX_EXPANSIONS} names")
    padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0") for g in m.group(1, 2))
    width = max(len(m.group(1)), len(m.group(2))) if padded else 0
    numbers = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{n:0{width}d}" for n in numbers]


def expand_braces(pattern: str) -> list[str]:
    """WebDataset/bash brace expansion: `{a,b}` alternatives and `{000..099}` ranges,
    nested and combined, in order. A brace with neither ("{x}") stays as it is. More than
    MAX_EXPANSIONS names is an InputError."""
    out: list[str] = []

    def expand(text: str, search_from: int) -> None:
        i = text.find("{", search_from)
        while i != -1:
            j = _matching_brace(text, i)
            if j == -1:
                break
            body = text[i + 1:j]
            alternatives = _range(body)
            if alternatives is None:
                parts = _split_top_level(body)
                alternatives = parts if len(parts) > 1 else None
            if alternatives is not None:
                for alt in alternatives:
                    expand(text[:i] + alt + text[j + 1:], i)
                return
            i = text.find("{", i + 1)
        out.append(text)
        if len(out) > MAX_EXPANSIONS:
            raise InputError(f"the brace pattern spells out more than {MAX_EXPANSIONS} names")

    expand(pattern, 0)
    return out


def _has_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _static_dir(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard or brace: the root names are
    relative to."""
    parts = pattern.split("/")
    static = []
    for part in parts[:-1]:
        if _has_glob(part) or "{" in part:
            break
        static.append(part)
    return "/".join(static) if static else ("/" if pattern.startswith("/") else ".")


def glob_regex(pattern: str) -> re.Pattern:
    """A glob over "/"-separated keys: `*` and `?` stay within one folder, `**` crosses
    folders (`**/` also matches none), `[...]` (`[!...]`) is a character class."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1:j]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\").replace("[", "\\[") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


# ------------------------------------------------------------------------------ local
def _skipped_dir(path: Path) -> bool:
    return path.name.startswith((".", "_")) or (path / "_work").is_dir()


def _walk_local(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are not followed (loops)
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(here / d))
        found.extend(here / f for f in files if not f.startswith(".") and is_shard_name(f))
    return found


def _local_refs(root: Path, paths: list[Path], listing_failures: bool) -> list[ShardRef]:
    refs = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue  # a dangling link or a file gone since the listing
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name
        absolute = str(p.absolute())
        refs.setdefault(absolute, ShardRef(name=shard_name(rel), url=absolute, size=st.st_size,
                                           listing_failures=listing_failures))
    return sorted(refs.values(), key=lambda r: r.name)


def _resolve_local(spec: str) -> RawInput:
    path = Path(spec).expanduser().absolute()
    text = str(path)
    names = expand_braces(text)
    if path.exists() or (names == [text] and not _has_glob(text)):  # an existing path is never a pattern
        if not path.exists():
            raise InputError(f"input folder not found: {spec}")
        if path.is_dir():
            ledgers = tuple(sorted(p for p in path.glob(CRAWL_LEDGER_GLOB) if p.is_file()))
            shards = _local_refs(path, _walk_local(path), listing_failures=not ledgers)
            if not shards:
                raise InputError(f"no raw shards (*{', *'.join(SHARD_SUFFIXES)}) under {spec}")
            return RawInput(text, tuple(shards), path.name, ledgers)
        if not is_shard_name(path.name):
            raise InputError(f"--input {spec} is a file but not a raw shard ({', '.join(SHARD_SUFFIXES)})")
        return RawInput(text, tuple(_local_refs(path.parent, [path], True)), path.parent.name, ())
    # a pattern: names relative to its folder part
    root = Path(_static_dir(text))
    found, missing = [], []
    for name in names:
        if _has_glob(name):
            found.extend(Path(p) for p in globlib.glob(name, recursive=True) if is_shard_name(Path(p).name))
        elif not is_shard_name(Path(name).name):
            raise InputError(f"--input pattern names {name}, which is not a raw shard ({', '.join(SHARD_SUFFIXES)})")
        elif Path(name).is_file():
            found.append(Path(name))
        else:
            missing.append(name)
    if missing:
        raise InputError(f"{len(missing)} raw shards named by {spec} do not exist, e.g. {missing[0]}")
    shards = _local_refs(root, found, listing_failures=True)
    if not shards:
        raise InputError(f"no raw shards (*{', *'.join(SHARD_SUFFIXES)}) match {spec}")
    return RawInput(text, tuple(shards), root.name or "input", ())


# --------------------------------------------------------------------------------- s3
def _s3_settings() -> tuple[str | None, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


@functools.lru_cache(maxsize=8)
def s3_filesystem(endpoint: str | None, region: str | None, background_writes: bool = True):
    """pyarrow's S3 client (one per process and endpoint). Credentials: the AWS chain.
    background_writes=False sends each written part before the next write returns
    (publish.py: memory bounded by the part size)."""
    from pyarrow import fs

    kwargs = {"region": region or "us-east-1", "background_writes": background_writes}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return fs.S3FileSystem(**kwargs)


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"--input {url} names no bucket")
    return bucket, key


def _list_s3(filesystem, bucket: str, prefix: str) -> list:
    from pyarrow import fs

    base = f"{bucket}/{prefix}".rstrip("/")
    try:
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InputError(f"cannot list s3://{base}/: {' '.join(str(exc).split())[:300]}") from None
    return [i for i in infos if i.type == fs.FileType.File]


def _resolve_s3(spec: str) -> RawInput:
    from pyarrow import fs

    endpoint, region = _s3_settings()
    filesystem = s3_filesystem(endpoint, region)
    bucket, key = _split_s3(spec)

    def ref(path: str, size: int, root: str) -> ShardRef:
        rel = path[len(root):].lstrip("/") if root and path.startswith(root + "/") else path.rpartition("/")[2]
        return ShardRef(name=shard_name(rel), url=f"s3://{path}", size=int(size), listing_failures=True,
                        endpoint=endpoint, region=region)

    names = expand_braces(key)
    if names == [key] and not _has_glob(key):
        if is_shard_name(key.rpartition("/")[2]):  # one object
            try:
                info = filesystem.get_file_info(f"{bucket}/{key}")
            except OSError as exc:
                raise InputError(f"cannot read {spec}: {' '.join(str(exc).split())[:300]}") from None
            if info.type != fs.FileType.File:
                raise InputError(f"input not found: {spec}")
            root = f"{bucket}/{key}".rpartition("/")[0]
            return RawInput(spec, (ref(info.path, info.size, root),), root.rpartition("/")[2] or bucket, ())
        root = f"{bucket}/{key}".rstrip("/")
        listed = _list_s3(filesystem, bucket, key)
        rels = [info.path[len(root) + 1:] for info in listed]
        # `curate run` outputs (a folder holding _work/) are skipped, as in a local folder
        outputs = {rel[: rel.index("_work/")] for rel in rels if rel.startswith("_work/") or "/_work/" in rel}
        shards = []
        for info, rel in zip(listed, rels):
            segments = rel.split("/")
            if any(s.startswith((".", "_")) for s in segments[:-1]) or segments[-1].startswith(".") \
                    or not is_shard_name(segments[-1]) or any(rel.startswith(o) for o in outputs if o):
                continue
            shards.append(ref(info.path, info.size, root))
        if not shards:
            raise InputError(f"no raw shards (*{', *'.join(SHARD_SUFFIXES)}) under {spec}")
        return RawInput(spec, tuple(sorted(shards, key=lambda r: r.name)), root.rpartition("/")[2] or bucket, ())
    static = _static_dir(key)
    static = "" if static in (".", "/") else static
    root = f"{bucket}/{static}".rstrip("/")
    listed = None
    found: dict[str, ShardRef] = {}
    missing = []
    for name in names:
        if _has_glob(name):
            if listed is None:
                listed = _list_s3(filesystem, bucket, static)
            rx = glob_regex(name)
            for info in listed:
                k = info.path[len(bucket) + 1:]
                if rx.match(k) and is_shard_name(k.rpartition("/")[2]):
                    found.setdefault(info.path, ref(info.path, info.size, root))
        elif not is_shard_name(name.rpartition("/")[2]):
            raise InputError(f"--input pattern names s3://{bucket}/{name}, which is not a raw shard")
        else:
            try:
                info = filesystem.get_file_info(f"{bucket}/{name}")
            except OSError as exc:
                raise InputError(f"cannot read s3://{bucket}/{name}: {' '.join(str(exc).split())[:300]}") from None
            if info.type == fs.FileType.File:
                found.setdefault(info.path, ref(info.path, info.size, root))
            else:
                missing.append(f"s3://{bucket}/{name}")
    if missing:
        raise InputError(f"{len(missing)} raw shards named by {spec} do not exist, e.g. {missing[0]}")
    if not found:
        raise InputError(f"no raw shards (*{', *'.join(SHARD_SUFFIXES)}) match {spec}")
    return RawInput(spec, tuple(sorted(found.values(), key=lambda r: r.name)), root.rpartition("/")[2] or bucket, ())


# ------------------------------------------------------------------------- entry point
def resolve_input(spec: str | os.PathLike) -> RawInput:
    """--input -> the raw shards to read, in name order (see the module docstring)."""
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise InputError("--input is empty")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme and scheme.group(1).lower() == "s3":
        raw = _resolve_s3("s3://" + text[len(scheme.group(0)):])
    elif scheme:
        raise InputError(f"--input {text}: {scheme.group(1)}:// is not supported (a local path or s3:// url)")
    else:
        raw = _resolve_local(text)
    _check_unique(list(raw.shards), text)
    return raw


# ---------------------------------------------------------------------------- opening
class _RemoteRaw(io.RawIOBase):
    """A pyarrow RandomAccessFile as a raw Python stream, so io.BufferedReader can turn
    the reader's small reads into ranged GETs of STREAM_BUFFER bytes."""

    def __init__(self, f, url: str):
        self._f, self._url = f, url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._f.read(len(b))
        except OSError as exc:
            raise _io_error(self._url, exc) from None
        b[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_shard(ref: ShardRef) -> tuple[io.BufferedReader, int]:
    """(a seekable buffered binary stream over the shard, its size in bytes)."""
    if ref.remote:
        bucket, key = _split_s3(ref.url)
        try:
            f = s3_filesystem(ref.endpoint, ref.region).open_input_file(f"{bucket}/{key}")
            size = f.size()
        except OSError as exc:  # gone since it was listed, no access, no network
            raise _io_error(ref.url, exc) from None
        return io.BufferedReader(_RemoteRaw(f, ref.url), buffer_size=STREAM_BUFFER), size
    f = open(ref.url, "rb")
    try:
        return f, os.fstat(f.fileno()).st_size
    except BaseException:
        f.close()
        raise


def open_listing(ref: ShardRef):
    """A file object over the shard's listing, or None when it has none."""
    url = ref.listing_url
    if ref.remote:
        from pyarrow import fs

        bucket, key = _split_s3(url)
        filesystem = s3_filesystem(ref.endpoint, ref.region)
        try:
            if filesystem.get_file_info(f"{bucket}/{key}").type != fs.FileType.File:
                return None
            f = filesystem.open_input_file(f"{bucket}/{key}")
        except OSError as exc:
            raise _io_error(url, exc) from None
        # through _RemoteRaw, so that a network failure while parquet reads is a
        # ShardIOError and not one of the OSErrors a garbage listing gives
        return io.BufferedReader(_RemoteRaw(f, url), buffer_size=1 << 20)
    if not os.path.isfile(url):
        return None
    return open(url, "rb")
