"""Model bundle: round trip, and every broken file fails with an error naming it."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from gptcore import GPT, Tokenizer, load_bundle, preset, save_bundle
from gptcore.bundle import BundleError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["some text for a small vocabulary, repeated. " * 30], vocab_size=280)


@pytest.fixture()
def bundle(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    save_bundle(tmp_path / "b", model, tok, {"lineage": {"dataset_manifest_sha256": "abc"}})
    return tmp_path / "b", model


def test_an_untied_llama_family_model_round_trips(tmp_path, tok):
    torch.manual_seed(0)
    cfg = preset(
        "tiny",
        vocab_size=tok.vocab_size,
        bias=False,
        norm="rmsnorm",
        positions="rotary",
        mlp="swiglu",
        n_kv_head=2,
        mlp_hidden=96,
        tie_embeddings=False,
        rope_theta=5e5,
    )
    model = GPT(cfg).eval()
    save_bundle(tmp_path / "b", model, tok)
    loaded, _, meta = load_bundle(tmp_path / "b")
    assert loaded.config == cfg
    assert loaded.lm_head.weight.data_ptr() != loaded.wte.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, tok.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    assert meta["num_params"] == cfg.num_params()
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg.to_dict(), "norm": 1}))
    with pytest.raises(BundleError, match="norm=1 must be a str"):
        load_bundle(tmp_path / "b")


def test_round_trip_same_logits_tokenizer_and_metadata(bundle, tok):
    path, model = bundle
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "metadata.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded, loaded_tok, meta = load_bundle(path)
    idx = torch.randint(0, tok.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()  # still tied
    assert loaded_tok.to_json() == tok.to_json()
    assert meta["format_version"] == 1
    assert meta["num_params"] == model.num_params()
    assert meta["lineage"] == {"dataset_manifest_sha256": "abc"}


def test_load_never_unpickles(bundle, monkeypatch):
    path, _ = bundle

    def refuse(*a, **k):
        raise AssertionError("unpickling on the load path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_bundle(path)


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "tokenizer.json", "metadata.json"]
)
def test_missing_file_is_named(bundle, name):
    path, _ = bundle
    (path / name).unlink()
    with pytest.raises(BundleError, match=name):
        load_bundle(path)


def test_truncated_weights_are_named(bundle):
    path, _ = bundle
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="model.safetensors"):
        load_bundle(path)


def test_shape_mismatch_is_named(bundle):
    path, _ = bundle
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_model"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="model.safetensors.*shape"):
        load_bundle(path)


def test_vocab_mismatch_is_named(bundle):
    path, _ = bundle
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="tokenizer.json.*vocab_size"):
        load_bundle(path)


def test_bad_json_and_unknown_config_key_are_named(bundle):
    path, _ = bundle
    (path / "metadata.json").write_text("{oops")
    with pytest.raises(BundleError, match="metadata.json"):
        load_bundle(path)
    (path / "metadata.json").write_text(json.dumps({"format_version": 1}))
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_experts"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="config.json.*n_experts"):
        load_bundle(path)


def test_save_refuses_mismatched_tokenizer(tmp_path, tok):
    with pytest.raises(BundleError, match="vocab_size"):
        save_bundle(tmp_path, GPT(preset("tiny", vocab_size=tok.vocab_size + 5)), tok)
