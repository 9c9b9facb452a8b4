"""Ray behind one seam: the only module in gptflow that calls ``ray.init``.

``ensure_ray(cfg)`` connects to the cluster named by RAY_ADDRESS or ``cluster.address``, or starts
a local Ray instance, once per process; stages call it before their first Ray work. It also sets
the driver-side environment Ray Train needs to be quick here (see STACK-NOTES: the per-report
stall).

Which Ray is explicit. No address configured: a fresh local instance (``address="local"``), never
whatever ``/tmp/ray/ray_current_cluster`` names -- a plain ``ray.init()`` joins that cluster, and if
its head is dead retries the dead GCS forever with only warnings. ``auto`` (or RAY_ADDRESS) joins a
running cluster; before ``ray.init`` the address is resolved and its GCS asked for its cluster id
with a deadline, so an address that does not answer is a ConfigError naming it within seconds.

Token authentication is asserted, not assumed: once connected, an unauthenticated request to the
cluster's GCS must be refused, else ``ensure_ray`` disconnects and raises (a Ray cluster without it
runs code for anyone who can reach its ports, which listen on every interface) -- unless
``cluster.allow_no_auth`` says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flows.config import ClusterConfig, ConfigError

log = logging.getLogger(__name__)

# Ray Train V2 blocks every rank in ray.train.report() until the controller polls it; the default
# poll interval costs ~1.8 s per report on a small run. Must be set before the controller starts.
_DRIVER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


# Every worker process of this job redacts credentials in URLs from its logs, as the driver does.
_WORKER_ENV = {"worker_process_setup_hook": "flows.redact.redact_logs"}


def ensure_ray(cfg: ClusterConfig | None = None) -> None:
    """Connect to (or start) Ray unless this process already did."""
    import ray

    for key, value in _DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    cfg = cfg or ClusterConfig()
    address, source = configured_address(cfg)
    if address:
        probe(address, source)
        log.info("connecting to Ray at %s (%s)", address, source)
        ray.init(address=address, log_to_driver=True, runtime_env=_WORKER_ENV)
    else:
        log.info("starting a local Ray instance")
        # "local", not None: None would join the cluster /tmp/ray/ray_current_cluster names.
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            log_to_driver=True,  # dashboard binds 127.0.0.1
            runtime_env=_WORKER_ENV,
        )
    try:
        check_token_auth(_auth_enforced(), address or "the local Ray instance", cfg.allow_no_auth)
    except ConfigError:
        ray.shutdown()
        raise


def configured_address(cfg: ClusterConfig) -> tuple[str | None, str]:
    """The Ray address to join and where it was set (RAY_ADDRESS wins), or (None, ...) for a local
    Ray."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    if cfg.address:
        return cfg.address, "cluster.address"
    return None, "no address configured"


PROBE_TIMEOUT_S = 10.0


def probe(address: str, source: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Resolve `address` ("auto", host:port, ray://host:port) and check that a Ray GCS (or a Ray
    Client server) answers there within `timeout` seconds; returns host:port. ConfigError
    otherwise."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{source}={address!r} is a dashboard (Jobs) address: `gptflow submit --address` takes "
            "it; to run here on a cluster give its GCS address "
            "(host:6379, auto or ray://host:10001)"
        )
    client = address.startswith("ray://")
    try:
        target = address[len("ray://") :] if client else _resolve(address)
    except (ConnectionError, ValueError) as e:
        raise ConfigError(f"{source}={address!r}: no Ray cluster to join ({e})") from e
    host, _, port = target.rpartition(":")
    where = f"{source}={address!r}" + (f" ({target})" if target != address else "")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{where}: no Ray answers there ({e}). Start the cluster (`ray start --head`), fix the "
            "address, or leave cluster.address and RAY_ADDRESS unset to run on a local Ray"
        ) from e
    if not client:
        _ask_gcs(target, where, timeout)
    return target


def _resolve(address: str) -> str:
    """host:port for "auto" (the latest `ray start` on this machine, or a running GCS) or as given.

    The cluster file `ray start` wrote wins over Ray's own "auto", which prefers any GCS process it
    finds running: that may be another program's private local Ray, and joining it by accident is
    what an explicit choice of Ray is for avoiding. A stale file is then an error naming its
    address.
    """
    if address != "auto":
        if ":" not in address:
            raise ValueError("expected host:port")
        return address
    from ray._common.utils import get_ray_address_file
    from ray._private.services import get_ray_address_from_environment

    try:
        recorded = Path(get_ray_address_file(None)).read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    return recorded or get_ray_address_from_environment("auto", None)


def _ask_gcs(target: str, where: str, timeout: float) -> None:
    """A GCS answers GetClusterId -- refused without the token (UNAUTHENTICATED) still means it is
    alive."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNIMPLEMENTED,
            ):
                raise ConfigError(
                    f"{where}: the port answers but no Ray GCS does within {timeout:.0f} s "
                    f"({e.code().name}); is it the cluster's GCS port (6379 by default)?"
                ) from e


def check_token_auth(enforced: bool | None, where: str, allow_no_auth: bool) -> None:
    """Refuse a cluster that does not enforce token authentication (`enforced` False), or whose
    enforcement could not be checked (None), unless the user opted out with
    cluster.allow_no_auth."""
    if enforced or allow_no_auth:
        if not enforced:
            log.warning(
                "Ray at %s: token authentication %s; going on because cluster.allow_no_auth is set",
                where,
                "is off" if enforced is False else "could not be checked",
            )
        return
    why = (
        "accepts requests without a token"
        if enforced is False
        else "could not be checked for token authentication (a ray:// client connection)"
    )
    raise ConfigError(
        f"Ray at {where} {why}: anyone who can reach its ports can run code on it and read its "
        "data. Enable token authentication (`ray start --head` with RAY_AUTH_MODE=token, or leave "
        "the default on; on this side RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN or "
        "~/.ray/auth_token), or set cluster.allow_no_auth=true to accept it"
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
            raise ConfigError(
                f"Ray GCS at {gcs}: cannot check its token authentication ({e.code().name}: "
                f"{e.details()})"
            ) from e
    return False


def cluster_cpus() -> int:
    """CPUs the connected Ray cluster has in all."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
