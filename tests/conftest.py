import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# pipelines/demo.yaml names its models under ${CURATION_MODELS}; demo_out points it at
# the filter the demo trained. Until then, a placeholder lets the recipe parse.
os.environ.setdefault("CURATION_MODELS", "/nonexistent-curation-models")

REPO = Path(__file__).resolve().parents[1]
CURATE = [sys.executable, "-m", "curation.cli"]


def curate(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a child process."""
    proc = subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> Path:
    """The small demo, crawled into several raw shards and curated, once per session."""
    out = tmp_path_factory.mktemp("demo")
    curate("demo", "--small", "--samples-per-shard", "60", "--out", out, timeout=1500)
    os.environ["CURATION_MODELS"] = str(out / "models")
    return out
