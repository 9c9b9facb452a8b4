"""Ray behind one seam: the only module in gptflow that calls ``ray.init``.

``ensure_ray(cfg)`` connects to the cluster named by RAY_ADDRESS or ``cluster.address``, or starts
a local Ray instance, once per process; stages call it before their first Ray work. It also sets
the driver-side environment Ray Train needs to be quick here (see STACK-NOTES: the per-report stall).

Token authentication is asserted, not assumed: once connected, an unauthenticated request to the
cluster's GCS must be refused, else ``ensure_ray`` disconnects and raises (a Ray cluster without it
runs code for anyone who can reach its ports, which listen on every interface) -- unless
``cluster.allow_no_auth`` says so.
"""

from __future__ import annotations

import logging
import os

from flows.config import ClusterConfig, ConfigError

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
    try:
        check_token_auth(_auth_enforced(), address or "the local Ray instance", cfg.allow_no_auth)
    except ConfigError:
        ray.shutdown()
        raise


def check_token_auth(enforced: bool | None, where: str, allow_no_auth: bool) -> None:
    """Refuse a cluster that does not enforce token authentication (`enforced` False), or whose
    enforcement could not be checked (None), unless the user opted out with cluster.allow_no_auth."""
    if enforced or allow_no_auth:
        if not enforced:
            log.warning("Ray at %s: token authentication %s; going on because cluster.allow_no_auth is set",
                        where, "is off" if enforced is False else "could not be checked")
        return
    why = ("accepts requests without a token" if enforced is False else
           "could not be checked for token authentication (a ray:// client connection)")
    raise ConfigError(
        f"Ray at {where} {why}: anyone who can reach its ports can run code on it and read its data. "
        "Enable token authentication (`ray start --head` with RAY_AUTH_MODE=token, or leave the default on; "
        "on this side RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN or ~/.ray/auth_token), or set "
        "cluster.allow_no_auth=true to accept it"
    )


def _auth_enforced() -> bool | None:
    """Whether the connected cluster's GCS refuses a request without the token: True, False, or None
    when there is no GCS address to ask (a Ray Client connection)."""
    import grpc
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    node = getattr(ray._private.worker.global_worker, "node", None)
    gcs = getattr(node, "gcs_address", None)
    if not gcs:
        return None
    # A plain channel, deliberately without Ray's token interceptor: what a stranger would send.
    with grpc.insecure_channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise ConfigError(f"Ray GCS at {gcs}: cannot check its token authentication ({e.code().name}: "
                              f"{e.details()})") from e
    return False


def cluster_cpus() -> int:
    """CPUs the connected Ray cluster has in all."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
