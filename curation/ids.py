"""Stable identifiers. A uid is derived from where a sample came from, never random,
so re-running any stage gives every sample the same identity."""

import hashlib


def make_uid(source: str, position: int | str) -> str:
    """uid of the row at `position` of url list `source` (16 hex chars). For shards
    from producers that recorded no uid, position is the sample's key in its shard."""
    return hashlib.blake2b(f"{source}\x1f{position}".encode(), digest_size=8).hexdigest()


def seeded_rank(seed: int, uid: str) -> str:
    """A sort key that orders uids pseudo-randomly but reproducibly for a given seed."""
    return hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
