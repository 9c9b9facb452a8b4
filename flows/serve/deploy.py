"""Deploying the server: settings resolved on the driver, the Serve application, `gptflow serve`.

:func:`settings_for` decides what is served (a bundle directory, or NAME@ALIAS in the registry,
checked to exist before anything is deployed) and hashes the API key; :func:`application` binds
the deployment with replicas, autoscaling and resources from the serve section; :func:`app` is the
same application as a builder for Serve's own CLI and config files. :func:`serve_forever` is
`gptflow serve`: start Serve on this process's Ray, deploy, print where it listens, and on
SIGINT/SIGTERM log a summary of the replicas' figures to MLflow and shut Serve down.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from flows.config import (
    ClusterConfig,
    ConfigError,
    PipelineConfig,
    RegistryConfig,
    ServeConfig,
    TrackingConfig,
)
from flows.context import StepContext
from flows.serve.models import ServeSettings, alias_version

log = logging.getLogger(__name__)
APP_NAME = "gptflow"


def parse_model(ref: str) -> tuple[str, str]:
    """NAME@ALIAS (or models:/NAME@ALIAS) -> (name, alias)."""
    name, sep, alias = ref.removeprefix("models:/").partition("@")
    if not sep or not name or not alias or "/" in name:
        raise ConfigError(f"serve.model={ref!r} must look like NAME@ALIAS (e.g. gpt@champion)")
    return name, alias


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_auth(cfg: ServeConfig, key_sha: str | None, host: str | None = None) -> None:
    """Auth fails closed: a server reachable from other machines needs an API key, unless the config
    says serve.allow_no_auth: true."""
    host = host or cfg.host
    if key_sha is None and not is_loopback(host) and not cfg.allow_no_auth:
        raise ConfigError(
            f"serve.host={host} is reachable from other machines and {cfg.api_key_env} is not set: "
            f"export {cfg.api_key_env}=<key> (clients send `Authorization: Bearer <key>`), bind "
            "127.0.0.1, or set serve.allow_no_auth: true to serve without authentication"
        )
    if key_sha is None and not is_loopback(host):
        log.warning(
            "serve: %s without an API key (serve.allow_no_auth: true): "
            "anyone who reaches it may use it",
            host,
        )


def settings_for(
    cfg: PipelineConfig, model: str | None = None, bundle: str | None = None
) -> ServeSettings:
    """What the replicas serve; ConfigError when it does not exist (yet), or when it would be served
    to other machines without an API key."""
    return _settings(cfg.serve, cfg.registry, cfg.tracking, Path(cfg.workdir), model, bundle)


def _settings(
    s: ServeConfig,
    registry: RegistryConfig,
    tracking: TrackingConfig,
    workdir: Path,
    model: str | None = None,
    bundle: str | None = None,
) -> ServeSettings:
    from flows.tracking import tracking_uri

    workdir = workdir.resolve()
    key = os.environ.get(s.api_key_env)
    key_sha = hashlib.sha256(key.strip().encode()).hexdigest() if key and key.strip() else None
    check_auth(s, key_sha)
    bundle = bundle or (None if model else (s.model if s.model and "@" not in s.model else None))
    if bundle:
        path = Path(bundle).resolve()
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"serve: {bundle} is not a model bundle (no model.safetensors)")
        if s.knowledge:
            _check_knowledge(path)
        return ServeSettings(
            s,
            s.served_name or path.name,
            str(path),
            None,
            None,
            None,
            str(workdir / "serve" / "cache"),
            key_sha,
        )
    if not tracking.enabled:
        raise ConfigError(
            "serve: following a registry alias needs tracking.enabled=true (or give --bundle DIR)"
        )
    name, alias = parse_model(model or s.model or f"{registry.name}@champion")
    settings = ServeSettings(
        s,
        s.served_name or name,
        None,
        name,
        alias,
        tracking_uri(tracking, workdir),
        str(workdir / "serve" / "cache"),
        key_sha,
    )
    try:
        check_servable(settings, alias_version(settings))
    except ValueError as e:
        raise ConfigError(f"serve: {e}") from None
    return settings


def check_servable(settings: ServeSettings, version: str) -> None:
    """The replicas would refuse this version (gate not passed): say so before deploying."""
    from flows.serve.models import registry

    gate = registry(settings).version(settings.registry_name, version)["tags"].get("gptflow.gate")
    if gate != "passed":
        raise ConfigError(
            f"{settings.registry_name}@{settings.alias} is version {version}, "
            f"which has not passed the promotion gate (gptflow.gate={gate!r}): "
            "replicas serve only gated versions; promote it with `gptflow promote` (or --force)"
        )


def _check_knowledge(bundle: Path) -> None:
    """serve.knowledge needs the facts of the bundle's dataset: refused here, before any deploy."""
    import json

    from flows.serve.grounding import FACTS

    try:
        dataset = json.loads((bundle / "metadata.json").read_text(encoding="utf-8")).get("dataset")
    except (OSError, ValueError) as e:
        raise ConfigError(f"serve.knowledge: cannot read {bundle / 'metadata.json'}: {e}") from None
    if not dataset or not (Path(dataset) / FACTS).is_file():
        raise ConfigError(
            f"serve.knowledge: the dataset of {bundle} ({dataset or 'none named'}) has no "
            f"{FACTS} (it was built without data.knowledge)"
        )


def application(cfg: ServeConfig, settings: ServeSettings):
    from flows.serve.app import GPTServer

    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # Serve queues past max_ongoing_requests on its own, without bound; let requests reach the
        # replica, whose bounded queue answers 429.
        "max_ongoing_requests": 2 * (cfg.max_batch_size + cfg.max_queue),
        "logging_config": {"enable_access_log": cfg.access_log},
    }
    if cfg.max_replicas > cfg.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.min_replicas
    return GPTServer.options(**options).bind(settings)


def app(args: dict[str, str] | None = None):
    """Application builder: ``serve run flows.serve.deploy:app [config=FILE] [workdir=DIR]
    [model=NAME@ALIAS | bundle=DIR] [host=ADDR]`` (or a ``serve deploy`` config naming it) runs the
    same application as `gptflow serve`. `host` is the Serve proxy's http_options.host: the builder
    cannot see it, so without it the app is taken to be reachable from other machines (an API key
    is then required, or serve.allow_no_auth)."""
    import json

    from flows.config import load_config

    args = dict(args or {})
    overrides = [f"workdir={args['workdir']}"] if args.get("workdir") else []
    overrides.append(f"serve.host={json.dumps(args.get('host') or '0.0.0.0')}")
    cfg = load_config(args.get("config"), overrides)
    return application(
        cfg.serve, settings_for(cfg, model=args.get("model"), bundle=args.get("bundle"))
    )


def start(cfg: ServeConfig, cluster: ClusterConfig, settings: ServeSettings):
    """Deploy on this process's Ray (started or joined by cluster.py); the ingress handle."""
    from ray import serve

    from flows.cluster import ensure_ray

    ensure_ray(cluster)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    keep_auth(settings, cfg.api_key_env)
    return serve.run(application(cfg, settings), name=APP_NAME, route_prefix="/")


def keep_auth(settings: ServeSettings, api_key_env: str, app_name: str = APP_NAME) -> None:
    """A redeploy never turns auth off: when the running app asks for an API key and this deploy has
    none (a pipeline step, a Ray job or `serve deploy` whose environment lacks it), refuse."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if settings.api_key_sha256 is not None:
        return
    try:
        handle = serve.get_app_handle(app_name)
    except (RayServeException, KeyError, ValueError):
        return  # nothing running under that name
    try:
        required = handle.auth_required.remote().result(timeout_s=30)
    except Exception as e:  # noqa: BLE001 - unknown: do not risk turning auth off
        raise ConfigError(
            f"serve: cannot tell whether the running app {app_name!r} requires an API key ({e}); "
            f"export {api_key_env} or delete the app first (serve shutdown)"
        ) from None
    if required:
        raise ConfigError(
            f"serve: the running app {app_name!r} requires an API key and {api_key_env} is not set "
            f"here: redeploying would turn authentication off. Export {api_key_env} (the key "
            "clients use), or delete the app first (serve shutdown)"
        )


DEPLOYMENT = "deployment.json"


def deploy_step(
    cfg: ServeConfig, registry: RegistryConfig, out_dir: Path, ctx: StepContext
) -> Path:
    """The pipeline's serve step (serve.deploy: true): (re)deploy on the configured Ray cluster
    after a promotion and record where. The replicas follow the alias (default:
    registry.name@champion) themselves; this makes sure the application exists with the current
    serve settings."""
    import json

    from flows.workdir import atomic_write_text

    settings = _settings(cfg, registry, ctx.tracking, ctx.workdir)
    if settings.bundle is None and settings.alias is None:
        raise ConfigError("serve: nothing to serve")
    if not (ctx.cluster.address or os.environ.get("RAY_ADDRESS")):
        log.warning(
            "serve: deploying on this process's own local Ray, "
            "which stops when the pipeline exits; set cluster.address to deploy on a cluster, "
            "or run `gptflow serve` for a server that stays"
        )
    start(cfg, ctx.cluster, settings)
    record = {
        "app": APP_NAME,
        "url": f"http://{cfg.host}:{cfg.port}/v1",
        "model": settings.bundle or f"models:/{settings.registry_name}@{settings.alias}",
        "version": None if settings.bundle else alias_version(settings),
        "served_name": settings.served_name,
    }
    atomic_write_text(Path(out_dir) / DEPLOYMENT, json.dumps(record, indent=2) + "\n")
    log.info("serve: %s deployed at %s", record["model"], record["url"])
    return Path(out_dir)


def summary(handle) -> dict[str, Any]:
    """The ingress replica's figures (one replica answers; with several, a sample)."""
    try:
        return handle.stats.remote().result(timeout_s=10)
    except Exception as e:  # noqa: BLE001 - the summary is best effort at shutdown
        log.warning("no serving figures: %s", e)
        return {}


def serve_forever(cfg: PipelineConfig, settings: ServeSettings) -> dict[str, Any]:
    """`gptflow serve`: deploy, block until SIGINT/SIGTERM, then log the summary and shut Serve
    down."""
    from ray import serve

    from flows.tracking import stage_run

    handle = start(cfg.serve, cfg.cluster, settings)
    stop = threading.Event()
    for sig in (
        signal.SIGINT,
        signal.SIGTERM,
    ):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    where = f"http://{cfg.serve.host}:{cfg.serve.port}"
    what = settings.bundle or f"models:/{settings.registry_name}@{settings.alias}"
    print(
        f"serving {what} as {settings.served_name!r} at {where}/v1 (playground: {where}/)",
        flush=True,
    )
    stop.wait()
    figures = summary(handle)
    if cfg.tracking.enabled and figures:
        with stage_run(cfg.tracking, cfg.workdir, "serve") as tracker:
            tracker.log_params(
                {
                    "model": what,
                    "served_name": settings.served_name,
                    "max_batch_size": cfg.serve.max_batch_size,
                    "replicas": cfg.serve.min_replicas,
                }
            )
            tracker.log_metrics(
                {k: float(v) for k, v in figures.items() if isinstance(v, int | float)}
            )
    serve.shutdown()
    return figures
