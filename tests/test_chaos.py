"""Chaos: `curate run` killed at seeded random points in each stage, a Ray worker
killed mid-task, and a disk that fills while a tier shard is written. After the
resume, the ledger and every tier byte equal an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .conftest import CURATE, REPO, curate
from .rawgen import write_raw_shards, write_recipe

pytestmark = pytest.mark.slow

# Each kill costs a Ray start-up (seconds): up to four seeded kill points per stage keeps
# the suite within CI's time; a stage that finishes early ends its series sooner anyway.
KILLS_PER_STAGE = 4


def snapshot(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "tiers").rglob("*")) if p.is_file()}
    files["ledger.parquet"] = (out / "ledger.parquet").read_bytes()
    return files


@pytest.fixture(scope="module")
def cheap(tmp_path_factory):
    """Raw shards, a cheap recipe with many small tier shards, and an uninterrupted run."""
    root = tmp_path_factory.mktemp("chaos")
    raw = root / "raw"
    write_raw_shards(raw, shards=8, per_shard=40, seed=5)
    recipe = write_recipe(root / "cheap.yaml", max_samples=12)
    reference = root / "reference"
    curate("run", recipe, "--input", raw, "--out", reference)
    return raw, recipe, snapshot(reference)


def stage_of(out: Path, n_raw: int) -> str:
    work = out / "_work"
    if (out / "_SUCCESS").exists():
        return "done"
    if not (work / "run.json").exists():
        return "start"
    if len(list((work / "annotated").glob("*.done.json"))) < n_raw:
        return "A"
    if not (work / "decide" / "shards.json").exists():
        return "B"
    return "C"


def kill_in_stage(args: list, out: Path, n_raw: int, stage: str, delay: float, timeout: float = 240) -> bool:
    """Start `curate run`; once `stage` is running, wait `delay` seconds, then SIGKILL the
    whole process group (driver and the Ray it started). False if it finished first."""
    proc = subprocess.Popen([*CURATE, *map(str, args)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, entered = time.time() + timeout, None
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                return False
            now = stage_of(out, n_raw)
            if now == stage and entered is None:
                entered = time.time()
            if entered is not None and time.time() - entered >= delay:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        raise AssertionError(f"stage {stage} never ran")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("stage, spread", [("A", 3.0), ("B", 0.6), ("C", 3.0)])
def test_sigkill_at_seeded_points_then_resume_equals_uninterrupted(cheap, tmp_path, stage, spread):
    raw, recipe, reference = cheap
    n_raw = len(list(raw.glob("*.tar")))
    out = tmp_path / "out"
    args = ["run", recipe, "--input", raw, "--out", out]
    rng = random.Random(f"chaos-{stage}")
    kills = 0
    order = ["start", "A", "B", "C", "done"]
    for _ in range(KILLS_PER_STAGE):
        if order.index(stage_of(out, n_raw)) > order.index(stage):
            break  # the stage finished between kills: later points would hit later stages
        kills += kill_in_stage(args, out, n_raw, stage, rng.uniform(0, spread))
    assert kills >= 1, f"no kill landed in stage {stage}"
    assert not list(out.rglob("*.tmp")), "a killed write left a partial file visible"
    curate(*args)
    assert snapshot(out) == reference


def test_a_killed_ray_worker_costs_nothing(cheap, tmp_path):
    """SIGKILL one Ray worker process while it runs a task: Ray retries, the result is the same."""
    raw, recipe, reference = cheap
    out = tmp_path / "out"
    proc = subprocess.Popen([*CURATE, "run", str(recipe), "--input", str(raw), "--out", str(out)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(killed) < 2:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                # a worker busy with a task of ours (Ray renames workers after the task they run)
                if title.startswith("ray::") and ("MapBatches" in title or "MapWorker" in title or "read_picked" in title
                                                  or "write_group" in title) and child.pid not in killed:
                    child.send_signal(signal.SIGKILL)
                    killed.append(child.pid)
                    break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed, "no busy worker was seen to kill"
    assert proc.returncode == 0, err[-3000:]
    assert snapshot(out) == reference


def test_disk_full_while_writing_a_tier_shard(cheap, tmp_path):
    """Tier shards land on a small filesystem that is nearly full: one clear error, no
    partial shard visible; after space is freed the resumed run equals an uninterrupted one."""
    raw, recipe, reference = cheap
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / "tiers").symlink_to(small)
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (2 * 1024 * 1024 - 160 * 1024))  # leaves ~160 KB: a few shards fit, not all
        proc = curate("run", recipe, "--input", raw, "--out", out, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("curate: error:") == 1 and "no space left" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not list(small.rglob("*.tmp")), "a partial shard is visible"
        ballast.unlink()
        curate("run", recipe, "--input", raw, "--out", out)
        assert snapshot(out) == reference
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
