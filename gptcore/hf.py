"""Hugging Face GPT-2 interop: read and write the `transformers` GPT2LMHeadModel directory layout.

GPT-2's checkpoints store attention and MLP projections as Conv1D weights, shaped (in, out):
the transpose of nn.Linear's (out, in). Everything else maps name for name.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.tokenizer import Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def import_gpt2(directory: str | Path) -> GPT:
    """A GPT with the weights of a HF GPT-2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing (not a Hugging Face GPT-2 directory)")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not readable JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(hf).__name__}")
    _check_types(hf, config_path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{config_path}: model_type {hf.get('model_type')!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU_TANH:
        raise ValueError(f"{config_path}: activation_function {activation!r} unsupported (GPT uses tanh GELU)")
    # Variants GPT does not compute: loading their weights would silently give other logits.
    unsupported = {
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": bool(hf.get("reorder_and_upcast_attn", False)),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{config_path}: unsupported GPT-2 variant settings {bad} (GPT implements standard GPT-2)")
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    config = GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    state = _read_weights(directory)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the tied head
        target = name.replace("h.", "blocks.", 1) if name.startswith("h.") else name
        ours[target] = tensor.t() if name.endswith(_CONV1D) else tensor
    ours["lm_head.weight"] = ours["wte.weight"]
    model = GPT(config)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)
    except RuntimeError as e:  # shape mismatches between config.json and the weights
        raise ValueError(f"{directory}: weights do not match {config_path}: {e}") from e
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit GPT-2 layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def export_gpt2(model: GPT, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads (and the tokenizer)."""
    c = model.config
    if not c.bias:
        raise ValueError("GPT-2 layout needs biases: cannot export a model with bias=False")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte (tie_word_embeddings)
        hf_name = "transformer." + (name.replace("blocks.", "h.", 1) if name.startswith("blocks.") else name)
        tensor = tensor.detach().cpu()
        state[hf_name] = (tensor.t() if name.endswith(_CONV1D) else tensor).contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.context_length,
        "n_ctx": c.context_length,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if tokenizer is not None:
        hf_config.update(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id)
        tokenizer.save(directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2TokenizerFast",
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "model_max_length": c.context_length,
        }, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


# config.json keys GPT reads, and the JSON type each must have (null is allowed where HF allows it).
_INT_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "n_ctx")
_FLOAT_KEYS = ("layer_norm_epsilon",)


def _check_types(hf: dict, path: Path) -> None:
    for key in _INT_KEYS:
        v = hf.get(key)
        if key in hf and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{path}: {key}={v!r} must be an integer")
    for key in _FLOAT_KEYS:
        v = hf.get(key)
        if key in hf and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise ValueError(f"{path}: {key}={v!r} must be a number")
    for key in ("model_type", "activation_function"):
        if key in hf and not isinstance(hf[key], str):
            raise ValueError(f"{path}: {key}={hf[key]!r} must be a string")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path = directory / "model.safetensors"
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{safetensors_path}: unreadable or truncated safetensors file ({e})") from e
    if bin_path.is_file():
        # weights_only: a checkpoint from the internet must not run code on load.
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as e:
            raise ValueError(f"{bin_path}: unreadable, truncated or not a plain weights file ({e})") from e
    raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
