"""`gptflow serve` as a user runs it: its own Ray and Serve, the champion from a real registry, the
openai client against it, SIGTERM to stop, and the serving summary in MLflow afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from tests.serve.conftest import make_bundle, wait_healthy

pytestmark = pytest.mark.slow


def test_gptflow_serve_answers_and_logs_a_summary_when_stopped(store, tok, tmp_path):
    version = store["add"](make_bundle(tmp_path / "bundle", tok, seed=20))
    store["registry"]().set_version_tags("gpt", version, {"gptflow.gate": "passed"})
    store["registry"]().set_alias("gpt", "champion", version)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(store["root"]),
                "tracking": {"uri": store["tracking"].uri},
                "serve": {"port": port, "poll_s": 0, "num_cpus": 0.5},
            }
        )
    )
    gptflow = str(Path(sys.executable).parent / "gptflow")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [gptflow, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, seconds=180)
        first = proc.stdout.readline()
        assert f"as 'gpt' at {url}/v1" in first and "models:/gpt@champion" in first
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert client.models.list().data[0].version == version
        text = (
            client.completions.create(model="gpt", prompt="The cat", max_tokens=6).choices[0].text
        )
        assert isinstance(text, str)
        with urllib.request.urlopen(f"{url}/", timeout=10) as r:
            assert b"gptflow playground" in r.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    figures = json.loads(out[out.index("{") :])
    assert figures["requests"] == 1 and figures["completion_tokens"] >= 1

    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=store["tracking"].uri).search_runs(
        [
            e.experiment_id
            for e in mlflow.MlflowClient(tracking_uri=store["tracking"].uri).search_experiments()
        ],
        filter_string="tags.`gptflow.stage` = 'serve'",
    )
    assert len(runs) == 1
    assert runs[0].data.metrics["requests"] == 1 and runs[0].data.params["served_name"] == "gpt"


def test_the_shipped_serve_deploy_config_is_valid_for_ray_serve():
    """serve-deploy.yaml passes Ray Serve's own schema and names the builder gptflow serve uses."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    schema = ServeDeploySchema.model_validate(
        yaml.safe_load((root / "serve-deploy.yaml").read_text())
    )
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder) and set(app.args) <= {"workdir", "model", "bundle", "config", "host"}
    assert schema.http_options.host == "127.0.0.1" == app.args["host"]
