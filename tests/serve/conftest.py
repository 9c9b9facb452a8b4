"""A real Ray Serve instance on 127.0.0.1 for the serving tests, and small models to serve.

One Serve instance (on the session's local Ray) answers every test in this package; each test
module deploys its own applications under their own route prefixes. The registry fixtures are
the registry tests' (a real MLflow sqlite store with registered versions).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flows.config import PipelineConfig, ServeConfig, TrackingConfig
from gptcore import GPT, GPTConfig, save_bundle
from tests.registry.conftest import store, tok  # noqa: F401 - fixtures shared with the registry tests

CONTEXT = 1024  # long enough that a request can outlast a client that goes away


def make_bundle(directory: Path, tok, seed: int) -> Path:  # noqa: F811
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size, context_length=CONTEXT, n_layer=2, n_head=2, d_model=32
        )
    )
    return save_bundle(directory, model, tok, {"stage": "pretrain"})


@pytest.fixture(scope="package")
def serve_url(ray_local) -> str:
    """Ray Serve's HTTP proxy on a free 127.0.0.1 port; shut down after this package's tests, so
    that the Ray Train tests after them get the CPUs back."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="package")
def deploy(serve_url) -> Callable[..., str]:
    """deploy(name, workdir, bundle=..., model=..., tracking=..., **serve) -> the app's base URL."""
    from ray import serve

    from flows.serve.deploy import application, settings_for

    def run(
        name: str,
        workdir: Path,
        bundle: Path | None = None,
        model: str | None = None,
        tracking: TrackingConfig | None = None,
        env: dict[str, str] | None = None,
        **serve_keys,
    ) -> str:
        serve_keys.setdefault("num_cpus", 0.1)  # several apps share the session's 2-CPU Ray
        serve_keys.setdefault(
            "access_log", False
        )  # a line per request would bury a failure's output
        cfg = PipelineConfig(
            workdir=str(workdir),
            serve=ServeConfig(**serve_keys),
            tracking=tracking or TrackingConfig(enabled=False),
        )
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            settings = settings_for(cfg, model=model, bundle=str(bundle) if bundle else None)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        serve.run(application(cfg.serve, settings), name=name, route_prefix=f"/{name}")
        url = f"{serve_url}/{name}"
        wait_healthy(url)
        return url

    return run


def wait_healthy(url: str, seconds: float = 60) -> dict:
    import json

    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
