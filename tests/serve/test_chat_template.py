"""Serving a real chat model (SmolLM2-135M-Instruct, imported from its GGUF): /v1/chat/completions
renders the model's own chat template, stops at the end of the turn and returns no template
token."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_chat_completion_uses_the_template_and_ends_at_end_of_turn(deploy, smollm2_gguf, tmp_path):
    from flows.models.importer import import_model

    bundle = import_model(str(smollm2_gguf), tmp_path / "smol")
    url = deploy("smolchat", tmp_path / "work", bundle=bundle, served_name="smol", num_cpus=0.5)
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 40,
    }
    out = _post(f"{url}/v1/chat/completions", body)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "The capital of France is Paris."
    assert out["usage"]["completion_tokens"] < 40
