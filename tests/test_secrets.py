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

import pytest

from flows.config import ConfigError, DataConfig, PipelineConfig, TrackingConfig
from flows.data.inputs import describe, redact, redact_text, redact_url
from tests.data.preprocess_data import document

SECRETS = ("hunter2", "abc123", "deadbeef", "AKIDEXAMPLE")


def _url(host: str) -> str:
    return (f"http://user:hunter2@{host}/corpus.txt?token=abc123&X-Amz-Signature=deadbeef"
            "&X-Amz-Credential=AKIDEXAMPLE%2F20260101&page=2")


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_redact_url_hides_userinfo_and_credential_parameters_and_nothing_else():
    assert redact_url(_url("example.invalid")) == (
        "http://***@example.invalid/corpus.txt?token=***&X-Amz-Signature=***&X-Amz-Credential=***&page=2")
    assert redact_url("https://sa.blob.core.windows.net/c/a.txt?sv=2022&sig=c2VjcmV0") == \
        "https://sa.blob.core.windows.net/c/a.txt?sv=2022&sig=***"
    assert redact_url("https://host/a.txt?api_key=k&AWSAccessKeyId=AKIDEXAMPLE&Signature=s") == \
        "https://host/a.txt?api_key=***&AWSAccessKeyId=***&Signature=***"
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
        tracker.log_input_dataset(_url("example.invalid"), _url("example.invalid"), "0" * 32, context="preprocess")
        run_id, uri = tracker.run_id, tracker.uri
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert "***@example.invalid" in run.data.params["config.data.inputs"]
    assert not _leaks(json.dumps(run.data.params)) and not _leaks(json.dumps(run.data.tags))
    assert not _leaks(json.dumps([d.dataset.source + d.dataset.name for d in run.inputs.dataset_inputs]))
    assert not _leaks((tmp_path / "mlflow.db").read_bytes().decode("latin-1"))


@pytest.fixture
def http_corpus(tmp_path):
    """A real HTTP server on 127.0.0.1 serving corpus.txt (it ignores the credentials and the query)."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "corpus.txt").write_text("\n\n".join(document(i, 120) for i in range(30)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_credentials_in_an_input_url_reach_no_manifest_mlflow_record_or_log(tmp_path, http_corpus, caplog,
                                                                           ray_local):
    """A whole preprocess run with tracking on: the URL works, and its secrets are in no file of the
    workdir (manifest, MLflow's sqlite store and artifacts, DONE markers) and no log record."""
    from tests.steps import preprocess

    local = tmp_path / "local"
    local.mkdir()
    (local / "doc.txt").write_text(document(99, 200))
    (local / ".DS_Store").write_bytes(b"\x00\x01")
    workdir = tmp_path / "w"
    cfg = PipelineConfig(workdir=str(workdir), data=DataConfig(
        inputs=(_url(http_corpus), str(local)), vocab_size=300, min_chars=16, val_fraction=0.0, val_min_tokens=0,
        sft_inputs=()))
    caplog.set_level(logging.INFO)
    out = preprocess(cfg)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"]["kept"] == 2  # a .txt file is one document: the served one and the local one
    assert manifest["documents"]["dropped"].get("hidden_file") == 1  # counted, not silently skipped
    assert manifest["inputs"][0]["path"].startswith(f"http://***@{http_corpus}/corpus.txt?token=***")
    leaks = {str(p): _leaks(p.read_bytes().decode("latin-1")) for p in workdir.rglob("*") if p.is_file()}
    assert not {p: s for p, s in leaks.items() if s}, leaks
    assert (workdir / "mlflow.db").is_file()
    assert not _leaks(caplog.text)


def test_an_unreachable_url_is_a_redacted_one_line_error_exit_2(tmp_path):
    url = _url("example.invalid")
    for verbose in ((), ("-v",)):
        out = subprocess.run([sys.executable, "-m", "flows.cli", *verbose, "preprocess", "--input", url,
                              "--no-tracking", "--workdir", str(tmp_path / "w")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        assert "***@example.invalid" in out.stderr, out.stderr[-3000:]
        assert not _leaks(out.stderr + out.stdout), out.stderr[-3000:]
        assert ("Traceback" in out.stderr) == bool(verbose)


# --------------------------------------------------------------------------- Ray token authentication


def test_a_cluster_that_does_not_enforce_token_auth_is_refused_unless_allowed(caplog):
    from flows.cluster import check_token_auth

    check_token_auth(True, "ray-head:6379", allow_no_auth=False)
    with pytest.raises(ConfigError, match="ray-head:6379 accepts requests without a token.*allow_no_auth"):
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
    code = ("from flows.cluster import ensure_ray; from flows.config import ClusterConfig, ConfigError; import ray\n"
            "try:\n    ensure_ray(ClusterConfig(num_cpus=1))\nexcept ConfigError as e:\n"
            "    print('REFUSED', e, ray.is_initialized())\nelse:\n    print('ACCEPTED')\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "REFUSED" in out.stdout and "accepts requests without a token" in out.stdout, out.stdout + out.stderr
    assert out.stdout.strip().endswith("False"), out.stdout  # ray.shutdown() ran: nothing left connected
