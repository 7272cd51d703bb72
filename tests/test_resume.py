"""An output folder belongs to one recipe. (SIGKILL at seeded points of every stage,
compared byte for byte with an uninterrupted run: tests/test_chaos.py.)"""

import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import CURATE, REPO, curate
from .rawgen import write_raw_shards, write_recipe

pytestmark = pytest.mark.slow


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


def test_changed_pipeline_on_an_unfinished_output_starts_over(tmp_path):
    """A run stopped early (a recipe error found on real rows, say) must not lock its
    --out: the fixed recipe starts over there. A finished output is never overwritten."""
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=3, per_shard=30)
    pipeline = write_recipe(tmp_path / "cheap.yaml")
    out = tmp_path / "o"
    assert run_until(["run", pipeline, "--input", raw, "--out", out],
                     lambda: (out / "_work" / "run.json").exists())
    other = tmp_path / "other.yaml"
    other.write_text(pipeline.read_text().replace("min_words: 2", "min_words: 3"))
    proc = curate("run", other, "--input", raw, "--out", out)
    assert "starting over" in proc.stderr and (out / "_SUCCESS").exists()
    proc = curate("run", pipeline, "--input", raw, "--out", out, check=False)
    assert proc.returncode == 2 and "finished run of another pipeline config" in proc.stderr
    # A folder written in another data format (JSON text columns) is refused, never resumed into a mixed ledger.
    info = json.loads((out / "_work" / "run.json").read_text())
    del info["data_format"]
    (out / "_work" / "run.json").write_text(json.dumps(info))
    proc = curate("run", other, "--input", raw, "--out", out, check=False)
    assert proc.returncode == 2 and "another version of curation (data format 1" in proc.stderr
    assert "Traceback" not in proc.stderr
