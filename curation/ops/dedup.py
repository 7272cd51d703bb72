"""Exact and perceptual-hash near-duplicate removal over the whole run.

Both keep one representative per group and drop the rest with reason duplicate_exact /
duplicate_near and dup_of = the representative's uid. Groups never mix kinds: a document
whose first image looks like a single image is not a redundant sample. The representative is the
largest image (most pixels), ties broken by uid, so the choice never depends on the
order in which Ray delivered the rows.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .base import LIVE, GlobalOp, register


def _preference_order(rows: pd.DataFrame) -> pd.DataFrame:
    pixels = rows["width"].astype("int64") * rows["height"].astype("int64")
    return rows.assign(_pixels=pixels).sort_values(["_pixels", "uid"], ascending=[False, True])


def _mark_duplicates(table: pd.DataFrame, groups: list[list[int]], reason: str) -> pd.DataFrame:
    if "dup_of" not in table.columns:
        table["dup_of"] = None
    for members in groups:
        if len(members) < 2:
            continue
        ordered = _preference_order(table.loc[members])
        keep = ordered.index[0]
        dups = ordered.index[1:]
        table.loc[dups, "status"] = "dropped"
        table.loc[dups, "reason"] = reason
        table.loc[dups, "dup_of"] = table.at[keep, "uid"]
    return table


@register
class ExactDedup(GlobalOp):
    """Byte-identical media (same sha256)."""

    name = "exact_dedup"
    version = "1"

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        live = table[(table["status"] == LIVE) & table["sha256"].notna()]
        groups = [list(idx) for idx in live.groupby(["kind", "sha256"]).groups.values()]
        return _mark_duplicates(table, groups, "duplicate_exact")


def near_duplicate_pairs(hashes: np.ndarray, max_hamming: int) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, of 64-bit hashes within max_hamming bits.

    Exact, not approximate: split the 64 bits into max_hamming + 1 bands; two hashes
    within max_hamming bits agree on at least one band (pigeonhole), so only pairs that
    share a band value are compared.
    """
    n_bands = max_hamming + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    seen: set[tuple[int, int]] = set()
    pairs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = np.uint64(((1 << (hi - lo)) - 1) << lo)
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, band in enumerate((hashes & mask).tolist()):
            buckets[band].append(i)
        for members in buckets.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    if (a, b) in seen:
                        continue
                    seen.add((a, b))
                    if int(hashes[a] ^ hashes[b]).bit_count() <= max_hamming:
                        pairs.append((a, b))
    return pairs


@register
class NearDedup(GlobalOp):
    """Perceptual near-duplicates: phash within max_hamming bits (of 64).

    Star clustering, not connected components: samples are visited in preference order
    (most pixels, then uid); an unclaimed sample becomes a representative and claims
    every unclaimed neighbour within max_hamming of *itself*. So every dropped sample is
    truly close to the uid in its dup_of, and chains A~B~C never merge A with C.
    Run after exact_dedup so byte-identical copies say so."""

    name = "near_dedup"
    version = "1"

    @dataclasses.dataclass
    class Params:
        max_hamming: int = 6

    @classmethod
    def check_params(cls, params, where):
        if not 0 <= params.max_hamming <= 32:
            raise ConfigError(f"{where} (near_dedup): max_hamming must be in 0..32")

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        live = table[(table["status"] == LIVE) & table["phash"].notna()]
        for _, same_kind in live.groupby("kind"):
            table = self._dedup(table, same_kind)
        return table

    def _dedup(self, table: pd.DataFrame, live: pd.DataFrame) -> pd.DataFrame:
        ordered = _preference_order(live)
        hashes = np.array([int(h, 16) for h in ordered["phash"]], dtype=np.uint64)
        neighbours: dict[int, list[int]] = defaultdict(list)
        for a, b in near_duplicate_pairs(hashes, self.params.max_hamming):
            neighbours[a].append(b)
            neighbours[b].append(a)
        groups = [[ordered.index[m] for m in star] for star in star_clusters(len(ordered), neighbours)]
        return _mark_duplicates(table, groups, "duplicate_near")


def star_clusters(n: int, neighbours: dict[int, list[int]]) -> list[list[int]]:
    """Positions 0..n-1 in preference order: the first unclaimed position becomes a
    representative and claims its unclaimed neighbours. Returns [rep, *members] lists."""
    claimed = [False] * n
    groups = []
    for pos in range(n):
        if claimed[pos]:
            continue
        claimed[pos] = True
        members = [pos]
        for other in sorted(neighbours.get(pos, ())):
            if not claimed[other]:
                claimed[other] = True
                members.append(other)
        groups.append(members)
    return groups


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Spherical k-means (cosine) on unit rows; returns a cluster label per row."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)]
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = np.argmax(x @ centroids.T, axis=1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                mean = members.sum(axis=0)
                centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
    return labels


@register
class SemanticDedup(GlobalOp):
    """SemDeDup-style semantic near-duplicates on CLIP image embeddings (needs
    `clip_score` with `keep_embeddings: true`): spherical k-means into clusters, then
    within each cluster every pair with cosine similarity >= `threshold` is a duplicate.
    Star clustering in preference order, as near_dedup: a dropped sample's dup_of is a
    representative it is itself that close to. Clusters only bound the pairwise work
    (SemDeDup's trick); a pair split across clusters is missed, as in the paper."""

    name = "semantic_dedup"
    version = "1"

    @dataclasses.dataclass
    class Params:
        threshold: float = 0.95
        clusters: int = 0  # 0: about sqrt(n / 2)
        seed: int = 0

    @classmethod
    def check_params(cls, params, where):
        if not 0 < params.threshold <= 1 or params.clusters < 0:
            raise ConfigError(f"{where} (semantic_dedup): need 0 < threshold <= 1 and clusters >= 0")

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        from .clip import EMBEDDING_COLUMN

        if EMBEDDING_COLUMN not in table.columns:
            raise ConfigError("semantic_dedup needs image embeddings: set keep_embeddings: true on clip_score")
        live = table[(table["status"] == LIVE) & table[EMBEDDING_COLUMN].notna()]
        for _, same_kind in live.groupby("kind"):
            table = self._dedup(table, same_kind)
        return table

    def _dedup(self, table: pd.DataFrame, live: pd.DataFrame) -> pd.DataFrame:
        from .clip import EMBEDDING_COLUMN

        if len(live) < 2:
            return table
        ordered = _preference_order(live)
        x = np.stack([np.frombuffer(b, dtype=np.float16) for b in ordered[EMBEDDING_COLUMN]]).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = self.params.clusters or max(1, int(np.sqrt(len(x) / 2)))
        labels = kmeans(x, min(k, len(x)), self.params.seed)
        neighbours: dict[int, list[int]] = defaultdict(list)
        for c in np.unique(labels):
            pos = np.flatnonzero(labels == c)
            sims = x[pos] @ x[pos].T
            for a, b in zip(*np.nonzero(np.triu(sims >= self.params.threshold, k=1))):
                neighbours[int(pos[a])].append(int(pos[b]))
                neighbours[int(pos[b])].append(int(pos[a]))
        groups = [[ordered.index[m] for m in star] for star in star_clusters(len(ordered), neighbours)]
        return _mark_duplicates(table, groups, "duplicate_semantic")
