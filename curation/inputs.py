"""What `curate run --input` reads: one place that turns the argument into an ordered
list of raw shard references, and opens them.

Four kinds of input (`--input-format`, default auto; curation/sources.py reads all but
the first):

* webdataset: raw shards, files ending in .tar, .tar.gz or .tgz (the forms below);
* parquet: Hugging Face parquet files (a folder of them, e.g. the Hub's
  data/train-00000-of-00002.parquet, a glob, one file, s3): one shard per file; the
  image/video/text/url columns are found or named (--image-column, --video-column,
  --text-column, --url-column), every other column is producer metadata;
* hf-disk: a `datasets` save_to_disk folder (state.json; or dataset_dict.json and a
  folder per split): one shard per .arrow file that state.json lists;
* files: a folder of images or videos with sidecars (cat.jpg + cat.txt/cat.caption +
  cat.json), in shards of sources.FILES_PER_SHARD samples named part-00000, ...

Auto: a folder with a save_to_disk marker is hf-disk; else one holding any raw shard
(or our crawl's ledger) is webdataset, its parquet files being listings; else one with
parquet files is parquet; else one with images or videos is files. A pattern or file
names raw shards, else .parquet (or .arrow) files.

Accepted forms:

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

Beside each raw shard (webdataset), `<stem>.parquet` is its listing (rawshards.py). Failed rows of a
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from .crawl import CRAWL_LEDGER_GLOB
from .errors import InputError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LISTING_SUFFIX = ".parquet"
# --input-format -> ShardRef.format
INPUT_FORMATS = {"auto": "auto", "webdataset": "tar", "parquet": "parquet", "hf-disk": "arrow", "files": "files"}
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
COLUMN_OPTIONS = ("image_column", "video_column", "text_column", "url_column")
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
    s3://bucket/key url; for "files", the folder), its size when listed, how its listing
    is read, and its format with what that format needs. Pickles and travels to Ray tasks
    as `token()`."""
    name: str
    url: str
    size: int = -1
    listing_failures: bool = False  # failed listing rows are inputs to account for
    endpoint: str | None = None     # s3 only: scheme://host:port, when not AWS itself
    region: str | None = None
    format: str = "tar"             # tar | parquet | arrow | files (curation/sources.py)
    image_column: str | None = None  # parquet/arrow: named columns (None: found)
    video_column: str | None = None
    text_column: str | None = None
    url_column: str | None = None
    members: tuple[str, ...] = ()   # files: the chunk's files, relative to url, in key order

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))  # a list after a token's JSON

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
    fmt = _table_format(text.rstrip("/").rpartition("/")[2]) or "tar"
    if text.startswith("s3://"):
        endpoint, region = _s3_settings()
        return ShardRef(name=shard_name(text.rstrip("/").rpartition("/")[2]), url=text, endpoint=endpoint, region=region,
                        format=fmt)
    try:
        size = os.stat(text).st_size
    except OSError:
        size = -1  # the reader reports it as an unreadable shard
    return ShardRef(name=shard_name(Path(text).name), url=text, size=size, format=fmt)


@dataclass(frozen=True)
class InputOptions:
    """How to read --input: its format (INPUT_FORMATS) and, for parquet and hf-disk,
    the columns named by the user (None: found from the features, types and names)."""
    format: str = "auto"
    image_column: str | None = None
    video_column: str | None = None
    text_column: str | None = None
    url_column: str | None = None

    def columns(self) -> dict:
        return {k: getattr(self, k) for k in COLUMN_OPTIONS if getattr(self, k) is not None}

    @classmethod
    def from_record(cls, record: dict) -> "InputOptions":
        """The options that read an input again as run.json's `input_options` recorded it
        (RawInput.options: the format found, in ShardRef.format's names)."""
        found = {v: k for k, v in INPUT_FORMATS.items()}
        fields = {k: record.get(k) for k in COLUMN_OPTIONS}
        return cls(format=found.get(record.get("format"), "auto"), **fields)


@dataclass(frozen=True)
class RawInput:
    """The resolved --input: what the run reads and how it is identified."""
    spec: str                          # the input as given (local paths made absolute)
    shards: tuple[ShardRef, ...]       # ordered by name
    source: str                        # samples' default source: the root's name
    crawl_ledgers: tuple[Path, ...]    # our crawl's ledgers (a local folder input only)
    options: InputOptions = field(default_factory=InputOptions)  # format: the one found (ShardRef.format)


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


def _table_format(name: str) -> str | None:
    """"x.parquet" -> "parquet", "x.arrow" -> "arrow", else None."""
    return next((f for s, f in TABLE_SUFFIXES.items() if name.endswith(s) and len(name) > len(s)), None)


def _name_format(name: str) -> str | None:
    return "tar" if is_shard_name(name) else _table_format(name)


def _pick_named(found: dict, forced: str, spec: str) -> str:
    """Among the data files a pattern matched ({format: ...}), the format read: raw
    shards first (parquet beside them are listings), then parquet, then arrow."""
    if forced in ("arrow", "files"):
        raise InputError(f"--input-format {'hf-disk' if forced == 'arrow' else 'files'} takes a folder, not {spec}")
    for fmt in ("tar", "parquet", "arrow"):
        if found.get(fmt) and forced in ("auto", fmt):
            return fmt
    return "tar" if forced == "auto" else forced


def _what_named(names: list[str]) -> str:
    return "raw shards" if all(is_shard_name(n.rpartition("/")[2]) for n in names) else "files"


def _no_data(spec: str, fmt: str, verb: str = "under") -> InputError:
    what = {"tar": f"raw shards (*{', *'.join(SHARD_SUFFIXES)})", "parquet": "parquet files (*.parquet)",
            "arrow": "arrow files", "files": f"images or videos"}[fmt]
    return InputError(f"no {what} {verb} {spec}")


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


def _walk_local(root: Path) -> list[tuple[str, int]]:
    """(path relative to root, size) of every regular file below it, by the folder rules."""
    found = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are not followed (loops)
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(here / d))
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = here / f
            try:
                st = p.stat()
            except OSError:
                continue  # a dangling link or a file gone since the listing
            if p.is_file():
                found.append((p.relative_to(root).as_posix(), st.st_size))
    return found


def _local_reader(root: str):
    from .sources import local_reader

    return local_reader(root)


def _resolve_folder(spec: str, source: str, entries: list[tuple[str, int]], root_url: str, opts: InputOptions,
                    ledgers: tuple, endpoint: str | None, region: str | None, read_text) -> RawInput:
    """A folder's files (relative path, size) -> its shards, in the format found or forced."""
    from . import sources

    forced = INPUT_FORMATS[opts.format]
    rels = {r for r, _ in entries}
    if forced in ("auto", "arrow") and rels & {"state.json", "dataset_dict.json"}:
        fmt = "arrow"
    elif forced == "arrow":
        raise InputError(f"{spec} is not a save_to_disk folder (no state.json or dataset_dict.json)")
    else:
        fmt = sources.pick_format(sorted(rels), forced, bool(ledgers), is_shard_name)
    if fmt not in ("parquet", "arrow") and opts.columns():
        raise InputError(f"--{next(iter(opts.columns())).replace('_', '-')} applies to parquet and hf-disk inputs; "
                         f"{spec} is read as {'webdataset' if fmt == 'tar' else fmt}")
    base = root_url.rstrip("/")

    def ref(rel: str, size: int, **kw) -> ShardRef:
        return ShardRef(name=shard_name(rel), url=f"{base}/{rel}", size=size, endpoint=endpoint, region=region, **kw)

    if fmt == "tar":
        shards = [ref(r, n, listing_failures=not ledgers) for r, n in entries if is_shard_name(r.rpartition("/")[2])]
    elif fmt == "parquet":
        shards = [ref(r, n, format="parquet", **opts.columns()) for r, n in entries if _table_format(r) == "parquet"]
    elif fmt == "arrow":
        sizes = dict(entries)
        shards = []
        for rel, features in sources.disk_files(rels, read_text):
            named = ShardRef(name="", url="", **opts.columns())
            shards.append(ref(rel, sizes[rel], format="arrow",
                              **{**opts.columns(), **sources.columns_from_features(features, named)}))
    else:
        shards = sources.files_shards(entries, lambda name, members, size: ShardRef(
            name=name, url=base, size=size, endpoint=endpoint, region=region, format="files", members=members))
    if not shards:
        raise _no_data(spec, fmt)
    return _finish(spec, shards, source, ledgers if fmt == "tar" else (), opts, fmt)


def _finish(spec: str, shards: list[ShardRef], source: str, ledgers: tuple, opts: InputOptions, fmt: str) -> RawInput:
    shards = sorted(shards, key=lambda r: r.name)
    if fmt in ("parquet", "arrow"):
        from .sources import check_first

        check_first(shards[0])
    return RawInput(spec, tuple(shards), source, ledgers, replace(opts, format=fmt))


def _local_refs(root: Path, paths: list[Path], listing_failures: bool = False, **fields) -> list[ShardRef]:
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
                                           listing_failures=listing_failures, **fields))
    return sorted(refs.values(), key=lambda r: r.name)


def _file_fields(fmt: str, opts: InputOptions, spec: str) -> dict:
    if fmt == "tar":
        if opts.columns():
            raise InputError(f"--{next(iter(opts.columns())).replace('_', '-')} applies to parquet and hf-disk inputs, "
                             f"not to the raw shards of {spec}")
        return {"listing_failures": True}
    return {"format": fmt, **opts.columns()}


def _resolve_local(spec: str, opts: InputOptions) -> RawInput:
    path = Path(spec).expanduser().absolute()
    text = str(path)
    names = expand_braces(text)
    forced = INPUT_FORMATS[opts.format]
    if path.exists() or (names == [text] and not _has_glob(text)):  # an existing path is never a pattern
        if not path.exists():
            raise InputError(f"input folder not found: {spec}")
        if path.is_dir():
            ledgers = tuple(sorted(p for p in path.glob(CRAWL_LEDGER_GLOB) if p.is_file()))
            return _resolve_folder(text, path.name, _walk_local(path), text, opts, ledgers, None, None,
                                   _local_reader(text))
        fmt = _name_format(path.name)
        if fmt is None or forced not in ("auto", fmt):
            raise InputError(f"--input {spec} is a file but not a raw shard ({', '.join(SHARD_SUFFIXES)}) or a "
                             ".parquet/.arrow file" + ("" if forced == "auto" else f" of --input-format {opts.format}"))
        shards = _local_refs(path.parent, [path], **_file_fields(fmt, opts, spec))
        return _finish(text, shards, path.parent.name, (), opts, fmt)
    # a pattern: names relative to its folder part
    root = Path(_static_dir(text))
    found: dict[str, list[Path]] = {}
    missing = []
    for name in names:
        if _has_glob(name):
            for p in globlib.glob(name, recursive=True):
                if _name_format(Path(p).name):
                    found.setdefault(_name_format(Path(p).name), []).append(Path(p))
        elif not _name_format(Path(name).name):
            raise InputError(f"--input pattern names {name}, which is not a raw shard ({', '.join(SHARD_SUFFIXES)}) "
                             "or a .parquet/.arrow file")
        elif Path(name).is_file():
            found.setdefault(_name_format(Path(name).name), []).append(Path(name))
        else:
            missing.append(name)
    if missing:
        raise InputError(f"{len(missing)} {_what_named(missing)} named by {spec} do not exist, e.g. {missing[0]}")
    fmt = _pick_named(found, forced, spec)
    shards = _local_refs(root, found.get(fmt, []), **_file_fields(fmt, opts, spec))
    if not shards:
        raise _no_data(spec, fmt, "match")
    return _finish(text, shards, root.name or "input", (), opts, fmt)


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


def _s3_reader(filesystem, root: str):
    """read_text for the small JSON files of a save_to_disk folder on s3."""
    from .sources import MAX_INFO_BYTES

    def read_text(rel: str) -> str:
        try:
            with filesystem.open_input_file(f"{root}/{rel}") as f:
                data = f.read(MAX_INFO_BYTES + 1)
        except OSError as exc:
            raise InputError(f"cannot read s3://{root}/{rel}: {' '.join(str(exc).split())[:300]}") from None
        if len(data) > MAX_INFO_BYTES:
            raise InputError(f"s3://{root}/{rel} is over {MAX_INFO_BYTES} bytes")
        return data.decode("utf-8", "replace")
    return read_text


def _resolve_s3(spec: str, opts: InputOptions) -> RawInput:
    from pyarrow import fs

    endpoint, region = _s3_settings()
    filesystem = s3_filesystem(endpoint, region)
    bucket, key = _split_s3(spec)
    forced = INPUT_FORMATS[opts.format]

    def ref(path: str, size: int, root: str, fmt: str) -> ShardRef:
        rel = path[len(root):].lstrip("/") if root and path.startswith(root + "/") else path.rpartition("/")[2]
        return ShardRef(name=shard_name(rel), url=f"s3://{path}", size=int(size), endpoint=endpoint, region=region,
                        **_file_fields(fmt, opts, spec))

    names = expand_braces(key)
    if names == [key] and not _has_glob(key):
        fmt = _name_format(key.rpartition("/")[2])
        if fmt is not None:  # one object
            if forced not in ("auto", fmt):
                raise InputError(f"--input {spec} is not a folder or file of --input-format {opts.format}")
            try:
                info = filesystem.get_file_info(f"{bucket}/{key}")
            except OSError as exc:
                raise InputError(f"cannot read {spec}: {' '.join(str(exc).split())[:300]}") from None
            if info.type != fs.FileType.File:
                raise InputError(f"input not found: {spec}")
            root = f"{bucket}/{key}".rpartition("/")[0]
            return _finish(spec, [ref(info.path, info.size, root, fmt)], root.rpartition("/")[2] or bucket, (), opts, fmt)
        root = f"{bucket}/{key}".rstrip("/")
        listed = _list_s3(filesystem, bucket, key)
        rels = [info.path[len(root) + 1:] for info in listed]
        # `curate run` outputs (a folder holding _work/) are skipped, as in a local folder
        outputs = {rel[: rel.index("_work/")] for rel in rels if rel.startswith("_work/") or "/_work/" in rel}
        entries = []
        for info, rel in zip(listed, rels):
            segments = rel.split("/")
            if any(s.startswith((".", "_")) for s in segments[:-1]) or segments[-1].startswith(".") \
                    or any(rel.startswith(o) for o in outputs if o):
                continue
            entries.append((rel, int(info.size)))
        return _resolve_folder(spec, root.rpartition("/")[2] or bucket, sorted(entries), f"s3://{root}", opts, (),
                               endpoint, region, _s3_reader(filesystem, root))
    static = _static_dir(key)
    static = "" if static in (".", "/") else static
    root = f"{bucket}/{static}".rstrip("/")
    listed = None
    found: dict[str, dict[str, tuple]] = {}
    missing = []
    for name in names:
        if _has_glob(name):
            if listed is None:
                listed = _list_s3(filesystem, bucket, static)
            rx = glob_regex(name)
            for info in listed:
                k = info.path[len(bucket) + 1:]
                fmt = _name_format(k.rpartition("/")[2])
                if rx.match(k) and fmt:
                    found.setdefault(fmt, {}).setdefault(info.path, (info.path, info.size))
        elif not _name_format(name.rpartition("/")[2]):
            raise InputError(f"--input pattern names s3://{bucket}/{name}, which is not a raw shard or a .parquet/.arrow file")
        else:
            try:
                info = filesystem.get_file_info(f"{bucket}/{name}")
            except OSError as exc:
                raise InputError(f"cannot read s3://{bucket}/{name}: {' '.join(str(exc).split())[:300]}") from None
            if info.type == fs.FileType.File:
                found.setdefault(_name_format(name.rpartition("/")[2]), {}).setdefault(info.path, (info.path, info.size))
            else:
                missing.append(f"s3://{bucket}/{name}")
    if missing:
        raise InputError(f"{len(missing)} {_what_named(missing)} named by {spec} do not exist, e.g. {missing[0]}")
    fmt = _pick_named(found, forced, spec)
    shards = [ref(path, size, root, fmt) for path, size in found.get(fmt, {}).values()]
    if not shards:
        raise _no_data(spec, fmt, "match")
    return _finish(spec, shards, root.rpartition("/")[2] or bucket, (), opts, fmt)


# ------------------------------------------------------------------------- entry point
def resolve_input(spec: str | os.PathLike, options: InputOptions | None = None) -> RawInput:
    """--input -> the raw shards to read, in name order (see the module docstring)."""
    opts = options or InputOptions()
    if opts.format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {opts.format!r}; formats are {list(INPUT_FORMATS)}")
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise InputError("--input is empty")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme and scheme.group(1).lower() == "s3":
        raw = _resolve_s3("s3://" + text[len(scheme.group(0)):], opts)
    elif scheme:
        raise InputError(f"--input {text}: {scheme.group(1)}:// is not supported (a local path or s3:// url)")
    else:
        raw = _resolve_local(text, opts)
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


# --------------------------------------------------------------- a finished run's input
def raw_shards_at_hand(run_root: str | os.PathLike) -> tuple[dict[str, ShardRef], str, str]:
    """({raw shard name: ShardRef}, source, note) for the raw shards a finished run read,
    as its `_work/run.json` recorded them (input, input options, names and sizes), when
    they are still where they were: the report's thumbnails and `curate browse` show
    dropped and failed samples from them. Only shards with the recorded name and size
    count. An object store input is never listed from here (a report or a page view
    does not reach the network); note says why nothing is at hand."""
    try:
        run = json.loads((Path(run_root) / "_work" / "run.json").read_text())
    except (OSError, ValueError):
        return {}, "", "the run's _work/run.json is gone: raw shards unknown"
    spec, sizes = run.get("input"), run.get("raw_shards")
    if not isinstance(spec, str) or not isinstance(sizes, dict):
        return {}, "", "run.json names no input"
    if spec.startswith("s3://"):
        return {}, "", "the raw shards are in an object store: not read from here"
    options = run.get("input_options")  # how the run read it (format, named columns)
    try:
        raw = resolve_input(spec, InputOptions.from_record(options) if isinstance(options, dict) else None)
    except (InputError, OSError, TypeError, ValueError) as exc:
        return {}, "", f"raw shards not at hand ({' '.join(str(exc).split())[:200]})"
    refs = {r.name: r for r in raw.shards if not r.remote and sizes.get(r.name) == r.size}
    return refs, raw.source, "" if refs else "the recorded raw shards are not where the run read them"
