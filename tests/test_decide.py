"""Stage B without Ray: dedup, top fraction, uid conflicts, routing leftovers, shard cuts
and the ledger, as DuckDB over stage A's parts. Milliseconds per case."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import config
from curation.decide import block_scheme, decide, star_claims
from curation.ops.clip import EMBEDDING_COLUMN

BINARY = ("image_bytes", EMBEDDING_COLUMN)


def recipe(global_ops: list[dict], tiers=None, max_samples=3, max_bytes=None) -> config.PipelineConfig:
    doc = {"name": "t", "seed": 0,
           "ops": [{"op": "decode_image"}, {"op": "perceptual_hash"},
                   {"op": "clip_score", "model": "ViT-B-32", "keep_embeddings": True}, *global_ops],
           "tiers": tiers or [{"name": "a", "where": "kind = 'image_text'"}, {"name": "b", "where": "true"}],
           "shard": {"max_samples": max_samples, **({"max_bytes": max_bytes} if max_bytes else {})}}
    return config.parse(doc)


def row(uid, **kw):
    base = {"uid": uid, "kind": "image_text", "source": "s", "url": None, "text": "a caption", "raw_shard": "r0.tar",
            "raw_key": uid, "status": "kept", "reason": None, "error": None, "width": 10, "height": 10,
            "num_bytes": 100, "sha256": None, "phash": None, "clip_score": None, "tier": "a", "tier_rank": uid,
            "media": '["jpg"]', EMBEDDING_COLUMN: None}
    base.update(kw)
    return base


SCHEMA = pa.schema([("uid", pa.string()), ("kind", pa.string()), ("source", pa.string()), ("url", pa.string()),
                    ("text", pa.string()), ("raw_shard", pa.string()), ("raw_key", pa.string()), ("status", pa.string()),
                    ("reason", pa.string()), ("error", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                    ("num_bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.string()), ("clip_score", pa.float64()),
                    ("tier", pa.string()), ("tier_rank", pa.string()), ("media", pa.string()), (EMBEDDING_COLUMN, pa.binary())])


def run(tmp_path, rows, cfg, parts=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(parts):
        f = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[i::parts], schema=SCHEMA), f)
        files.append(f)
    raw_names = sorted({r["raw_shard"] for r in rows})
    decision = decide(cfg, files, raw_names, tmp_path / "work", binary_columns=BINARY)
    ledger = {r["uid"]: r for r in pq.read_table(decision.ledger).to_pylist()}
    return decision, ledger


def test_exact_dedup_keeps_the_largest_then_uid(tmp_path):
    rows = [row("u1", sha256="x", width=5), row("u2", sha256="x", width=50), row("u3", sha256="x", width=50),
            row("u4", sha256="y"), row("u5", sha256="x", kind="interleaved", tier="b")]
    decision, ledger = run(tmp_path, rows, recipe([{"op": "exact_dedup"}]))
    assert ledger["u2"]["status"] == "kept"
    assert (ledger["u1"]["reason"], ledger["u1"]["dup_of"]) == ("duplicate_exact", "u2")
    assert (ledger["u3"]["reason"], ledger["u3"]["dup_of"]) == ("duplicate_exact", "u2")
    assert ledger["u5"]["status"] == "kept"  # groups never mix kinds
    assert decision.counts == {"kept": 3, "dropped": 2}


def brute_force_near(hashes: list[int], pixels: list[int], uids: list[str], k: int) -> dict[str, str]:
    """The reference: star clustering over every sample in preference order."""
    order = sorted(range(len(uids)), key=lambda i: (-pixels[i], uids[i]))
    claimed, dup_of = set(), {}
    for i in order:
        if i in claimed:
            continue
        claimed.add(i)
        for j in order:
            if j not in claimed and bin(hashes[i] ^ hashes[j]).count("1") <= k:
                claimed.add(j)
                dup_of[uids[j]] = uids[i]
    return dup_of


@pytest.mark.parametrize("k", [0, 3, 6])
def test_near_dedup_equals_brute_force_star_clustering(tmp_path, k):
    rng = np.random.default_rng(k)
    base = [int(x) for x in rng.integers(0, 2**63, 60, dtype=np.int64)]
    hashes = []
    for h in base:  # clusters of near copies, some identical hashes, chains
        hashes.append(h)
        for _ in range(int(rng.integers(0, 4))):
            flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
            hashes.append(h ^ sum(1 << int(f) for f in flips))
    uids = [f"u{i:04d}" for i in range(len(hashes))]
    pixels = [int(p) for p in rng.integers(1, 4, len(hashes))]
    rows = [row(u, phash=f"{h:016x}", width=p, height=1) for u, h, p in zip(uids, hashes, pixels)]
    _, ledger = run(tmp_path, rows, recipe([{"op": "near_dedup", "max_hamming": k}]))
    got = {u: r["dup_of"] for u, r in ledger.items() if r["reason"] == "duplicate_near"}
    assert got == brute_force_near(hashes, pixels, uids, k)
    assert got, "the case must contain near duplicates"


def test_block_scheme_is_exact_by_pigeonhole():
    for k in range(0, 9):
        blocks, take = block_scheme(k, 10**6)
        assert take == len(blocks) - k and sum(hi - lo for lo, hi in blocks) == 64


def test_near_dedup_without_any_phash_is_a_no_op(tmp_path):
    rows = [row("v1", kind="video", tier="b"), row("v2", kind="video", tier="b")]
    decision, ledger = run(tmp_path, rows, recipe([{"op": "near_dedup"}]))
    assert decision.counts == {"kept": 2}


def test_clip_top_fraction_ties_by_uid(tmp_path):
    rows = [row(f"u{i}", clip_score=s) for i, s in enumerate([0.9, 0.5, 0.5, 0.1, None])]
    cfg = config.parse({"name": "t", "ops": [{"op": "decode_image"}, {"op": "clip_score", "model": "ViT-B-32"},
                                         {"op": "clip_top_fraction", "fraction": 0.5}],
                        "tiers": [{"name": "a", "where": "true"}]})
    _, ledger = run(tmp_path, rows, cfg)
    assert [u for u, r in sorted(ledger.items()) if r["status"] == "kept"] == ["u0", "u1", "u4"]
    assert ledger["u2"]["reason"] == ledger["u3"]["reason"] == "clip_score_rank"


def test_semantic_dedup_finds_planted_copies(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    rows = []
    for i, v in enumerate(base):
        rows.append(row(f"a{i:02d}", width=20, **{EMBEDDING_COLUMN: v.astype(np.float16).tobytes()}))
    for i in range(5):  # near copies of a00..a04, smaller images
        v = base[i] + rng.normal(scale=1e-3, size=16)
        rows.append(row(f"c{i:02d}", width=10, **{EMBEDDING_COLUMN: v.astype(np.float16).tobytes()}))
    _, ledger = run(tmp_path, rows, recipe([{"op": "semantic_dedup", "threshold": 0.999, "clusters": 3, "sample_size": 20, "bucket_rows": 10}]))
    got = {u: r["dup_of"] for u, r in ledger.items() if r["reason"] == "duplicate_semantic"}
    assert got == {f"c{i:02d}": f"a{i:02d}" for i in range(5)}


def test_uid_conflict_fails_only_the_second_claimant(tmp_path):
    rows = [row("u1", raw_shard="r0.tar", raw_key="k1"), row("u1", raw_shard="r1.tar", raw_key="k9"), row("u2")]
    decision, ledger = run(tmp_path, rows, recipe([]))
    assert ledger["u1"]["status"] == "kept" and ledger["u1"]["raw_shard"] == "r0.tar"
    other = [r for r in ledger.values() if r["reason"] == "duplicate_uid"]
    assert len(other) == 1 and other[0]["raw_shard"] == "r1.tar" and "u1" in other[0]["error"]
    assert sum(decision.counts.values()) == 3


def test_unrouted_and_shard_cuts_in_seeded_order(tmp_path):
    rows = [row(f"u{i}", tier_rank=f"{(i * 7) % 10:02d}", tier="a" if i < 7 else None) for i in range(10)]
    decision, ledger = run(tmp_path, rows, recipe([], max_samples=3))
    assert {ledger[f"u{i}"]["reason"] for i in (7, 8, 9)} == {"unrouted"}
    assert [s["samples"] for s in decision.shards] == [3, 3, 1]
    by_shard = defaultdict(list)
    for shard_dir in sorted(decision.sidecars.iterdir()):
        for r in pq.read_table(shard_dir).sort_by("pos").to_pylist():
            by_shard[r["shard"]].append(r["uid"])
    order = sorted((f"{(i * 7) % 10:02d}", f"u{i}") for i in range(7))
    assert [u for s in sorted(by_shard) for u in by_shard[s]] == [u for _, u in order]
    assert all(ledger[u]["shard"] and ledger[u]["tier"] == "a" for u in by_shard["a-000000.tar"])
    shards = json.loads((decision.folder / "shards.json").read_text())["shards"]
    assert [s["name"] for s in shards] == ["a-000000", "a-000001", "a-000002"]


def test_decision_is_independent_of_row_order(tmp_path):
    rows = [row(f"u{i:02d}", sha256=str(i % 7), phash=f"{(i % 5) * 3:016x}", tier_rank=f"{i * 13 % 31:02d}") for i in range(30)]
    cfg = recipe([{"op": "exact_dedup"}, {"op": "near_dedup", "max_hamming": 2}])
    _, a = run(tmp_path / "a", rows, cfg, parts=1)
    _, b = run(tmp_path / "b", rows[::-1], cfg, parts=3)
    assert a == b


def test_star_claims():
    # 0-1, 1-2 chain: 0 claims 1; 2 stays (not within reach of 0)
    assert star_claims(np.array([0, 1]), np.array([1, 2])) == {1: 0}
    assert star_claims(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == {}
