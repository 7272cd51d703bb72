import os
import socket
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
# pipelines/llava_onevision.yaml's decontaminate reads ${CURATION_EVAL_SETS}: demo_out
# points it at the demo's evaluation set (corpus/eval)
os.environ.setdefault("CURATION_EVAL_SETS", "/nonexistent-curation-eval-sets")

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
    os.environ["CURATION_EVAL_SETS"] = str(out / "corpus" / "eval")
    return out


@pytest.fixture(scope="session")
def onevision_out(demo_out, tmp_path_factory) -> Path:
    """pipelines/llava_onevision.yaml run over the small demo's raw shards, once per session."""
    out = tmp_path_factory.mktemp("onevision") / "out"
    curate("run", "pipelines/llava_onevision.yaml", "--input", demo_out / "raw", "--out", out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket `bkt`, and the AWS settings that point at it
    (and nowhere else): (a pyarrow S3FileSystem on it, those settings)."""
    from moto.server import ThreadedMotoServer  # the test extra (moto[server])
    from pyarrow import fs

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    filesystem = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                 allow_bucket_creation=True)
    filesystem.create_dir("bkt")
    try:
        yield filesystem, env
    finally:
        server.stop()


def pytest_itemcollected(item):
    """Under pytest-xdist (`--dist loadgroup`): every test that uses the session's
    `demo_out` in one group, so the demo is curated once per run, not once per worker;
    the other tests grouped by module, so a module's fixtures are built once. (Marked as
    each item is collected: xdist reads the marks in its own collection_modifyitems, which
    runs before a conftest's.)"""
    group = "demo_out" if "demo_out" in getattr(item, "fixturenames", ()) else item.module.__name__
    item.add_marker(pytest.mark.xdist_group(group))
