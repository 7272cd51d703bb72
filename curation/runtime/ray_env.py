"""Start Ray locally or connect to a cluster, quietly, with pools sized to what exists."""

from __future__ import annotations

import logging
import warnings
import math
import os
import socket

from ..errors import CurationError
from ..paths import PACKAGE_DIR


def _check_reachable(address: str) -> None:
    """ray.init retries an unreachable GCS for minutes; a plain host:port gets a quick
    TCP probe first so the user hears about a typo in seconds."""
    if "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise CurationError(f"cannot start or reach the Ray cluster at {address}: {exc}") from None


def start_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
    # Ray Data's advice on actor pool sizing is not for our users.
    warnings.filterwarnings("ignore", module=r"ray\.data\..*")
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            # Ship this package to the workers, its data included (contracts/*.schema.json,
            # recipes/*.yaml live inside it), so a cluster needs only the dependencies.
            ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE_DIR)]}, **common)
        else:
            # "local": a Ray instance of our own. Without it ray.init() joins a cluster that
            # `ray start` left running on this machine, without shipping the package to it.
            ray.init(address="local", num_cpus=os.cpu_count() or 1, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise CurationError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # we show one progress bar of our own
    # No per-dataset INFO lines between our bars, and no logged tracebacks: a task error
    # reaches the driver as an exception, and the CLI prints it as one line.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def node_cpus() -> list[float]:
    """CPUs of each live node: actors are placed whole on one node, so the pools must
    pack onto these, not just fit their sum."""
    import ray

    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


READ_TASK_CPUS = 0.25  # what a stage C read task asks for (stage A's readers claim none)


def plan_pools(stages: list, cpus: float, gpus: float, heavy: list[bool] | None = None,
               nodes: list[float] | None = None) -> list[tuple[int, float]]:
    """(actors, CPUs per actor) for each stage, so that every pool can be placed at once.
    Ray Data actor pools are fixed-size: a pool that cannot be placed never starts and
    the whole job waits for it forever (three stages of two half-CPU actors on 2 CPUs is
    exactly that). Stage A's readers and part writers claim no CPU, so the pools may
    take all of it.

    Every stage gets one actor. If the stages' CPU shares do not fit together (many
    model stages on a laptop), the shares of the stages without an explicit
    `concurrency` are scaled down to fit: on a CPU node a share is only a scheduling
    claim, and a slower pipeline beats one that never starts. The CPU left over goes to
    the `heavy` (model) stages first, one actor at a time. With `nodes` (CPUs per node),
    the plan must also pack onto the nodes, each actor whole on one node (two 1-CPU
    nodes cannot hold three 0.6-CPU actors); if it does not, the budget shrinks until it does."""
    budget = cpus
    for _ in range(40):
        pools = _fit(stages, budget, cpus, gpus, heavy or [False] * len(stages))
        actors = [c for n, c in pools for _ in range(n)]
        if nodes is None or _packs(actors, nodes):
            return pools
        budget *= 0.9
    raise CurationError(f"the pipeline's actor stages cannot be placed on nodes with {nodes} CPUs: lower their "
                        "num_cpus or concurrency")


def _packs(items: list[float], bins: list[float]) -> bool:
    """First-fit decreasing: True if every item finds a bin with room."""
    free = sorted(bins, reverse=True)
    for item in sorted(items, reverse=True):
        for i, room in enumerate(free):
            if item <= room + 1e-9:
                free[i] = room - item
                break
        else:
            return False
    return True


def _fit(stages: list, budget: float, cpus: float, gpus: float, heavy: list[bool]) -> list[tuple[int, float]]:
    share = [r.num_cpus for r in stages]
    scalable = [i for i, r in enumerate(stages) if not r.concurrency]
    fixed = sum(r.concurrency * r.num_cpus for r in stages if r.concurrency)
    wanted = sum(share[i] for i in scalable)
    if fixed + wanted > budget + 1e-9:
        if fixed >= budget or wanted == 0:
            raise CurationError(f"the pipeline's actor stages need {fixed + wanted:g} CPUs at once but the cluster has "
                                f"{cpus:g}: lower their num_cpus or concurrency")
        factor = (budget - fixed) / wanted
        for i in scalable:  # rounded down: shares rounded up could exceed the CPUs, and a pool would never start
            share[i] = math.floor(share[i] * factor * 1e4) / 1e4
    sizes = []
    for r in stages:
        if r.concurrency:
            sizes.append(r.concurrency)
        elif r.num_gpus > 0:
            sizes.append(max(1, int(gpus / r.num_gpus)))
        else:
            sizes.append(1)
    spare = budget - fixed - sum(share[i] for i in scalable)
    growable = [i for i, r in enumerate(stages) if r.num_gpus == 0 and not r.concurrency and share[i] > 0]
    for group in ([i for i in growable if heavy[i]], [i for i in growable if not heavy[i]]):
        grew = True
        while grew:
            grew = False
            for i in group:
                if share[i] <= spare + 1e-9:
                    sizes[i] += 1
                    spare -= share[i]
                    grew = True
    return list(zip(sizes, share))
