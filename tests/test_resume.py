"""A `curate run` killed with SIGKILL part-way resumes to exactly the uninterrupted result."""

import os
import signal
import subprocess
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import CURATE, REPO, curate

pytestmark = pytest.mark.slow


def small_shard_pipeline(tmp_path):
    doc = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    doc["shard"]["max_samples"] = 30  # many tier shards, so stage C can be caught half-way
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_until(args, condition, timeout=300) -> bool:
    """Start `curate run`, SIGKILL its whole process group (Ray included) as soon as
    `condition()` holds. Returns True if it was killed before finishing."""
    proc = subprocess.Popen([*CURATE, *map(str, args)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                return False
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        raise AssertionError("condition never held")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def snapshot(out):
    tiers = {p.relative_to(out): p.read_bytes() for p in sorted((out / "tiers").rglob("*")) if p.suffix in (".tar", ".json")}
    sidecars = {p.relative_to(out): pq.read_table(p).to_pandas() for p in sorted((out / "tiers").rglob("*.parquet"))}
    ledger = pd.read_parquet(out / "ledger.parquet").sort_values("uid").reset_index(drop=True)
    return tiers, sidecars, ledger


def test_sigkill_then_rerun_equals_uninterrupted(demo_out, tmp_path):
    pipeline = small_shard_pipeline(tmp_path)
    raw = demo_out / "raw"
    n_raw_shards = len(list(raw.glob("*.tar")))
    assert n_raw_shards >= 4

    reference = tmp_path / "reference"
    curate("run", pipeline, "--input", raw, "--out", reference)

    out = tmp_path / "killed"
    args = ["run", pipeline, "--input", raw, "--out", out]
    annotated = out / "_work" / "annotated"
    # 1) killed in stage A, after some raw shards were committed
    assert run_until(args, lambda: len(list(annotated.glob("*.done.json"))) >= 1)
    assert 1 <= len(list(annotated.glob("*.done.json"))) < n_raw_shards
    # 2) killed again in stage C, with some tier shards written
    assert run_until(args, lambda: len(list((out / "tiers").glob("*/*.tar"))) >= 2)
    assert not (out / "_SUCCESS").exists()
    # 3) finishes
    curate(*args)

    ref_tiers, ref_side, ref_ledger = snapshot(reference)
    got_tiers, got_side, got_ledger = snapshot(out)
    assert got_tiers.keys() == ref_tiers.keys() and len(ref_tiers) > 5
    for name in ref_tiers:
        assert got_tiers[name] == ref_tiers[name], f"{name} differs"
    for name in ref_side:
        pd.testing.assert_frame_equal(got_side[name], ref_side[name])
    pd.testing.assert_frame_equal(got_ledger, ref_ledger)
    assert not list(out.rglob("*.tmp")) or all(p.exists() for p in out.rglob("*.tmp"))


def test_changed_pipeline_on_an_unfinished_output_starts_over(demo_out, tmp_path):
    """A run stopped early (a recipe error found on real rows, say) must not lock its
    --out: the fixed recipe starts over there. A finished output is never overwritten."""
    pipeline = small_shard_pipeline(tmp_path)
    out = tmp_path / "o"
    assert run_until(["run", pipeline, "--input", demo_out / "raw", "--out", out],
                     lambda: (out / "_work" / "run.json").exists())
    other = tmp_path / "other.yaml"
    other.write_text(pipeline.read_text().replace("min_words: 3", "min_words: 4"))
    proc = curate("run", other, "--input", demo_out / "raw", "--out", out)
    assert "starting over" in proc.stderr and (out / "_SUCCESS").exists()
    proc = curate("run", pipeline, "--input", demo_out / "raw", "--out", out, check=False)
    assert proc.returncode == 2 and "finished run of another pipeline config" in proc.stderr
