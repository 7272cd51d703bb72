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
        claimed = [False] * len(ordered)
        groups = []
        for pos in range(len(ordered)):  # preference order: the first unclaimed is a representative
            if claimed[pos]:
                continue
            claimed[pos] = True
            members = [pos]
            for other in sorted(neighbours.get(pos, ())):
                if not claimed[other]:
                    claimed[other] = True
                    members.append(other)
            groups.append([ordered.index[m] for m in members])
        return _mark_duplicates(table, groups, "duplicate_near")
