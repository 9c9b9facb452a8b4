"""Register, gate, promote, roll back and trace models in a real MLflow store (sqlite here, a real
`mlflow server` once), with pyfunc loading and `mlflow models serve` from fresh processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.config import RegistryConfig
from flows.registry import promote as promoting
from flows.registry.register import check_bundle
from flows.tracking import RegistryError
from tests.registry.conftest import EVAL

ROOT = Path(__file__).resolve().parents[2]


def _aliases(registry, name="gpt") -> dict[str, str]:
    return {a: v["version"] for v in registry.versions(name) for a in v["aliases"]}


def _gptflow(*args: str, store: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["tracking"].uri}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--workdir", str(store["root"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=store["root"],
    )


def test_register_records_lineage_and_is_idempotent(store, registered, bundles):
    version = registered("good")
    registry = store["registry"]()
    tags = registry.version("gpt", version)["tags"]
    assert tags["gptflow.bundle"] == str(bundles["good"].resolve())
    assert tags["gptflow.tokenizer_sha256"] and tags["gptflow.eval.val_bits_per_byte"]
    assert tags["gptflow.run.evaluate"] and tags["gptflow.eval_dataset"] == str(
        store["dataset"].resolve()
    )
    assert store["add"](bundles["good"]) == version  # the same bundle again: no second version
    assert [v["version"] for v in registry.versions("gpt")].count(version) == 1


def test_first_model_is_champion_worse_is_refused_better_promoted_and_rollback(store, registered):
    registry = store["registry"]()
    cfg = RegistryConfig()
    good = registered("good")
    first = promoting.promote_version(registry, "gpt", good, cfg, EVAL, store["root"])
    assert first["promoted"] and "first model" in first["reason"]
    assert _aliases(registry)["champion"] == good

    worst = registered("worst")
    refused = promoting.promote_version(registry, "gpt", worst, cfg, EVAL, store["root"])
    assert not refused["promoted"]
    tags = registry.version("gpt", worst)["tags"]
    assert tags["gptflow.gate"] == "refused" and float(tags["gptflow.gate.challenger"]) > float(
        tags["gptflow.gate.champion"]
    )
    assert _aliases(registry) == {"champion": good, "challenger": worst}

    best = registered("best")
    passed = promoting.promote_version(registry, "gpt", best, cfg, EVAL, store["root"])
    assert passed["promoted"] and passed["previous_champion"] == good
    assert registry.version("gpt", best)["tags"]["gptflow.previous_champion"] == good
    # the champion was re-evaluated on the challenger's data: its figure equals its own evaluation's
    assert float(registry.version("gpt", best)["tags"]["gptflow.gate.champion"]) == pytest.approx(
        float(registry.version("gpt", good)["tags"]["gptflow.eval.val_bits_per_byte"]), rel=1e-6
    )

    out = _gptflow("rollback", "gpt", store=store)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _aliases(registry)["champion"] == good
    assert registry.version("gpt", best)["tags"]["gptflow.rolled_back_to"] == good
    table = _gptflow("models", "gpt", store=store)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "version",
        "aliases",
        "gate",
    ]
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows[good][1] == "champion" and rows[worst][2] == "refused" and rows[best][2] == "passed"
    forced = _gptflow("promote", "gpt", "--version", worst, "--force", store=store)
    assert forced.returncode == 0 and "is now champion" in forced.stdout
    assert _aliases(registry)["champion"] == worst
    back = _gptflow("rollback", "gpt", store=store)
    assert back.returncode == 0 and _aliases(registry)["champion"] == good


def test_bad_requests_are_clear_errors_and_move_no_alias(store, registered, tmp_path, bundles):
    registry = store["registry"]()
    registered("good")
    before = _aliases(registry)
    for args, match in (
        (("promote", "nope", "--version", "1"), "nope"),
        (("promote", "gpt", "--version", "99"), "99"),
        (("lineage", "gpt@nobody"), "nobody"),
        (("lineage", "gpt"), "NAME@ALIAS"),
    ):
        out = _gptflow(*args, store=store)
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, (
            args,
            out.stderr,
        )
    assert _aliases(registry) == before
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bundles["good"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(
        RegistryError, match="tokenizer.json has 300 tokens but config.json says vocab_size=301"
    ):
        check_bundle(broken)


def _stored_weights(store, name: str, version: str) -> Path:
    """The version's model.safetensors in the registry's own artifact store (not a download of
    it)."""
    from flows.workdir import sha256_file

    want = store["registry"]().version(name, version)["tags"]["gptflow.bundle_sha256"]
    return next(
        p
        for p in (store["root"] / "mlartifacts").rglob("model.safetensors")
        if sha256_file(p) == want
    )


def test_corrupt_champion_artifacts_refuse_the_promotion(store, registered):
    """Weights in the registry that are not the ones the version's sha256 tag names are refused; a
    corrupt copy in the download cache is not trusted either: it is downloaded again."""
    registry = store["registry"]()
    good, best = registered("good"), registered("best")
    registry.set_alias("gpt", "champion", good)
    cache = store["root"] / "registry" / "cache"
    cached = promoting.bundle_of(registry, "gpt", good, cache) / "model.safetensors"
    cached.write_bytes(b"not a safetensors file")
    assert (
        promoting.bundle_of(registry, "gpt", good, cache).joinpath("model.safetensors").read_bytes()
        != b"not a safetensors file"
    )
    weights = _stored_weights(store, "gpt", good)
    saved = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    promoting.discard(cache / f"gpt-v{good}")
    try:
        with pytest.raises(
            promoting.BundleMismatch, match=f"version {good}: the downloaded weights have sha256"
        ):
            promoting.promote_version(registry, "gpt", best, RegistryConfig(), EVAL, store["root"])
        assert _aliases(registry)["champion"] == good
        assert not any(
            p.name.startswith(".gpt-v") and p.is_dir() for p in cache.iterdir()
        )  # no temp dir left
    finally:
        weights.write_bytes(saved)


def test_a_killed_download_is_not_reused_and_a_stale_one_is_downloaded_again(
    store, registered, bundles, tmp_path
):
    """What a download killed half-way leaves (a truncated model.safetensors, no DONE) and what a
    registry reset leaves (a complete bundle of another model under the same version number) are
    both replaced by the version's own weights."""
    from flows.workdir import sha256_file

    registry = store["registry"]()
    good = registered("good")
    want = registry.version("gpt", good)["tags"]["gptflow.bundle_sha256"]
    cache = tmp_path / "cache"
    entry = cache / f"gpt-v{good}" / "model" / "bundle"
    entry.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "metadata.json"):
        (entry / f).write_bytes((bundles["good"] / f).read_bytes())
    (entry / "model.safetensors").write_bytes(
        (bundles["good"] / "model.safetensors").read_bytes()[:1000]
    )
    assert (
        sha256_file(promoting.bundle_of(registry, "gpt", good, cache) / "model.safetensors") == want
    )

    stale = cache / f"gpt-v{good}"
    promoting.discard(stale)
    (stale / "bundle").mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "metadata.json", "model.safetensors"):
        (stale / "bundle" / f).write_bytes((bundles["worst"] / f).read_bytes())
    (stale / "DONE").write_text(
        json.dumps(
            {"sha256": sha256_file(stale / "bundle" / "model.safetensors"), "bundle": "bundle"}
        )
    )
    assert (
        sha256_file(promoting.bundle_of(registry, "gpt", good, cache) / "model.safetensors") == want
    )


def test_pyfunc_loads_in_a_fresh_process_and_matches_generate(store, registered, bundles):
    registry = store["registry"]()
    version = registered("best")
    registry.set_alias("gpt", "champion", version)
    code = (
        "import json, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/gpt@champion')\n"
        "print(json.dumps(m.predict(['The ', 'the cat'], params={'max_tokens': 6})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MLFLOW_TRACKING_URI"] = store["tracking"].uri
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=store["root"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    from gptcore import generate, load_bundle

    model, tok, _ = load_bundle(bundles["best"])
    want = [
        tok.decode(generate(model, tok.encode(p), 6, stop_ids=[tok.eot_id]))
        for p in ("The ", "the cat")
    ]
    assert got == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(store, registered, tmp_path):
    registry = store["registry"]()
    registry.set_alias("gpt", "champion", registered("best"))
    port = _free_port()
    # `mlflow models serve` execs uvicorn from PATH: the venv's bin, as in an activated venv
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store["tracking"].uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/gpt@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, 120)
        body = json.dumps(
            {
                "dataframe_split": {"columns": ["prompt"], "data": [["The "], ["the cat"]]},
                "params": {"max_tokens": 5},
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    finally:
        _stop(proc)


_RACE = """
import sys
from pathlib import Path
from flows.config import EvaluateConfig, RegistryConfig, TrackingConfig
from flows.registry.promote import promote_version
from flows.tracking import Registry
root, workdir, uri, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
Path(root, f"ready-{version}").touch()
while not all(Path(root, f"ready-{v}").exists() for v in sys.argv[5:]):
    pass
registry = Registry(TrackingConfig(uri=uri), workdir)
evaluate = EvaluateConfig(max_new_tokens=4, sample_tokens=16, prompts=("The ",))
promote_version(registry, "race", version, RegistryConfig(name="race"), evaluate, workdir)
"""


@pytest.mark.slow
@pytest.mark.parametrize("workdirs", ["one", "two"])
def test_two_promotions_racing_leave_the_better_model_champion(store, bundles, workdirs, tmp_path):
    """Both processes start gating at once against the same champion, from one workdir or from two
    that share the registry; the lock serialises them, so the second compares against the first's
    result and every decision is recorded: each promoted version is in the champion history."""
    model = f"race-{workdirs}"
    base, good, best = (store["add"](bundles[w], name=model) for w in ("worst", "good", "best"))
    registry = store["registry"]()
    registry.set_alias(model, "champion", base)
    dirs = {
        good: store["root"],
        best: store["root"] if workdirs == "one" else tmp_path / "elsewhere",
    }
    script = _RACE.replace('"race"', repr(model))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(tmp_path),
                str(dirs[v]),
                store["tracking"].uri,
                v,
                good,
                best,
            ],
            cwd=store["root"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in (good, best)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert _aliases(registry, model)["champion"] == best
    gates = {v: registry.version(model, v)["tags"].get("gptflow.gate") for v in (good, best)}
    assert gates[best] == "passed" and gates[good] in ("passed", "refused")
    history = json.loads(registry.model_tags(model)[promoting.HISTORY_TAG])
    assert history[-1] == best and {v for v, g in gates.items() if g == "passed"} <= set(history), (
        history,
        gates,
    )
    assert not [
        m
        for m in registry.client.search_registered_models()
        if m.name.endswith(promoting.LOCK_SUFFIX)
    ]


def test_a_promotion_lock_left_by_a_dead_process_is_broken(store, registered):
    registry = store["registry"]()
    lock = f"gpt{promoting.LOCK_SUFFIX}"
    assert registry.create_model(
        lock, {"gptflow.lock.token": "dead", "gptflow.lock.heartbeat": 0}, "test"
    )
    assert not registry.create_model(lock, {}, "a second holder")
    with promoting.promotion_lock(registry, "gpt", store["root"], wait_s=30):
        assert registry.model_tags(lock)["gptflow.lock.token"] != "dead"
    assert not [m for m in registry.client.search_registered_models() if m.name == lock]


@pytest.mark.slow
def test_against_a_real_mlflow_server(tmp_path, bundles, tok):
    """register -> promote -> pyfunc load through `mlflow server` on 127.0.0.1 (artifacts
    proxied)."""
    from flows.config import TrackingConfig
    from flows.context import StepContext
    from flows.evaluate.stage import evaluate
    from flows.registry.register import RESULT, register
    from flows.tracking import Registry, stage_run
    from tests.evaluate.conftest import corpus, write_dataset

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 240)
        tracking = TrackingConfig(uri=f"http://127.0.0.1:{port}")
        dataset = write_dataset(tmp_path / "dataset", tok, val=corpus(12, seed=2))
        with stage_run(tracking, tmp_path, "evaluate") as t:
            evaluation = evaluate(EVAL, bundles["good"], dataset, tmp_path / "eval", t)
        (tmp_path / "reg").mkdir()
        with stage_run(tracking, tmp_path, "register") as t:
            register(
                RegistryConfig(name="served"),
                bundles["good"],
                evaluation,
                dataset,
                tmp_path / "reg",
                StepContext(workdir=tmp_path, tracking=tracking, tracker=t),
            )
        version = json.loads((tmp_path / "reg" / RESULT).read_text())["version"]
        registry = Registry(tracking, tmp_path)
        record = promoting.promote_version(
            registry, "served", version, RegistryConfig(name="served"), EVAL, tmp_path
        )
        assert record["promoted"] and registry.by_alias("served", "champion")["version"] == version
        code = (
            "import mlflow; print(mlflow.pyfunc.load_model('models:/served@champion')"
            ".predict(['The '])[0] != None)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking.uri},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-3000:]
    finally:
        _stop(proc)
    assert proc.poll() is not None


def test_a_champion_with_another_tokenizer_is_scored_on_the_same_text(store, tok, tmp_path):
    """figures_on falls back to text when the tokenizers differ; on a shared tokenizer the text path
    gives the token path's figures, so the fallback measures the same thing."""
    from flows.data.dataset import read_manifest
    from flows.evaluate import metrics
    from gptcore import Tokenizer, load_bundle, save_bundle
    from tests.evaluate.conftest import corpus, tiny_model, train_briefly

    other = Tokenizer.train(corpus(300, seed=7), vocab_size=280)
    foreign = save_bundle(
        tmp_path / "foreign", train_briefly(tiny_model(other.vocab_size), other, 40), other, {}
    )
    figures = promoting.figures_on(foreign, store["dataset"], EVAL)
    assert 0 < figures.bits_per_byte < 20 and figures.perplexity > 1

    model, _, _ = load_bundle(foreign)
    manifest = read_manifest(store["dataset"])
    by_text = metrics.val_text_loss(model, other, store["dataset"], manifest, tok, 32, 8)
    assert by_text.bits_per_byte == pytest.approx(figures.bits_per_byte)
    same, _, _ = load_bundle(
        save_bundle(tmp_path / "same", train_briefly(tiny_model(tok.vocab_size), tok, 40), tok, {})
    )
    tokens = metrics.val_loss(same, tok, store["dataset"], manifest, 32, 8)
    text = metrics.val_text_loss(same, tok, store["dataset"], manifest, tok, 32, 8)
    assert text.bits_per_byte == pytest.approx(tokens.bits_per_byte, rel=0.03)


def test_lineage_reports_what_is_gone_as_missing(store, bundles, tmp_path):
    import shutil

    copy = tmp_path / "gone"
    shutil.copytree(bundles["good"], copy)
    version = store["add"](copy, name="ephemeral")
    shutil.rmtree(copy)  # the stage output is deleted after registering
    out = _gptflow("lineage", f"ephemeral/{version}", "--json", store=store)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout[out.stdout.index("{") :])
    assert (
        facts["bundle"]["path"] != str(copy) and facts["bundle"]["stage"] == "pretrain"
    )  # the registry's copy
    assert facts["bundle"]["dataset"]["missing"] and facts["runs"]["train"]["missing"]
    text = _gptflow("lineage", f"ephemeral/{version}", store=store)
    assert (
        text.returncode == 0
        and "dataset ?: MISSING" in text.stdout
        and "run train: MISSING" in text.stdout
    )


def test_an_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    from flows.config import TrackingConfig
    from flows.tracking import Registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The bounded probe answers first: one line naming the server, before any MLflow retry loop.
    from flows.config import ConfigError

    with pytest.raises(ConfigError, match=r"127\.0\.0\.1.*does not answer"):
        Registry(TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}"), tmp_path).versions("gpt")


def test_a_step_initialised_from_an_alias_reruns_when_the_alias_moves(store, registered):
    """finetune.init=models:/gpt@champion names the version the alias points at now, not the
    text."""
    from flows import pipeline
    from flows.config import load_config

    registry = store["registry"]()
    good, best = registered("good"), registered("best")
    cfg = load_config(
        None,
        [
            f"workdir={store['root']}",
            f"tracking.uri={store['tracking'].uri}",
            f"finetune.data={store['dataset']}",
            "finetune.init=models:/gpt@champion",
        ],
    )
    registry.set_alias("gpt", "champion", good)
    first = {p.step.name: p for p in pipeline.plan(cfg, wanted=["finetune"])}["finetune"]
    assert first.upstream == () and first.inputs["init"] == "models:/gpt@champion"
    registry.set_alias("gpt", "champion", best)
    moved = {p.step.name: p for p in pipeline.plan(cfg, wanted=["finetune"])}["finetune"]
    assert moved.key != first.key
