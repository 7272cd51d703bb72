"""`curate run --ray-address` on a real two-node Ray cluster (head + worker, both
started with `ray start` on 127.0.0.1), compared with the local run."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from .conftest import curate

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, env):
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture
def two_node_cluster():
    port = free_port()
    # Ray's head enables token auth; every process of the cluster shares one token.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # Short temp dir: Ray's unix sockets live under it and socket paths max out at ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        ray_cli("start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}", *common, env=env)
        ray_cli("start", f"--address=127.0.0.1:{port}", *common, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_on_two_node_cluster(demo_out, two_node_cluster, tmp_path):
    address, env = two_node_cluster
    probe = subprocess.run([sys.executable, "-c", (
        "import ray, json; ray.init(address='%s', log_to_driver=False); "
        "print(json.dumps([n['Alive'] for n in ray.nodes()]))") % address],
        capture_output=True, text=True, timeout=120, check=True, env=env)
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [True, True]

    out = tmp_path / "cluster"
    curate("run", "pipelines/demo.yaml", "--input", demo_out / "raw", "--out", out, "--ray-address", address, env=env)
    local = pd.read_parquet(demo_out / "curated" / "ledger.parquet").sort_values("uid").reset_index(drop=True)
    remote = pd.read_parquet(out / "ledger.parquet").sort_values("uid").reset_index(drop=True)
    pd.testing.assert_frame_equal(local, remote)
    for tar in sorted((demo_out / "curated" / "tiers").glob("*/*.tar")):
        assert (out / "tiers" / tar.parent.name / tar.name).read_bytes() == tar.read_bytes()


def test_unreachable_cluster_is_one_line(demo_out, tmp_path):
    proc = curate("run", "pipelines/demo.yaml", "--input", demo_out / "raw", "--out", tmp_path / "o",
                  "--ray-address", f"127.0.0.1:{free_port()}", check=False, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "cannot start or reach the Ray cluster" in proc.stderr


def test_crawl_with_img2dataset_ray_distributor(two_node_cluster, tmp_path):
    from .servers import hostile_server

    address, env = two_node_cluster
    with hostile_server() as base:
        urls = pd.DataFrame({"url": [f"{base}/img/{i}.jpg" for i in range(40)] + [f"{base}/missing.jpg"],
                             "caption": [f"image {i}" for i in range(41)]})
        urls.to_parquet(tmp_path / "urls.parquet")
        proc = curate("crawl", "--input", tmp_path / "urls.parquet", "--out", tmp_path / "raw",
                      "--allow-network", "127.0.0.1/32", "--samples-per-shard", "10", "--ray-address", address, env=env)
    assert "crawled 41 urls" in proc.stdout
    ledger = pd.read_parquet(tmp_path / "raw" / "crawl_ledger-image_text.parquet")
    assert (ledger["status"] == "kept").sum() == 40 and ledger["raw_shard"].nunique() == 4  # 5th shard: the 404 only
