"""Media straight out of tar shards, by offset: an index per shard (member name ->
where its bytes start, how many), built once from the headers and kept in a bounded
in-memory cache, then a seek and a read of exactly that range. Nothing is unpacked.

Tars are hostile (raw shards come from anywhere): headers are read through the raw
shard reader's safe TarInfo (no huge extended headers, no negative sizes), only regular
members are indexed, a member whose range runs past the end of the file is left out,
and the first of two members with one name wins (as the raw shard reader's first sample
with a key does). Only plain tars on the local disk are served; a compressed or remote
shard has no index (it cannot be read by offset).

Content types come from the member name's extension through a fixed map and are never
guessed from the bytes; an extension outside the map is not served.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..rawshards import _SafeTarInfo, split_member

CONTENT_TYPES = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
    "mp4": "video/mp4", "webm": "video/webm", "mkv": "video/x-matroska", "mov": "video/quicktime",
    "txt": "text/plain; charset=utf-8", "caption": "text/plain; charset=utf-8", "json": "application/json",
}
# Derived from the one table above, so what is served as an image or a video cannot disagree with it.
IMAGE_EXTS = frozenset(e for e, t in CONTENT_TYPES.items() if t.startswith("image/"))
VIDEO_EXTS = frozenset(e for e, t in CONTENT_TYPES.items() if t.startswith("video/"))
# What a member is called in a URL: "jpg", "0.png", "mp4" (the part after the sample's key).
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(?:\.[A-Za-z0-9_-]{1,63}){0,3}\Z")
MAX_MEMBERS = 200_000  # a shard holding more is indexed this far
MAX_CACHED_MEMBERS = 2_000_000  # over all cached indexes: the oldest go first
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def content_type(member: str) -> str | None:
    """The content type of a member named like `0.jpg` / `mp4`, from its last extension."""
    return CONTENT_TYPES.get(member.rsplit(".", 1)[-1].lower())


def servable(member) -> bool:
    return isinstance(member, str) and bool(MEMBER_NAME.match(member)) and content_type(member) is not None


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


class TarIndex:
    """One shard's regular members: by full name, and per sample key the member names
    after the key in tar order ("jpg", "0.jpg", "json", ...)."""

    def __init__(self, path: Path):
        self.path = path
        self.members: dict[str, Member] = {}
        self.by_key: dict[str, list[str]] = {}
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if any(f.read(6).startswith(m) for m in _COMPRESSED_MAGIC):
                raise ValueError("a compressed shard cannot be read by offset")
            f.seek(0)
            try:
                tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_SafeTarInfo)
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise ValueError(f"not a tar: {exc}") from None
            try:
                while len(self.members) < MAX_MEMBERS:
                    try:
                        info = tar.next()
                    except Exception:  # a cut or corrupt header: what came before stays indexed
                        break
                    if info is None:
                        break
                    if not info.isreg() or info.offset_data + info.size > file_size or info.name in self.members:
                        continue
                    self.members[info.name] = Member(info.offset_data, info.size)
                    key, _ = split_member(info.name)
                    if info.name.startswith(key + "."):
                        self.by_key.setdefault(key, []).append(info.name[len(key) + 1:])
                    tar.members.clear()  # tarfile keeps every TarInfo otherwise
            finally:
                tar.close()

    def sample_members(self, key: str) -> list[str]:
        return list(self.by_key.get(key, ()))


class IndexCache:
    """TarIndex per shard path, built once on first use; at most `capacity` shards and
    MAX_CACHED_MEMBERS members kept (least recently used go first)."""

    def __init__(self, capacity: int = 64, max_members: int = MAX_CACHED_MEMBERS):
        self.capacity, self.max_members = capacity, max_members
        self._lock = threading.Lock()
        self._cache: OrderedDict[Path, TarIndex | str] = OrderedDict()
        self._building: dict[Path, threading.Lock] = {}

    def get(self, path: Path) -> TarIndex | None:
        """The shard's index, or None when it has none (missing, compressed, not a tar)."""
        found = self._lookup(path)
        if found is None:
            with self._lock:
                build_lock = self._building.setdefault(path, threading.Lock())
            with build_lock:  # one build per shard, even when a page asks for many of its media at once
                found = self._lookup(path)
                if found is None:
                    try:
                        found = TarIndex(path)
                    except (OSError, ValueError) as exc:
                        found = str(exc)
                    with self._lock:
                        self._cache[path] = found
                        while len(self._cache) > 1 and (len(self._cache) > self.capacity or self._members() > self.max_members):
                            self._cache.popitem(last=False)
                        self._building.pop(path, None)
        return found if isinstance(found, TarIndex) else None

    def _members(self) -> int:
        return sum(len(i.members) for i in self._cache.values() if isinstance(i, TarIndex))

    def _lookup(self, path: Path):
        with self._lock:
            found = self._cache.get(path)
            if found is not None:
                self._cache.move_to_end(path)
            return found


def read_range(path: Path, member: Member, start: int = 0, end: int | None = None, chunk: int = 1 << 20):
    """Yield bytes [start, end] (inclusive) of a member, read by seek from its tar."""
    end = member.size - 1 if end is None else min(end, member.size - 1)
    with open(path, "rb") as f:
        f.seek(member.offset + start)
        left = end - start + 1
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                break
            left -= len(data)
            yield data
