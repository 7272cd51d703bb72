"""Writing WebDataset tars reproducibly: fixed mtime, owner and mode, members in the
order given, so the same samples always give the same bytes."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_bytes(samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> bytes:
    """samples: (key, [(ext, data), ...]) -> the bytes of a tar with key.ext members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()
