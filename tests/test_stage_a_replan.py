"""Stage A after a lost node: a stall on a shrunken cluster is noticed and stage A is
planned again; a stall on a whole cluster, or progress on a shrunken one, is left alone.
(The real node loss is in test_ray_cluster.py; these check the watchdog without Ray.)"""

import threading
import time

import pyarrow as pa
import pytest

from curation import annotate, runner
from curation.annotate import ClusterShrank
from curation.errors import CurationError


class FakeDataset:
    """iter_batches yields `batches`, then blocks until released (a stuck pool)."""

    def __init__(self, batches, hang: bool):
        self.batches, self.hang, self.release = batches, hang, threading.Event()

    def iter_batches(self, **_):
        yield from self.batches
        if self.hang:
            self.release.wait(30)


def acks(shard: str, rows: int) -> pa.Table:
    return pa.table({"raw_shard": [shard], "part": [f"{shard}-{rows}.parquet"], "rows": [rows]})


class Bar:
    n = 0

    def update(self, k):
        self.n += k


def test_a_stall_after_losing_cpus_raises_cluster_shrank(tmp_path):
    ds = FakeDataset([acks("a.tar", 3)], hang=True)
    t = time.monotonic()
    with pytest.raises(ClusterShrank, match="1 of the 2 CPUs"):
        annotate._collect(ds, {"a.tar": 3, "b.tar": 2}, tmp_path, Bar(), planned_cpus=2, cpus_now=lambda: 1,
                          stall_s=0.4)
    ds.release.set()
    assert time.monotonic() - t < 10
    assert annotate.marker_path(tmp_path, "a.tar").exists()  # what finished before the stall stays committed
    assert not annotate.marker_path(tmp_path, "b.tar").exists()


def test_progress_on_a_shrunken_cluster_is_not_a_stall(tmp_path):
    class Slow(FakeDataset):
        def iter_batches(self, **_):
            for b in self.batches:
                time.sleep(0.2)  # slower than nothing, faster than the stall limit
                yield b

    ds = Slow([acks(f"{i}.tar", 1) for i in range(5)], hang=False)
    bar = Bar()
    annotate._collect(ds, {f"{i}.tar": 1 for i in range(5)}, tmp_path, bar, planned_cpus=2, cpus_now=lambda: 1,
                      stall_s=0.6)
    assert bar.n == 5


def test_a_slow_batch_on_the_whole_cluster_is_waited_for(tmp_path):
    class Late(FakeDataset):
        def iter_batches(self, **_):
            time.sleep(1.0)  # longer than stall_s, but no CPU was lost: a slow model, not a dead node
            yield from self.batches

    annotate._collect(Late([acks("a.tar", 2)], hang=False), {"a.tar": 2}, tmp_path, Bar(), planned_cpus=2,
                      cpus_now=lambda: 2, stall_s=0.3)
    assert annotate.marker_path(tmp_path, "a.tar").exists()


def test_errors_of_the_job_reach_the_driver_as_they_are(tmp_path):
    class Failing(FakeDataset):
        def iter_batches(self, **_):
            raise ValueError("boom in a task")
            yield

    with pytest.raises(ValueError, match="boom in a task"):
        annotate._collect(Failing([], hang=False), {"a.tar": 1}, tmp_path, Bar(), planned_cpus=1, stall_s=0.4)


def test_stage_a_is_planned_again_then_gives_up():
    calls, restarts = [], []

    def attempt():
        calls.append(1)
        if len(calls) < 3:
            raise ClusterShrank("lost a node")
        return 42

    assert runner.with_replans(attempt, lambda: restarts.append(1)) == 42
    assert (len(calls), len(restarts)) == (3, 2)

    def always():
        raise ClusterShrank("lost a node")

    with pytest.raises(CurationError, match="gave up after 2 new plans"):
        runner.with_replans(always, lambda: None, max_replans=2)
