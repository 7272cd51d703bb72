"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the new
one, never half of one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, killed mid-write...: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(data, path: str | Path) -> None:
    """A pandas DataFrame (index dropped) or a pyarrow Table, written to a temporary
    name and renamed into place."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if hasattr(data, "to_parquet"):
            data.to_parquet(tmp, index=False)
        else:
            pq.write_table(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def listing_digest(paths: list[str | Path], max_entries: int = 1_000_000) -> str:
    """A digest of every file under `paths` (relative name, size, mtime): it changes
    when a file is added, removed, replaced or edited, without reading the bytes. Missing
    paths count as missing; past `max_entries` files the rest are not looked at."""
    h, seen = hashlib.sha256(), 0
    for top in map(Path, paths):
        h.update(f"\0{top}".encode())
        if top.is_file():
            files = [top]
        elif top.is_dir():
            files = sorted(Path(d) / f for d, _, names in os.walk(top) for f in names)
        else:
            h.update(b"\0missing")
            continue
        for f in files:
            seen += 1
            if seen > max_entries:
                return h.hexdigest()
            try:
                st = f.stat()
            except OSError:
                continue
            h.update(f"\0{f.relative_to(top) if f != top else ''}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()
