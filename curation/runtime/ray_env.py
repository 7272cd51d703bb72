"""Start Ray locally or connect to a cluster, quietly, with pools sized to what exists."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from ..errors import CurationError


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
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            # Ship this package to the workers, so a cluster needs only the dependencies.
            pkg = str(Path(__file__).resolve().parents[1])
            ray.init(address=address, runtime_env={"py_modules": [pkg]}, **common)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise CurationError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # we show one progress bar of our own


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def pool_size(num_cpus: float, num_gpus: float, requested: int | None) -> int:
    """Actors for one stage: what was asked for, else one per GPU share on GPU stages,
    else one per CPU (each taking a fraction, so read tasks still get scheduled)."""
    if requested:
        return requested
    if num_gpus > 0:
        return max(1, int(cluster_gpus() / num_gpus))
    return max(1, int(cluster_cpus()))
