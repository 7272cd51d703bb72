"""`curate run --ray-address` on a real two-node Ray cluster (head + worker, both
started with `ray start` on 127.0.0.1), compared with the local run.

The nodes run a Python that has the dependencies but cannot import `curation` (a venv
without it, started outside the repository), and the drivers run outside the repository
too (Ray puts the driver's working directory on the workers' path). So every worker
runs the code and reads the contracts that `py_modules` shipped, or fails."""

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import shutil
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from .conftest import CURATE, curate
from .rawgen import write_raw_shards, write_recipe
from .test_wheel import make_venv, venv_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curate_outside(*args, cwd: Path, env: dict, check=True, timeout=900) -> subprocess.CompletedProcess:
    """The CLI as a user would run it, from a folder that is not the repository."""
    proc = subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_node(python: Path, args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own session: the process stays, owns the node's
    processes, and stops them when it gets SIGTERM."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(python), "-m", "ray.scripts.scripts", "start", "--block", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + 180
    while b"will now block forever" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            raise AssertionError(f"ray start {' '.join(args)} did not start:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    return proc


def stop_node(proc: subprocess.Popen) -> None:
    """Stop one node by its own processes: SIGTERM to `ray start --block` (which stops
    the raylet, GCS, agents and workers it started), then SIGKILL to any of its
    descendants still alive. Never `ray stop`, which stops every Ray on the machine."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with the dependencies (ray included) but without `curation`."""
    return make_venv(tmp_path_factory.mktemp("bare") / "venv")


@contextlib.contextmanager
def cluster(bare_python: Path, tmp_path: Path):
    """A head and a worker node, 1 CPU each; yields (address, driver env, [head, worker])."""
    port = free_port()
    # Ray's head enables token auth; every process of the cluster shares one token.
    auth = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    node_env = {**venv_env(bare_python), **auth}
    # Short temp dir: Ray's unix sockets live under it and socket paths max out at ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    nodes = []
    try:
        nodes.append(start_node(bare_python, ["--head", f"--port={port}", "--include-dashboard=false", *common],
                                node_env, tmp_path, tmp_path / "head.log"))
        nodes.append(start_node(bare_python, [f"--address=127.0.0.1:{port}", *common], node_env, tmp_path,
                                tmp_path / "worker.log"))
        yield f"127.0.0.1:{port}", {**os.environ, **auth}, nodes
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def two_node_cluster(bare_python, tmp_path):
    with cluster(bare_python, tmp_path) as (address, env, _):
        yield address, env


PROBE = """
import importlib.util, json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=0)
def where():
    import importlib.util, sys
    return {"curation": importlib.util.find_spec("curation") is not None, "python": sys.executable}

ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps(ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
                          for n in nodes])))
"""


def test_run_on_two_node_cluster(demo_out, bare_python, two_node_cluster, tmp_path):
    address, env = two_node_cluster
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), address], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    workers = json.loads(probe.stdout.strip().splitlines()[-1])
    # Two live nodes, and no worker on either can import curation by itself.
    assert workers == [{"curation": False, "python": str(bare_python)}] * 2, workers

    out = tmp_path / "cluster"
    curate_outside("run", "demo", "--input", demo_out / "raw", "--out", out, "--ray-address", address,
                   cwd=tmp_path, env=env)
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
        proc = curate_outside("crawl", "--input", tmp_path / "urls.parquet", "--out", tmp_path / "raw",
                              "--allow-network", "127.0.0.1/32", "--samples-per-shard", "10", "--ray-address", address,
                              cwd=tmp_path, env=env)
    assert "crawled 41 urls" in proc.stdout
    ledger = pd.read_parquet(tmp_path / "raw" / "crawl_ledger-image_text.parquet")
    assert (ledger["status"] == "kept").sum() == 40 and ledger["raw_shard"].nunique() == 4  # 5th shard: the 404 only


def snapshot(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "tiers").rglob("*")) if p.is_file()}
    files["ledger.parquet"] = (out / "ledger.parquet").read_bytes()
    return files


def stage_actors_on(node: subprocess.Popen) -> int:
    """How many of stage A's pool actors run on this node (Ray names a worker process
    after the actor it hosts)."""
    n = 0
    for child in psutil.Process(node.pid).children(recursive=True):
        try:
            n += " ".join(child.cmdline()).startswith("ray::MapWorker(MapBatches(StageActor))")
        except psutil.Error:
            pass
    return n


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL one node at once, as a machine that dies: its `ray start` process group
    (raylet, agents, workers) and any descendant of it that left the group."""
    descendants = psutil.Process(node.pid).children(recursive=True)
    os.killpg(node.pid, signal.SIGKILL)
    for p in descendants:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    node.wait(timeout=30)
    psutil.wait_procs(descendants, timeout=30)


def test_losing_the_worker_node_mid_run_loses_nothing(bare_python, tmp_path):
    """The worker node dies (SIGKILL, all its processes) while stage A's pool has actors
    on it: Ray restarts them on the head and retries the lost tasks, the job finishes on
    the head alone, and its ledger and tier bytes equal a local run. A hang fails after
    600 s instead of blocking (restarted actors can fill the head, leaving no CPU to a
    task that asks for some)."""
    raw = tmp_path / "raw"
    write_raw_shards(raw, shards=8, per_shard=60, seed=11)
    n_raw = 8
    recipe = write_recipe(tmp_path / "cheap.yaml", max_samples=16)
    reference = tmp_path / "reference"
    curate("run", recipe, "--input", raw, "--out", reference)

    out = tmp_path / "cluster"
    annotated = out / "_work" / "annotated"
    with cluster(bare_python, tmp_path) as (address, env, (head, worker)):
        started = time.monotonic()
        log = open(tmp_path / "job.log", "w+")
        job = subprocess.Popen([*CURATE, "run", str(recipe), "--input", str(raw), "--out", str(out), "--ray-address", address],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        hung = False
        try:
            killed_at = None
            deadline = time.monotonic() + 300
            while killed_at is None and time.monotonic() < deadline and job.poll() is None:
                done = len(list(annotated.glob("*.done.json")))
                # stage A under way with some of its pool's actors on the worker node
                if (out / "_work" / "run.json").exists() and done < n_raw and stage_actors_on(worker):
                    kill_node(worker)
                    killed_at = (time.monotonic() - started, done)
                time.sleep(0.05)
            assert killed_at is not None, "stage A's actors were never seen on the worker node"
            assert killed_at[1] < n_raw
            try:
                job.wait(timeout=600)
            except subprocess.TimeoutExpired:
                hung = True
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
            log.seek(0)
            text = log.read()
            log.close()
        print(f"worker killed at {killed_at} (s, committed raw shards); job took {time.monotonic() - started:.0f} s")
        assert not hung, f"the job hung 600 s after the worker node died:\n{text[-5000:]}"
        assert job.returncode == 0, text[-5000:]
    assert snapshot(out) == snapshot(reference)
