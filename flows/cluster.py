"""Ray behind one seam: the only module in gptflow that calls ``ray.init``.

``ensure_ray(cfg)`` connects to the cluster named by RAY_ADDRESS or ``cluster.address``, or starts
a local Ray instance, once per process; stages call it before their first Ray work. It also sets
the driver-side environment Ray Train needs to be quick here (see STACK-NOTES: the per-report stall).
"""

from __future__ import annotations

import logging
import os

from flows.config import ClusterConfig

log = logging.getLogger(__name__)

# Ray Train V2 blocks every rank in ray.train.report() until the controller polls it; the default
# poll interval costs ~1.8 s per report on a small run. Must be set before the controller starts.
_DRIVER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def ensure_ray(cfg: ClusterConfig | None = None) -> None:
    """Connect to (or start) Ray unless this process already did."""
    import ray

    for key, value in _DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    cfg = cfg or ClusterConfig()
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray instance")
        ray.init(num_cpus=cfg.num_cpus, log_to_driver=True)  # dashboard binds 127.0.0.1


def cluster_cpus() -> int:
    """CPUs the connected Ray cluster has in all."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
