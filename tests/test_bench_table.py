"""`bench/run_all.py`, the one benchmark command, on tiny sizes: the rows that need no
Ray, no model and no server (tier writing, the catalog over real Parquet, the scale
floors from a results file in bench_scale's format), end to end through its CLI."""

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
MB = 1024 * 1024


def _bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _scale_run(size: int, wall: float, driver_mb: int, annotate_per_s: float) -> dict:
    """One run as bench_scale.run_once records it (the figures a quiet 10k/100k run gave)."""
    return {"size": size, "rc": 0, "wall_s": wall, "raw_bytes": size * 6000, "driver_peak_rss": driver_mb * MB,
            "workers_peak_rss_sum": 2000 * MB, "largest_worker_peak_rss": 400 * MB,
            "largest_worker_peak_private": 300 * MB, "workers_peak_private_sum": 900 * MB,
            "ray_system_peak_rss": 400 * MB, "machine_peak_delta": 1500 * MB, "first_progress_s": 5.0,
            "summary": {"raw_samples": size, "seconds": wall - 5, "startup_seconds": 3,
                        "stages": {"annotate": {"seconds": size / annotate_per_s, "samples": size,
                                                "raw_bytes_read": size * 6000},
                                   "write": {"seconds": wall / 5, "samples": size * 9 // 10,
                                             "raw_bytes_read": size * 6000}},
                        "curate": {"kept": size * 9 // 10, "dropped": size // 10, "failed": 0}}}


def test_the_table_runs_its_rows_and_every_ratio_is_against_a_baseline_of_the_same_run(tmp_path):
    run_all, bench_scale = _bench("run_all"), _bench("bench_scale")
    rows = [bench_scale.derive(_scale_run(10_000, 59, 284, 299)), bench_scale.derive(_scale_run(100_000, 289, 279, 461))]
    scale_json = tmp_path / "scale.json"
    scale_json.write_text(json.dumps({"args": {"reference": "10000"}, "rows": rows}))
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    rc = run_all.main(["--only", "tiers,catalog,scale", "--work", str(tmp_path / "work"), "--scale-json", str(scale_json),
                       "--markdown", str(md), "--json", str(js), "--set", "tier_samples=60", "--set", "tier_shard_samples=25",
                       "--set", "tier_reps=1", "--set", "catalog_rows=3000,6000", "--set", "catalog_file_rows=1500",
                       "--set", "catalog_reps=1"])
    assert rc == 0
    got = json.loads(js.read_text())["rows"]
    by_kind = {}
    for row in got:
        assert row["error"] is None, row
        by_kind.setdefault(row["what"].split(":")[0].split(" (")[0], []).append(row)
    assert sorted(by_kind) == ["catalog", "scale", "tier writing"]

    (tiers,) = by_kind["tier writing"]  # the row itself checks the plain tars hold the same member bytes
    assert tiers["details"]["samples"] == 60 and tiers["ours"] > 0 and tiers["baseline"] > 0
    assert tiers["ratio"] == tiers["ours"] / tiers["baseline"]
    assert sorted(p.name for p in (tmp_path / "work" / "tiers-60" / "ours" / "tiers" / "bench").glob("*.parquet")) == \
        ["bench-000000.parquet", "bench-000001.parquet", "bench-000002.parquet"]

    # 3,000 rows link the first two of the four 1,500-row files generated for 6,000
    assert [(r["details"]["rows"], r["details"]["files"]) for r in by_kind["catalog"]] == [(3000, 2), (6000, 4)]
    for r, tiers_present in zip(by_kind["catalog"], (2, 3)):  # the files' tiers: alignment, captioned_detail, ...
        assert r["units"] == "s" and r["ours"] > 0 and r["baseline"] > 0
        assert [q["result_rows"] for q in r["details"]["queries"].values()] == [tiers_present, 100, 1]

    notes = {r["what"].split(": ", 1)[1]: r["note"] for r in by_kind["scale"]}
    assert notes["per-sample wall time after start-up, 100,000 vs 10,000"] == "PASS: floor <= 1.20x"
    assert notes["whole run vs stage A alone at 10,000"] == "FAIL: floor >= 0.70x"  # 0.66x, as measured
    lines = md.read_text().splitlines()
    assert lines[0].startswith("Measured ") and "bench/run_all.py" in lines[0]
    assert lines[2].startswith("| what | ours | baseline | ratio") and len(lines) == 4 + len(got)
