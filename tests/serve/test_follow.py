"""Serving follows NAME@champion in a real MLflow registry: under load, a promotion swaps the model
with no failed request, in-flight requests finish on the model they started on, and a version that
fails to load (corrupt weights, a tokenizer that does not match them) is refused while the old one
keeps serving."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from flows.registry.promote import bundle_of
from gptcore import load_bundle
from gptcore.batching import SequenceRequest, generate_alone
from gptcore.sampling import SamplingParams
from tests.serve.conftest import make_bundle, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def versions(store, tok, tmp_path_factory) -> dict[str, str]:
    """Registered versions; all but "ungated" passed the promotion gate (as `gptflow promote`
    records)."""
    found = {
        k: store["add"](make_bundle(tmp_path_factory.mktemp(k), tok, seed=seed))
        for k, seed in (("a", 10), ("b", 11), ("corrupt", 12), ("mismatch", 13), ("ungated", 14))
    }
    registry = store["registry"]()
    for k, v in found.items():
        if k != "ungated":
            registry.set_version_tags("gpt", v, {"gptflow.gate": "passed"})
    return found


def _stored(store, version: str, name: str) -> Path:
    """A file of the version's bundle in the registry's own artifact store (what every replica
    downloads)."""
    from flows.workdir import sha256_file

    want = store["registry"]().version("gpt", version)["tags"]["gptflow.bundle_sha256"]
    weights = next(
        p
        for p in (store["root"] / "mlartifacts").rglob("model.safetensors")
        if sha256_file(p) == want
    )
    return weights.parent / name


def _reference(store, version: str, tmp_path):
    bundle = bundle_of(store["registry"](), "gpt", version, tmp_path / "ref")
    model, tok, _ = load_bundle(bundle)
    return lambda prompt, n: tok.decode(
        generate_alone(
            model,
            SequenceRequest(
                0, tuple(tok.encode(prompt)), n, SamplingParams(stop_ids=frozenset({tok.eot_id}))
            ),
        )
    )


def _version_served(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["version"]


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.2)


def test_promotion_under_load_swaps_without_a_failed_request_and_bad_versions_are_refused(
    store, versions, deploy, tmp_path
):
    registry = store["registry"]()
    registry.set_alias("gpt", "champion", versions["a"])
    url = deploy(
        "follow",
        store["root"],
        model="gpt@champion",
        tracking=store["tracking"],
        poll_s=0.3,
        max_tokens_limit=1000,
    )
    assert _version_served(url) == versions["a"]
    old, new = (
        _reference(store, versions["a"], tmp_path),
        _reference(store, versions["b"], tmp_path),
    )
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    long_text: list[str] = []
    long_started = threading.Event()

    def long_request():  # starts on version a and must finish there, whatever happens meanwhile
        parts = []
        for chunk in client.completions.create(
            model="gpt", prompt="The cat", max_tokens=700, stream=True
        ):
            parts.append(chunk.choices[0].text)
            long_started.set()
        long_text.append("".join(parts))

    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def load(i: int):
        nonlocal done
        while not stop.is_set():
            try:
                if i % 2:
                    text = "".join(
                        c.choices[0].text
                        for c in client.completions.create(
                            model="gpt", prompt="A dog", max_tokens=24, stream=True
                        )
                    )
                else:
                    text = (
                        client.chat.completions.create(
                            model="gpt", messages=[{"role": "user", "content": "hi"}], max_tokens=16
                        )
                        .choices[0]
                        .message.content
                    )
                assert isinstance(text, str)
                done += 1
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                failures.append(repr(e))

    threads = [threading.Thread(target=long_request)] + [
        threading.Thread(target=load, args=(i,)) for i in range(8)
    ]
    for t in threads:
        t.start()
    try:
        assert long_started.wait(30)
        registry.set_alias("gpt", "champion", versions["b"])
        _wait(
            lambda: _version_served(url) == versions["b"], 30, "the new champion was not swapped in"
        )
        time.sleep(1.0)  # keep the load on the new version for a while
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert done > 20
    assert long_text == [old("The cat", 700)]  # finished on the model it started on
    assert client.completions.create(model="gpt", prompt="The cat", max_tokens=20).choices[
        0
    ].text == new("The cat", 20)

    # A version whose stored weights are not the ones its sha256 tag names, one whose tokenizer does
    # not match its weights, and one that never passed the gate: all are refused and b keeps
    # serving.
    _stored(store, versions["corrupt"], "model.safetensors").write_bytes(b"garbage")
    config = _stored(store, versions["mismatch"], "config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 999}))
    for bad in ("corrupt", "mismatch", "ungated"):
        registry.set_alias("gpt", "champion", versions[bad])
        _wait(
            lambda bad=bad: versions[bad] in wait_healthy(url)["refused_versions"],
            30,
            f"{bad} was not refused",
        )
        assert _version_served(url) == versions["b"]
        assert client.completions.create(model="gpt", prompt="A dog", max_tokens=8).choices[
            0
        ].text == new("A dog", 8)
    # the gate passes it later (gptflow promote --force): it is served at the next poll
    registry.set_version_tags("gpt", versions["ungated"], {"gptflow.gate": "passed"})
    _wait(
        lambda: _version_served(url) == versions["ungated"], 30, "the gated version was not served"
    )


def test_the_serve_step_deploys_the_champion_on_the_configured_ray(
    store, versions, serve_url, tmp_path
):
    from ray import serve

    from flows import pipeline
    from flows.config import PipelineConfig, ServeConfig

    store["registry"]().set_alias("gpt", "champion", versions["b"])
    port = int(serve_url.rsplit(":", 1)[1])  # the running Serve instance's proxy
    cfg = PipelineConfig(
        workdir=str(store["root"]),
        tracking=store["tracking"],
        serve=ServeConfig(deploy=True, port=port, num_cpus=0.1, poll_s=0),
    )
    step = next(s for s in pipeline.STEPS if s.name == "serve")
    assert step.enabled(cfg) and not step.enabled(PipelineConfig())
    try:
        out = step.run(cfg, {"promoted": str(tmp_path)}, tmp_path, pipeline.context(cfg))
        record = json.loads((out / "deployment.json").read_text())
        assert record["version"] == versions["b"] and record["url"] == f"{serve_url}/v1"
        assert _version_served(serve_url) == versions["b"]
    finally:
        serve.delete("gptflow")
