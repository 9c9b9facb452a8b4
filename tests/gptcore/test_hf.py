"""Parity with Hugging Face GPT-2 (randomly initialised, no download): logits and greedy text, both
ways."""

from __future__ import annotations

import pytest
import torch

from gptcore import GPT, generate, preset
from gptcore.hf import export_gpt2, import_gpt2

transformers = pytest.importorskip("transformers")


def _hf_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with (
        torch.no_grad()
    ):  # HF initialises LayerNorms to (1, 0); perturb so the mapping is exercised
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_greedy(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_import_matches_transformers(tmp_path, weights):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":  # the older layout: a torch.save'd state dict
        torch.save(hf.state_dict(), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    assert (tmp_path / weights).is_file()
    ours = import_gpt2(tmp_path)
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    assert generate(ours, [1, 2, 3], max_new_tokens=20) == _hf_greedy(hf, [1, 2, 3], 20)


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(1)
    ours = GPT(preset("tiny", vocab_size=300, context_length=64)).eval()
    export_gpt2(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    assert generate(ours, [4, 5], max_new_tokens=20) == _hf_greedy(hf, [4, 5], 20)
    assert import_gpt2(tmp_path).state_dict().keys() == ours.state_dict().keys()


def test_import_rejects_non_gpt2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        import_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_gpt2(tmp_path / "missing")


def test_import_rejects_variants_it_would_compute_wrongly(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in (
        ("scale_attn_by_inverse_layer_idx", True),
        ("tie_word_embeddings", False),
        ("n_inner", 100),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"config.json.*{key}"):
            import_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_embd": 32, "n_head": 4}))
    with pytest.raises(ValueError, match="do not match"):
        import_gpt2(tmp_path)
