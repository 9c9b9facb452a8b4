"""One replica's ingress object in this process, driven with real Starlette requests: what a client
can do to it that the HTTP tests cannot make happen on purpose (a stream dropped before its first
byte, a wedged or dead decode loop, a decode step that fails with device details), and the serve
command's refusal to serve other machines without an API key."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading

import pytest

from flows.config import ConfigError, PipelineConfig, ServeConfig, TrackingConfig
from flows.serve.deploy import settings_for
from tests.serve.conftest import make_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tok):
    return make_bundle(tmp_path_factory.mktemp("bundle"), tok, seed=5)


@pytest.fixture
def server(ray_local, bundle, tmp_path):
    from flows.serve.app import GPTServer

    cfg = PipelineConfig(
        workdir=str(tmp_path),
        tracking=TrackingConfig(enabled=False),
        serve=ServeConfig(stall_s=0.5, max_tokens_limit=1000),
    )
    plain = GPTServer.func_or_class.__bases__[0]  # the class under Serve's ingress wrapper
    replica = plain(settings_for(cfg, bundle=str(bundle)))
    yield replica
    replica.current.runner.stop()


def _request(body: dict):
    from starlette.requests import Request

    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    return Request(scope, receive)


def _leases(replica) -> int:
    return replica.swap.leases(replica.current)


def test_a_stream_dropped_before_its_first_byte_releases_its_model(server):
    """A client gone before the stream is iterated used to keep the model leased forever (a retired
    model's weights and KV cache never freed)."""
    response = asyncio.run(
        server._handle(_request({"prompt": "The", "max_tokens": 50, "stream": True}), chat=False)
    )
    assert response.status_code == 200 and _leases(server) == 1
    del response
    gc.collect()
    assert _leases(server) == 0


def test_healthz_fails_when_the_decode_loop_is_wedged_or_dead(server):
    ok = asyncio.run(server.healthz())
    assert ok.status_code == 200 and json.loads(ok.body)["status"] == "ok"
    engine = server.current.runner.engine
    wedged, release = threading.Event(), threading.Event()
    real_step = engine.step

    def stuck_step():  # a kernel that never returns
        wedged.set()
        release.wait(30)
        return real_step()

    engine.step = stuck_step

    async def submit_and_probe():
        events = server.current.runner.generate([{"prompt": (1, 2), "max_new_tokens": 3}])
        task = asyncio.ensure_future(events.__anext__())
        await asyncio.to_thread(wedged.wait, 30)
        await asyncio.sleep(1.0)  # past stall_s=0.5
        health = await server.healthz()
        release.set()
        await task
        await events.aclose()
        return health

    health = asyncio.run(submit_and_probe())
    assert health.status_code == 503 and "no finished step" in json.loads(health.body)["problem"]
    server.current.runner.stop()
    dead = asyncio.run(server.healthz())
    assert (
        dead.status_code == 503
        and json.loads(dead.body)["problem"] == "the decode loop has stopped"
    )


def test_a_failed_decode_step_answers_500_without_its_detail(server, caplog):
    engine = server.current.runner.engine

    def failing_step():
        raise RuntimeError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total; /secret/path)"
        )

    engine.step = failing_step
    response = asyncio.run(server._handle(_request({"prompt": "The", "max_tokens": 5}), chat=False))
    body = json.loads(response.body)
    assert response.status_code == 500 and body["error"]["type"] == "server_error"
    assert "GiB" not in body["error"]["message"] and "secret" not in body["error"]["message"]
    assert "CUDA out of memory" in caplog.text  # the detail is in the replica's log


def test_latency_windows_are_bounded():
    from flows.serve.runner import LATENCY_WINDOW, RunnerStats

    stats = RunnerStats()
    for i in range(3 * LATENCY_WINDOW):
        stats.latency_s.append(float(i))
        stats.ttft_s.append(float(i))
    assert len(stats.latency_s) == len(stats.ttft_s) == LATENCY_WINDOW
    assert stats.latency_s[-1] == 3 * LATENCY_WINDOW - 1


def test_serving_other_machines_without_a_key_is_refused_unless_allowed(
    bundle, tmp_path, monkeypatch
):
    monkeypatch.delenv("GPTFLOW_API_KEY", raising=False)

    def cfg(**serve):
        return PipelineConfig(
            workdir=str(tmp_path),
            tracking=TrackingConfig(enabled=False),
            serve=ServeConfig(**serve),
        )

    for host in ("0.0.0.0", "10.0.0.5", "::", "head.example"):
        with pytest.raises(ConfigError, match=f"serve.host={host} .*GPTFLOW_API_KEY is not set"):
            settings_for(cfg(host=host), bundle=str(bundle))
    for host in ("127.0.0.1", "::1", "localhost"):
        assert settings_for(cfg(host=host), bundle=str(bundle)).api_key_sha256 is None
    assert (
        settings_for(cfg(host="0.0.0.0", allow_no_auth=True), bundle=str(bundle)).api_key_sha256
        is None
    )
    monkeypatch.setenv("GPTFLOW_API_KEY", "sk-1")
    assert settings_for(cfg(host="0.0.0.0"), bundle=str(bundle)).api_key_sha256 is not None

    env = {k: v for k, v in __import__("os").environ.items() if k != "GPTFLOW_API_KEY"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--host",
            "0.0.0.0",
            "--no-tracking",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "GPTFLOW_API_KEY" in out.stderr and "Traceback" not in out.stderr
