"""Outputs on an object store: `curate run ... --out s3://bucket/prefix` (and
`curation.run(..., out="s3://...")`).

The job needs a local working folder (stage A's parts, stage B's DuckDB, the markers a
resume reads), so a run with an s3:// --out runs in a local *stage folder* exactly as a
local run would: `--stage-dir DIR`, by default `~/.cache/curation/stage/<hash of the
url>` (`$XDG_CACHE_HOME` if set; `stage_folder` is the one place that says so). Then
`publish_run` uploads what a user reads, mirroring the folder's layout:

  1. tier data: tiers/<tier>/*.tar, the sidecar .parquet, .clip.npy;
  2. the small files: ledger.parquet, summary.json, the tier cards (README.md),
     _work/run.json (the recipe plan/export read), report.html or plan.json if written;
  3. the tier manifests, after everything they name;
  4. _SUCCESS, last: a reader that waits for it sees a whole run.

Everything else under _work/ stays local. Uploads stream each file in CHUNK-byte parts
through pyarrow's S3 output stream (a multipart upload; an object appears only when it
completes), a few files at a time, with background writes off: memory is about
WORKERS x CHUNK, whatever the file sizes.

Resume: pyarrow cannot store an object's own metadata, so the sha256 of every object
uploaded is recorded in `_work/published.json` on the store (written every
RECORD_SECONDS and at the end of each step). A file is skipped when the listing shows
its object with the same size and the record the same sha256; anything else (missing,
other size, other or unrecorded content) is uploaded again. A re-run after a crash or a
SIGKILL therefore uploads what is missing and ends with the same objects as an
uninterrupted run. Objects that are only missing are filled in; before an object that
is there is replaced, _SUCCESS and the manifests are deleted (and uploaded again last),
and so are objects under tiers/ that the run does not hold (left by an unfinished run of
another recipe or input), so no manifest of ours names an object that is not there. A prefix holding a finished run of another recipe or input is refused
(`check_destination`), as a local --out is.

Everything that reads a run (query, plan, verify, report, export) reads the stage folder;
given an s3:// --root, they say so (`refuse_url`).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, CurationError, InputError
from .fsutil import atomic_write_text, file_sha256

CHUNK = 8 << 20          # bytes per write: one multipart part (S3's minimum part is 5 MiB)
WORKERS = 4              # files uploaded at once
RECORD = "_work/published.json"
RUN_INFO = "_work/run.json"
PROBE = "_work/.write-probe"  # put and deleted before a run: can we write here at all?
SUCCESS = "_SUCCESS"
RECORD_SECONDS = 30.0
LOCAL_HASHES = "_work/publish_hashes.json"  # (size, mtime_ns, sha256) per file, in the stage folder
EXPORT_HASHES = ".curation-hashes.json"        # the same beside an export
MAX_SMALL_OBJECT = 64 << 20  # run.json or the record read back from the store
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PublishError(CurationError):
    """The object store could not be written or read while publishing; a re-run resumes."""


def url_scheme(value) -> str | None:
    """"s3" for "s3://...", None for a local path."""
    m = _SCHEME.match(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def _split(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at the ends), checked."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket):
        raise InputError(f"--out {url}: {bucket!r} is not a bucket name")
    if any(c in prefix for c in "*?[]{}") or any(seg in (".", "..") for seg in prefix.split("/")) \
            or "//" in prefix or any(ord(c) < 32 for c in prefix):
        raise InputError(f"--out {url}: an output prefix is a plain path (no wildcards, braces, '.', '..' or '//')")
    return bucket, prefix


def normalize(url: str) -> str:
    """One spelling per destination: scheme lower case, no trailing slash."""
    bucket, prefix = _split("s3://" + url[len(_SCHEME.match(url).group(0)):])
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def stage_folder(url: str, stage_dir: str | os.PathLike | None = None, kind: str = "stage") -> Path:
    """Where a run (kind "stage"; an export: "export") with --out `url` works: `stage_dir`,
    or a folder under the user's cache named by a hash of the url (the same url always
    gets the same folder)."""
    if stage_dir is not None:
        return Path(stage_dir).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256(normalize(url).encode()).hexdigest()[:16]
    return Path(cache) / "curation" / kind / digest


@dataclass(frozen=True)
class Destination:
    local: Path        # where the job runs and writes (the output itself when url is None)
    url: str | None    # s3://bucket/prefix to publish to


def destination(out, stage_dir=None, ray_address: str | None = None) -> Destination:
    """--out (and --stage-dir) -> where the run works and where it publishes. Refuses what
    cannot work, with one line."""
    scheme = url_scheme(out)
    if scheme is None:
        if stage_dir is not None:
            raise ConfigError("--stage-dir is for --out s3://...; a local --out is itself the folder the run works in")
        return Destination(Path(out), None)
    if scheme != "s3":
        raise InputError(f"--out {out}: {scheme}:// is not supported (a local folder or s3://bucket/prefix)")
    url = normalize(os.fspath(out))
    if stage_dir is not None and url_scheme(stage_dir) is not None:
        raise ConfigError(f"--stage-dir {stage_dir}: the stage folder is a local folder (the run works in it)")
    if ray_address and stage_dir is None:
        raise ConfigError(f"--out {url} with --ray-address needs --stage-dir on a filesystem every node shares: the "
                          "workers write the tier shards there before they are uploaded (the default is under this "
                          "machine's ~/.cache)")
    return Destination(stage_folder(url, stage_dir), url)


def refuse_url(root) -> None:
    """An s3:// --root: the readers read the run's local stage folder."""
    scheme = url_scheme(root)
    if scheme is None:
        return
    hint = ""
    if scheme == "s3":
        try:
            hint = f" (for --out {normalize(os.fspath(root))} without --stage-dir: {stage_folder(os.fspath(root))})"
        except InputError:
            pass
    raise InputError(f"--root {root}: curate's readers (query, plan, verify, report, export, browse) read a run's "
                     f"local folder, not the object store; give the stage folder `curate run --out {scheme}://...` "
                     f"ran in{hint}")


# ------------------------------------------------------------------------- what is published
def run_files(root: Path) -> list[list[str]]:
    """The files of a finished run folder that a user reads, relative ("/"), in upload
    steps: tier data, small files, manifests, _SUCCESS (see the module docstring)."""
    data, small, manifests, last = [], [], [], []
    for folder, dirs, files in os.walk(root):  # links are not followed: the run writes none
        here = Path(folder)
        rel_dir = here.relative_to(root).as_posix()
        if rel_dir == ".":
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        else:
            dirs[:] = [] if rel_dir == "_work" else sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = here / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if name.startswith(".") or name.endswith(".tmp") or p.is_symlink() or not p.is_file():
                continue
            if rel_dir == "_work" and rel != RUN_INFO:
                continue
            parts = rel.split("/")
            if rel == SUCCESS:
                last.append(rel)
            elif _is_manifest(rel):
                manifests.append(rel)
            elif parts[0] == "tiers" and len(parts) == 3 and name != "README.md":
                data.append(rel)
            else:
                small.append(rel)
    return [data, small, manifests, last]


def _is_manifest(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == "tiers" and parts[2] == "manifest.json"


# ------------------------------------------------------------------------------- the store
class _Store:
    """One prefix of an object store, through inputs.s3_filesystem."""

    def __init__(self, url: str):
        from .inputs import _s3_settings, s3_filesystem

        self.url = url
        self.bucket, self.prefix = _split(url)
        endpoint, region = _s3_settings()
        # background writes off: each part is sent before the next is read (bounded memory)
        self.fs = s3_filesystem(endpoint, region, background_writes=False)

    def path(self, rel: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, rel) if p)

    def _error(self, what: str, rel: str, exc: BaseException) -> PublishError:
        return PublishError(f"cannot {what} {self.url}/{rel}: {' '.join(str(exc).split())[:300]}; "
                            "run the same command again to resume")

    def listing(self) -> dict[str, int]:
        from pyarrow import fs

        base = self.path("")
        try:
            infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise self._error("list", "", exc) from None
        return {i.path[len(base) + 1:]: i.size for i in infos if i.type == fs.FileType.File}

    def read(self, rel: str, size: int) -> bytes | None:
        """A small object (run.json, the record) or None when it is too big to be ours."""
        if size > MAX_SMALL_OBJECT:
            return None
        try:
            with self.fs.open_input_stream(self.path(rel), compression=None) as f:
                return f.read(MAX_SMALL_OBJECT + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("read", rel, exc) from None

    def put(self, local: Path, rel: str) -> None:
        """Stream one file up. pyarrow completes the upload when its stream closes, even
        after an error, so a file cut short is deleted again (and is never recorded)."""
        path = self.path(rel)
        kind = mimetypes.guess_type(rel)[0] or "application/octet-stream"
        try:
            out = self.fs.open_output_stream(path, compression=None, metadata={"Content-Type": kind})
        except OSError as exc:
            raise self._error("write", rel, exc) from None
        try:
            with open(local, "rb") as f:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while n := f.readinto(buf):
                    try:
                        out.write(view[:n])
                    except OSError as exc:
                        raise self._error("write", rel, exc) from None
        except BaseException:
            for step in (out.close, lambda: self.fs.delete_file(path)):
                try:
                    step()
                except Exception:
                    pass
            raise
        try:
            out.close()
        except OSError as exc:
            raise self._error("write", rel, exc) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self.path(rel), compression=None,
                                            metadata={"Content-Type": "application/json"}) as out:
                out.write(data)
        except OSError as exc:
            raise self._error("write", rel, exc) from None

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("delete", rel, exc) from None


def _json_object(data: bytes | None) -> dict:
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _identity(doc: dict) -> tuple:
    return tuple(doc.get(k) for k in ("config_hash", "raw_shards", "input_options", "data_format"))


def check_destination(url: str, run_info: Path) -> None:
    """Before the job runs: the bucket must exist and take a write (an object put and
    deleted again), and the prefix must not hold a finished run of another recipe or
    input (as a finished local --out is never overwritten)."""
    from pyarrow import fs

    store = _Store(url)
    try:
        bucket = store.fs.get_file_info(store.bucket)
    except OSError as exc:
        raise store._error("reach", "", exc) from None
    if bucket.type == fs.FileType.NotFound:
        raise InputError(f"--out {url}: bucket {store.bucket} does not exist (or is not visible with these credentials)")
    store.write_bytes(PROBE, b"")
    store.delete(PROBE)
    listed = store.listing()
    if SUCCESS not in listed:
        return
    theirs = _json_object(store.read(RUN_INFO, listed.get(RUN_INFO, 0))) if RUN_INFO in listed else {}
    ours = _json_object(run_info.read_bytes())
    if _identity(theirs) == _identity(ours):
        return
    if theirs.get("config_hash") != ours.get("config_hash"):
        raise ConfigError(f"{url} holds a finished run of another pipeline config (hash {theirs.get('config_hash')}, "
                          f"now {ours.get('config_hash')}); use a new --out")
    raise InputError(f"{url} holds a finished run of other raw shards than {ours.get('input')}; use a new --out")


def publish_run(local: Path, url: str, *, workers: int = WORKERS, log=None) -> dict:
    """Upload a finished run folder's user files to `url` (see the module docstring).
    Returns counts: uploaded, uploaded_bytes, skipped, deleted."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if not (local / SUCCESS).exists():
        raise CurationError(f"{local} holds no finished run to publish")
    steps = run_files(local)
    return _publish(local, url, steps, workers=workers, log=log)


def _publish(local: Path, url: str, steps: list[list[str]], *, workers: int, log, record_name: str = RECORD) -> dict:
    store = _Store(url)
    listed = store.listing()
    record_doc = _json_object(store.read(record_name, listed[record_name])) if record_name in listed else {}
    record = {k: v for k, v in (record_doc.get("files") or {}).items()
              if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)}
    files = [rel for step in steps for rel in step]
    hashes, sizes = _local_hashes(local / (LOCAL_HASHES if record_name == RECORD else EXPORT_HASHES), local,
                                  files, workers)

    def current(rel: str) -> bool:
        return listed.get(rel) == sizes[rel] and record.get(rel, {}).get("sha256") == hashes[rel]

    todo = {rel for rel in files if not current(rel)}
    stale = sorted(rel for rel in listed if rel.startswith("tiers/") and rel not in sizes)
    stats = {"uploaded": 0, "uploaded_bytes": 0, "skipped": len(files) - len(todo), "deleted": 0}
    if not todo and not stale:
        if not record_doc:
            _write_record(store, record, record_name)
        log(f"published {url}: all {len(files)} files already there")
        return stats
    # An object that is there is about to change, or one of another run to go: first take
    # down what says "complete" (_SUCCESS, the manifests); they go up again at the end.
    # Objects that are only missing are filled in under what is there.
    if stale or any(rel in listed for rel in todo):
        for rel in sorted(r for r in listed if r == SUCCESS or _is_manifest(r)):
            store.delete(rel)
            record.pop(rel, None)
            if rel in sizes:
                todo.add(rel)
        for rel in stale:
            if not _is_manifest(rel):
                store.delete(rel)
                record.pop(rel, None)
        stats["deleted"] = len(stale)
    stats["skipped"] = len(files) - len(todo)
    lock = threading.Lock()
    flushed = [time.monotonic()]

    def upload(rel: str) -> None:
        store.put(local / rel, rel)
        with lock:
            record[rel] = {"size": sizes[rel], "sha256": hashes[rel]}
            stats["uploaded"] += 1
            stats["uploaded_bytes"] += sizes[rel]

    for step in steps:
        batch = [rel for rel in step if rel in todo]
        if not batch:
            continue
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(upload, rel) for rel in batch}
            while pending:
                done, pending = wait(pending, timeout=RECORD_SECONDS, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    wait(pending)
                    with lock:
                        _write_record(store, dict(record), record_name)
                    raise failed[0].exception()
                if time.monotonic() - flushed[0] >= RECORD_SECONDS:
                    with lock:
                        snapshot = dict(record)
                    _write_record(store, snapshot, record_name)
                    flushed[0] = time.monotonic()
        _write_record(store, record, record_name)  # each step ends recorded: the next one builds on it
    log(f"published {url}: uploaded {stats['uploaded']} of {len(files)} files "
        f"({stats['uploaded_bytes'] / 1e6:.1f} MB), {stats['skipped']} already there"
        + (f", deleted {stats['deleted']} stale" if stats["deleted"] else ""))
    return stats


def _local_hashes(cache_path: Path, local: Path, files: list[str], workers: int) -> tuple[dict[str, str], dict[str, int]]:
    """sha256 and size of each file, hashed again only when its size or mtime changed
    (cached in `cache_path`, so a re-run does not read a whole output again)."""
    cache = _json_object(cache_path.read_bytes()) if cache_path.is_file() else {}
    stats = {rel: (local / rel).stat() for rel in files}
    keys = {rel: [st.st_size, st.st_mtime_ns] for rel, st in stats.items()}
    hashes = {rel: cache[rel][2] for rel in files
              if isinstance(cache.get(rel), list) and len(cache[rel]) == 3 and cache[rel][:2] == keys[rel]}
    todo = [rel for rel in files if rel not in hashes]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes.update(zip(todo, pool.map(lambda rel: file_sha256(local / rel), todo)))
    if todo:
        atomic_write_text(cache_path, json.dumps({rel: [*keys[rel], hashes[rel]] for rel in files}) + "\n")
    return hashes, {rel: st.st_size for rel, st in stats.items()}


def _write_record(store: _Store, record: dict, name: str = RECORD) -> None:
    doc = {"about": "sha256 of each object curation uploaded here (curation/publish.py)",
           "files": dict(sorted(record.items()))}
    store.write_bytes(name, (json.dumps(doc, indent=0, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------- export
EXPORT_RECORD = ".curation-published.json"  # hidden: dataset loaders skip it


def export(fmt: str, root, out, *, stage_dir=None, log=None, **options) -> dict:
    """`curate export` to a local folder, or to s3://: then the export is written into a
    local stage folder (`stage_folder(url, stage_dir, "export")`) and uploaded, media
    first and the records that name them after (exporting into the same url again
    uploads only what changed). Returns tiers.export.export's result, with
    `published` (the url, upload counts) for s3://."""
    from .tiers.export import export as export_local

    refuse_url(root)
    scheme = url_scheme(out)
    if scheme is None:
        if stage_dir is not None:
            raise ConfigError("--stage-dir is for --out s3://...; a local --out is itself the export folder")
        return export_local(fmt, root, out, **options)
    if scheme != "s3":
        raise InputError(f"--out {out}: {scheme}:// is not supported (a local folder or s3://bucket/prefix)")
    url = normalize(os.fspath(out))
    local = stage_folder(url, stage_dir, "export")
    result = export_local(fmt, root, local, **options)
    files = []
    for folder, dirs, names in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(folder).relative_to(local).as_posix()
        for name in sorted(names):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not name.startswith(".") and not name.endswith(".tmp") and not (local / rel).is_symlink():
                files.append(rel)
    media = [r for r in files if (mimetypes.guess_type(r)[0] or "").startswith(("image/", "video/"))]
    records = [r for r in files if r not in set(media)]
    stats = _publish(local, url, [media, records], workers=WORKERS, record_name=EXPORT_RECORD,
                     log=log or (lambda m: print(m, file=sys.stderr, flush=True)))
    result["published"] = {"url": url, "stage": str(local), **stats}
    return result
