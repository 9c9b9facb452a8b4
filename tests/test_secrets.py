"""Secrets stay secret: credentials in input URLs (user:password, tokens in the query, presigned
signatures) never reach logs, errors, MLflow params and dataset sources, or the manifest, while the
fingerprint still changes with the URL; and a Ray cluster is used only once it is seen to refuse a
request without its token."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows.config import ConfigError, DataConfig, PipelineConfig, TrackingConfig
from flows.data.inputs import describe
from flows.redact import redact, redact_text, redact_url
from tests.data.preprocess_data import document

SECRETS = ("hunter2", "abc123", "deadbeef", "AKIDEXAMPLE")


def _url(host: str) -> str:
    return (
        f"http://user:hunter2@{host}/corpus.txt?token=abc123&X-Amz-Signature=deadbeef"
        "&X-Amz-Credential=AKIDEXAMPLE%2F20260101&page=2"
    )


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_redact_url_hides_userinfo_and_credential_parameters_and_nothing_else():
    assert redact_url(_url("example.invalid")) == (
        "http://***@example.invalid/corpus.txt?token=***&X-Amz-Signature=***&X-Amz-Credential=***&page=2"
    )
    assert (
        redact_url("https://sa.blob.core.windows.net/c/a.txt?sv=2022&sig=c2VjcmV0")
        == "https://sa.blob.core.windows.net/c/a.txt?sv=2022&sig=***"
    )
    assert (
        redact_url("https://host/a.txt?api_key=k&AWSAccessKeyId=AKIDEXAMPLE&Signature=s")
        == "https://host/a.txt?api_key=***&AWSAccessKeyId=***&Signature=***"
    )
    assert redact_url("s3://bucket/dir/a.txt") == "s3://bucket/dir/a.txt"
    assert redact_url("/data/corpus.txt") == "/data/corpus.txt"
    text = f"cannot read ['{_url('h')}', '/x.txt'] ({_url('h')})"
    assert not _leaks(redact_text(text)) and "/x.txt" in redact_text(text)
    assert not _leaks(json.dumps(redact({"data": {"inputs": [_url("h")], "n": 3}})))


def test_the_fingerprint_changes_with_the_url_and_shows_none_of_it():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/gptflow-secrets/corpus.txt", b"the same bytes")
    # memory:// keeps the query as part of the name: two names, same content
    a = "memory://gptflow-secrets/corpus.txt?token=abc123"
    b = "memory://gptflow-secrets/corpus.txt?token=hunter2"
    fs.pipe(a, b"the same bytes")
    fs.pipe(b, b"the same bytes")
    fa, fb = (f.fingerprint for f in describe([a, b]))
    fs.rm("/gptflow-secrets", recursive=True)
    assert fa != fb
    assert not _leaks(fa + fb)


def test_tracker_params_tags_and_dataset_sources_are_redacted(tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.config import to_dict
    from flows.tracking import stage_run

    cfg = PipelineConfig(workdir=str(tmp_path), data=DataConfig(inputs=(_url("example.invalid"),)))
    with stage_run(TrackingConfig(), tmp_path, "pipeline", {"config": to_dict(cfg)}) as tracker:
        tracker.set_tags({"gptflow.source": _url("example.invalid")})
        tracker.log_input_dataset(
            _url("example.invalid"), _url("example.invalid"), "0" * 32, context="preprocess"
        )
        tracker.log_dict({"train": {"init": _url("example.invalid")}}, "train_config.json")
        tracker.log_text(f"loaded {_url('example.invalid')}", "notes.txt")
        run_id, uri = tracker.run_id, tracker.uri
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert "***@example.invalid" in run.data.params["config.data.inputs"]
    assert not _leaks(json.dumps(run.data.params)) and not _leaks(json.dumps(run.data.tags))
    assert not _leaks(
        json.dumps([d.dataset.source + d.dataset.name for d in run.inputs.dataset_inputs])
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "train_config.json" for p in files)
    assert not [p for p in files if _leaks(p.read_bytes().decode("latin-1"))]


@pytest.fixture
def http_corpus(tmp_path):
    """A real HTTP server on 127.0.0.1 serving corpus.txt (it ignores the credentials and the
    query)."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "corpus.txt").write_text("\n\n".join(document(i, 120) for i in range(30)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_credentials_in_an_input_url_reach_no_manifest_mlflow_record_or_log(
    tmp_path, http_corpus, caplog, ray_local
):
    """A whole preprocess run with tracking on: the URL works, and its secrets are in no file of the
    workdir (manifest, MLflow's sqlite store and artifacts, DONE markers) and no log record."""
    from tests.steps import preprocess

    local = tmp_path / "local"
    local.mkdir()
    (local / "doc.txt").write_text(document(99, 200))
    (local / ".DS_Store").write_bytes(b"\x00\x01")
    workdir = tmp_path / "w"
    cfg = PipelineConfig(
        workdir=str(workdir),
        data=DataConfig(
            inputs=(_url(http_corpus), str(local)),
            vocab_size=300,
            min_chars=16,
            val_fraction=0.0,
            val_min_tokens=0,
            sft_inputs=(),
        ),
    )
    caplog.set_level(logging.INFO)
    out = preprocess(cfg)

    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["documents"]["kept"] == 2
    )  # a .txt file is one document: the served one and the local one
    assert manifest["documents"]["dropped"].get("hidden_file") == 1  # counted, not silently skipped
    assert manifest["inputs"][0]["path"].startswith(
        f"http://***@{http_corpus}/corpus.txt?token=***"
    )
    leaks = {
        str(p): _leaks(p.read_bytes().decode("latin-1")) for p in workdir.rglob("*") if p.is_file()
    }
    assert not {p: s for p, s in leaks.items() if s}, leaks
    assert (workdir / "mlflow.db").is_file()
    assert not _leaks(caplog.text)


def test_an_unreachable_url_is_a_redacted_one_line_error_exit_2(tmp_path):
    url = _url("example.invalid")
    for verbose in ((), ("-v",)):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                *verbose,
                "preprocess",
                "--input",
                url,
                "--no-tracking",
                "--workdir",
                str(tmp_path / "w"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2, out.stderr[-3000:]
        assert "***@example.invalid" in out.stderr, out.stderr[-3000:]
        assert not _leaks(out.stderr + out.stdout), out.stderr[-3000:]
        assert ("Traceback" in out.stderr) == bool(verbose)


# ------------------------------------------------------------------------- Ray token authentication


def test_a_cluster_that_does_not_enforce_token_auth_is_refused_unless_allowed(caplog):
    from flows.cluster import check_token_auth

    check_token_auth(True, "ray-head:6379", allow_no_auth=False)
    with pytest.raises(
        ConfigError, match="ray-head:6379 accepts requests without a token.*allow_no_auth"
    ):
        check_token_auth(False, "ray-head:6379", allow_no_auth=False)
    with pytest.raises(ConfigError, match="could not be checked"):
        check_token_auth(None, "ray://ray-head:10001", allow_no_auth=False)
    check_token_auth(False, "ray-head:6379", allow_no_auth=True)
    assert "token authentication is off" in caplog.text


def test_connecting_asserts_that_the_cluster_refuses_requests_without_the_token(ray_local):
    """The local instance (token auth on, Ray's default) refuses our tokenless probe ..."""
    from flows.cluster import _auth_enforced

    assert _auth_enforced() is True


def test_a_ray_instance_without_token_auth_is_refused_and_left(tmp_path):
    """... and one started with RAY_AUTH_MODE=disabled is refused, and disconnected from."""
    code = (
        "from flows.cluster import ensure_ray; "
        "from flows.config import ClusterConfig, ConfigError; import ray\n"
        "try:\n    ensure_ray(ClusterConfig(num_cpus=1))\nexcept ConfigError as e:\n"
        "    print('REFUSED', e, ray.is_initialized())\nelse:\n    print('ACCEPTED')\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "REFUSED" in out.stdout and "accepts requests without a token" in out.stdout, (
        out.stdout + out.stderr
    )
    assert out.stdout.strip().endswith("False"), (
        out.stdout
    )  # ray.shutdown() ran: nothing left connected


# ------------------------------------------------------------------- the tracking URI's credentials


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gptflow(*args: str, cwd, env: dict[str, str] | None = None, timeout: int = 120):
    full = {**os.environ, **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_tracking_server_that_is_down_is_one_redacted_line_and_exit_2(tmp_path):
    """It used to be 4 min 20 s of urllib3 retries, then five chained tracebacks ending in the URI
    with its password. Now a bounded probe before any stage, for the pipeline, the registry and
    serving."""
    port = _closed_port()
    env = {"MLFLOW_TRACKING_URI": f"http://user:hunter2@127.0.0.1:{port}"}
    for args in (("run",), ("models", "gpt"), ("promote", "gpt", "--version", "1"), ("serve",)):
        out = _gptflow(*args, "--workdir", str(tmp_path / "w"), cwd=tmp_path, env=env)
        assert out.returncode == 2, (args, out.stderr[-3000:])
        lines = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1 and f"http://***@127.0.0.1:{port} does not answer" in lines[0], (
            out.stderr[-3000:]
        )
        assert "--no-tracking" in lines[0] and "Traceback" not in out.stderr
        assert not _leaks(out.stdout + out.stderr), out.stderr[-3000:]
    assert not (tmp_path / "w" / "preprocess").exists()  # no stage started


@pytest.fixture
def failing_api():
    """An HTTP server on 127.0.0.1 that answers /health and fails every MLflow API call with a
    500."""

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            ok = self.path.startswith("/health")
            self.send_response(200 if ok else 500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(
                b"OK"
                if ok
                else json.dumps(
                    {"error_code": "INTERNAL_ERROR", "message": "database is on fire"}
                ).encode()
            )

        do_POST = do_PATCH = do_DELETE = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_registry_and_download_errors_name_the_server_without_its_credentials(
    tmp_path, failing_api, monkeypatch
):
    from flows.tracking import Registry, RegistryError, download_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingConfig(uri=f"http://user:hunter2@127.0.0.1:{failing_api}")
    registry = Registry(tracking, tmp_path)
    for call in (
        lambda: registry.versions("gpt"),
        lambda: registry.by_alias("gpt", "champion"),
        lambda: registry.download("gpt", "1", tmp_path / "dl"),
        lambda: download_model("models:/gpt/1", tmp_path / "dl2", tracking, tmp_path),
    ):
        with pytest.raises((RegistryError, ValueError)) as e:
            call()
        assert f"127.0.0.1:{failing_api}" in str(e.value) or "gpt" in str(e.value)
        assert not _leaks(str(e.value)), str(e.value)
        assert e.value.__cause__ is None or not _leaks(str(e.value.__cause__))


def test_credentials_in_the_tracking_uri_reach_no_output_and_no_file(tmp_path):
    """A planted password in tracking.uri: `gptflow config`, a Ray job's environment and its
    gptflow-job.yaml, and a scheduler's run (its config.yaml, run log and state) hold none of it,
    while the scheduled run still gets the full URI (through its environment)."""
    from flows.ops.jobs import job_env, stage_working_dir

    uri = f"http://user:hunter2@127.0.0.1:{_closed_port()}"
    work = tmp_path / "w"
    out = _gptflow("config", "--set", f"tracking.uri={uri}", "--workdir", str(work), cwd=tmp_path)
    assert (
        out.returncode == 0
        and '"uri": "http://***@127.0.0.1' in out.stdout
        and not _leaks(out.stdout)
    )

    cfg = PipelineConfig(workdir=str(work), tracking=TrackingConfig(uri=uri))
    staged = tmp_path / "job"
    staged.mkdir()
    stage_working_dir(cfg, staged)
    job_yaml = (staged / "gptflow-job.yaml").read_text()
    assert "uri: http://127.0.0.1:" in job_yaml and not _leaks(job_yaml)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        env = job_env()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if saved is None else os.environ.update(
            MLFLOW_TRACKING_URI=saved
        )
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:") and not _leaks(
        json.dumps(env)
    )

    sched = _gptflow(
        "schedule",
        "--once",
        "--set",
        f"tracking.uri={uri}",
        "--workdir",
        str(work),
        cwd=tmp_path,
        timeout=300,
    )
    assert sched.returncode != 0 and not _leaks(sched.stdout + sched.stderr), sched.stderr[-3000:]
    (run_log,) = work.rglob("runs/*.log")
    assert (
        "http://***@127.0.0.1" in run_log.read_text()
    )  # the child had the full URI: its probe names it
    files = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    leaks = {str(p): _leaks(p.read_bytes().decode("latin-1")) for p in files}
    assert not {p: s for p, s in leaks.items() if s}, leaks


def test_ray_workers_redact_credentials_in_their_logs(ray_local):
    """The redacting log filter is installed in every worker process (worker_process_setup_hook),
    not only in the CLI's: a worker's log files hold no password."""
    import time

    import ray

    @ray.remote(num_cpus=0)
    def opens(url: str) -> bool:
        logging.getLogger("gptflow.test").warning("worker opening %s", url)
        try:
            raise OSError(f"cannot reach {url}")
        except OSError:
            logging.getLogger("gptflow.test").exception("worker failed")
        return True

    marker = _url("worker-redaction.invalid")
    assert ray.get(opens.remote(marker))
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    deadline = time.time() + 20
    while True:
        text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())
        if "worker-redaction.invalid" in text or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "***@worker-redaction.invalid" in text
    assert not _leaks(text)
