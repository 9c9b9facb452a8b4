"""Parity with Hugging Face Llama (randomly initialised, no download): import, export, config
layouts, parameter counts of the presets, and the errors of bad directories."""

from __future__ import annotations

import json

import pytest
import torch

from gptcore import GPT, PRESETS, generate, preset
from gptcore.hf import config_from_hf, export_hf, load_hf_model, model_from_hf

transformers = pytest.importorskip("transformers")

# Small shapes covering every switch: GQA and MHA, tied and untied, biases, two RoPE bases, Llama-3
# scaling.
SHAPES = {
    "gqa-tied": dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4
    ),
    "mha-untied-bias": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=5e5,
    ),
    "gqa-llama3-scaling": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def _hf_model(shape: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(SHAPES[shape])
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    rope.update(kw.pop("rope_scaling", {}))
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        **kw,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with (
        torch.no_grad()
    ):  # HF initialises norms to 1 and biases to 0: perturb so the mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
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


def _assert_same_model(ours: GPT, hf) -> None:
    idx = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    prompt = [5, 17, 42, 9]
    assert generate(ours, prompt, max_new_tokens=32) == _hf_greedy(hf, prompt, 32)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_and_export_match_transformers(tmp_path, shape):
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf")
    c = ours.config
    assert (c.kv_heads, c.tie_embeddings, c.linear_attn_bias) == (
        hf.config.num_key_value_heads,
        hf.config.tie_word_embeddings,
        hf.config.attention_bias,
    )
    assert ours.num_params() == hf.num_parameters()
    _assert_same_model(ours, hf)

    export_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    _assert_same_model(ours, back)
    again = load_hf_model(tmp_path / "out")
    assert again.config == ours.config
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True)
    )


def test_both_config_layouts_read_the_same(tmp_path):
    """transformers 5 writes `rope_parameters`; transformers 4 wrote top-level rope_theta and
    rope_scaling."""
    hf = _hf_model("gqa-llama3-scaling")
    hf.save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    params = dict(v5["rope_parameters"])
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4 |= {"rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    a, b = config_from_hf(v5), config_from_hf(v4)
    assert a == b
    assert (b.rope_theta, b.rope_scaling_factor, b.rope_original_context) == (5e5, 8.0, 32)


def test_sharded_safetensors_load(tmp_path):
    hf = _hf_model("mha-untied-bias")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (
        tmp_path / "model.safetensors"
    ).exists()
    ours = load_hf_model(tmp_path)
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=shard.name):
        load_hf_model(tmp_path)


def test_bad_weights_name_the_tensor_or_file(tmp_path):
    hf = _hf_model("gqa-tied")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model_from_hf(config, tensors)  # the seam the GGUF reader calls
    with pytest.raises(ValueError, match="missing tensors.*model.layers.1.mlp.up_proj.weight"):
        model_from_hf(
            config, {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
        )
    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.0.extra"):
        model_from_hf(config, {**tensors, "model.layers.0.extra": torch.zeros(1)})
    bad = {**tensors, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(64, 64\).*\(32, 64\)"):
        model_from_hf(config, bad)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_model(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_act", "gelu", "hidden_act"),
        ("head_dim", 32, "head_dim"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
            "rope_type='yarn'",
        ),
        ("num_key_value_heads", 3, "n_kv_head=3 must divide n_head=4"),
        ("model_type", "mistral", "model_type 'mistral'"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings"),
    ],
)
def test_unsupported_settings_name_the_key_and_file(key, value, message):
    config = _hf_model("gqa-tied").config.to_dict() | {key: value}
    with pytest.raises(ValueError, match=f"my/config.json.*{message}"):
        config_from_hf(config, source="my/config.json")


# The published configs' shapes (huggingface.co/HuggingFaceTB/SmolLM2-135M, -360M,
# meta-llama/Llama-3.2-1B); all three use rms_norm_eps 1e-5 and tied embeddings.
_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
)
PUBLISHED = {
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, 8192, 1e5),
    "smollm2-360m": (49152, 960, 2560, 32, 15, 5, 8192, 1e5),
    "llama-3.2-1b": (128256, 2048, 8192, 16, 32, 8, 131072, 5e5),
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# Ours: the family's switches on the tiny shape, head untied.
TINY_LLAMA = (4096, 64, 160, 4, 4, 2, 128, 1e4)


@pytest.mark.parametrize("name", [*PUBLISHED, "tiny-llama"])
def test_presets_count_parameters_as_transformers(name):
    shape = TINY_LLAMA if name == "tiny-llama" else PUBLISHED[name]
    kw = dict(
        zip(_KEYS, shape, strict=True), rms_norm_eps=1e-5, tie_word_embeddings=name != "tiny-llama"
    )
    scaling = LLAMA3_SCALING if name == "llama-3.2-1b" else {}
    hf_dict = {"model_type": "llama", "hidden_act": "silu", **kw, "rope_scaling": scaling or None}
    assert config_from_hf(hf_dict) == PRESETS[name]
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta"), **scaling}
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=rope, **kw))
        ours = GPT(PRESETS[name])
    assert PRESETS[name].num_params() == hf.num_parameters() == ours.num_params()


def test_gpt2_preset_counts_parameters_as_transformers():
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768)
        )
    assert preset("gpt2-124m").num_params() == hf.num_parameters()


def test_flops_per_token_counts_each_matrix_once():
    tied, untied = preset("smollm2-135m"), preset("smollm2-135m", tie_embeddings=False)
    # untying adds a parameter matrix but no FLOPs: the extra matrix is the input lookup
    assert untied.num_params() - tied.num_params() == 49152 * 576
    assert untied.flops_per_token(256) == tied.flops_per_token(256)
    gpt2 = preset("gpt2-124m")
    assert gpt2.flops_per_token(1024) == 6 * (gpt2.num_params() - 1024 * 768) + 12 * 12 * 768 * 1024


def test_gpt2_goes_through_the_same_entry_points(tmp_path):
    torch.manual_seed(1)
    ours = GPT(preset("tiny", vocab_size=300, context_length=64)).eval()
    export_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    back = load_hf_model(tmp_path)
    idx = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (back(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        export_hf(GPT(preset("tiny", norm="rmsnorm")), tmp_path / "x")
