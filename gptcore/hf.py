"""Hugging Face interop: read and write `transformers` directories of GPT-2 and Llama models.

`load_hf_model(dir)` reads config.json and safetensors weights (one file or a sharded index; never
pickle); `config_from_hf` and `model_from_hf` turn an HF config dict and HF-named tensors into a
GPT (the GGUF reader produces exactly those and calls them too); `export_hf(model, dir)` writes a
directory `AutoModelForCausalLM.from_pretrained` loads with the same logits.

GPT-2's checkpoints store attention and MLP projections as Conv1D weights, shaped (in, out):
the transpose of nn.Linear's (out, in). Everything else maps name for name.
Llama's map through the table `LLAMA_TENSORS`: our fused projections are HF's separate ones
stacked by rows (q, k, v into c_attn; gate, up into c_fc), split again on export.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from gptcore.config import GPTConfig
from gptcore.jsonio import read_json_object
from gptcore.model import GPT
from gptcore.tokenizer import Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def import_gpt2(directory: str | Path) -> GPT:
    """A GPT with the weights of a HF GPT-2 directory (config.json + model.safetensors or
    pytorch_model.bin)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    hf = read_hf_config(directory, "GPT-2")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{config_path}: model_type {hf.get('model_type')!r} is not gpt2")
    return _gpt2_model(
        _gpt2_config(hf, config_path), _read_weights(directory), directory, config_path
    )


def _gpt2_config(hf: dict, config_path: Path | str) -> GPTConfig:
    _check_types(hf, config_path, _INT_KEYS, _FLOAT_KEYS)
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU_TANH:
        raise ValueError(
            f"{config_path}: activation_function {activation!r} unsupported (GPT uses tanh GELU)"
        )
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
        raise ValueError(
            f"{config_path}: unsupported GPT-2 variant "
            f"settings {bad} (GPT implements standard GPT-2)"
        )
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _gpt2_model(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    directory: Path | str,
    config_path: Path | str,
) -> GPT:
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
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in ours.items()}, strict=False
        )
    except RuntimeError as e:  # shape mismatches between config.json and the weights
        raise ValueError(f"{directory}: weights do not match {config_path}: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not fit GPT-2 layout: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def export_gpt2(model: GPT, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads (and the
    tokenizer)."""
    c = model.config
    if not c.bias:
        raise ValueError("GPT-2 layout needs biases: cannot export a model with bias=False")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte (tie_word_embeddings)
        hf_name = "transformer." + (
            name.replace("blocks.", "h.", 1) if name.startswith("blocks.") else name
        )
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
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "GPT2TokenizerFast",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "model_max_length": c.context_length,
                },
                indent=2,
            )
            + "\n"
        )
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


# config.json keys GPT reads, and the JSON type each must have (null is allowed where HF allows it).
_INT_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "n_ctx")
_FLOAT_KEYS = ("layer_norm_epsilon",)


def _check_types(
    hf: dict, path: Path | str, ints: tuple[str, ...], floats: tuple[str, ...]
) -> None:
    for key in ints:
        v = hf.get(key)
        if key in hf and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{path}: {key}={v!r} must be an integer")
    for key in floats:
        v = hf.get(key)
        if key in hf and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ):
            raise ValueError(f"{path}: {key}={v!r} must be a number")
    for key in ("model_type", "activation_function", "hidden_act"):
        if key in hf and not isinstance(hf[key], str):
            raise ValueError(f"{path}: {key}={hf[key]!r} must be a string")


def read_hf_config(directory: str | Path, kind: str = "Hugging Face model") -> dict:
    """config.json of an HF directory as a dict; FileNotFoundError/ValueError naming the file."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing (not a {kind} directory)")
    return read_json_object(config_path)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path = directory / "model.safetensors"
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        return _read_safetensors(safetensors_path)
    if bin_path.is_file():
        # weights_only: a checkpoint from the internet must not run code on load.
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as e:
            raise ValueError(
                f"{bin_path}: unreadable, truncated or not a plain weights file ({e})"
            ) from e
    raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable or truncated safetensors file ({e})") from e


# --------------------------------------------------------------------------- any family


def load_hf_model(directory: str | Path) -> GPT:
    """A GPT (fp32, eval mode) from an HF directory of model_type llama or gpt2: config.json and
    model.safetensors, or the shards a model.safetensors.index.json names. Safetensors only."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config_path = directory / "config.json"
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        tensors = _read_safetensors(directory / "model.safetensors")
    elif index.is_file():
        tensors = _read_sharded(index)
    else:
        raise FileNotFoundError(
            f"{directory}: neither model.safetensors nor model.safetensors.index.json "
            "(only safetensors weights are read, never pickle)"
        )
    return model_from_hf(hf, tensors, source=config_path)


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json_object(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise ValueError(f"{index}: shard {shard!r} is not a file beside the index")
        tensors.update(_read_safetensors(path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index}: tensors {missing[:5]} are not in the shards it names")
    return tensors


def config_from_hf(hf: dict, *, source: str | Path = "config.json") -> GPTConfig:
    """The GPTConfig of an HF config.json dict (model_type llama or gpt2); `source` names the file
    in errors. A setting GPT does not compute raises ValueError naming it: importing anyway would
    give other logits than the model's own."""
    model_type = hf.get("model_type", "gpt2")
    if model_type == "gpt2":
        return _gpt2_config(hf, source)
    if model_type == "llama":
        return _llama_config(hf, source)
    raise ValueError(
        f"{source}: model_type {model_type!r} is not supported (supported: gpt2, llama)"
    )


def model_from_hf(
    hf_config: dict, tensors: dict[str, torch.Tensor], *, source: str | Path = "config.json"
) -> GPT:
    """A GPT (fp32, eval mode) from an HF config dict and its HF-named tensors (any float dtype).
    A missing, unexpected or wrongly shaped tensor raises ValueError naming it."""
    config = config_from_hf(hf_config, source=source)
    if hf_config.get("model_type", "gpt2") == "gpt2":
        return _gpt2_model(config, tensors, Path(source).parent, source)
    return _llama_model(config, tensors, source)


def export_hf(
    model: GPT, directory: str | Path, *, config_extra: dict[str, Any] | None = None
) -> Path:
    """Write config.json and model.safetensors that
    `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits: a Llama
    directory for a Llama-family model, GPT-2's for GPT-2.
    `config_extra` is merged into config.json (e.g. bos/eos token ids). Tokenizer files are the
    caller's."""
    c = model.config
    if _is_gpt2(c):
        directory = export_gpt2(model, directory)
    elif c.norm == "rmsnorm" and c.positions == "rotary" and c.mlp == "swiglu":
        directory = _export_llama(model, Path(directory))
    else:
        raise ValueError(
            f"no Hugging Face architecture computes this GPTConfig "
            f"(norm={c.norm}, positions={c.positions}, mlp={c.mlp}): GPT-2 "
            f"needs layernorm/learned/gelu, Llama rmsnorm/rotary/swiglu"
        )
    if config_extra:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps({**read_json_object(path), **config_extra}, indent=2) + "\n")
    return Path(directory)


def _is_gpt2(c: GPTConfig) -> bool:
    return (
        c.norm == "layernorm"
        and c.positions == "learned"
        and c.mlp == "gelu"
        and c.tie_embeddings
        and c.kv_heads == c.n_head
        and c.ffn_hidden == 4 * c.d_model
        and c.linear_attn_bias == c.linear_mlp_bias == c.bias
    )


# --------------------------------------------------------------------------- Llama

# Ours <- HF's. Several HF tensors stacked by rows (dim 0) make one of ours; nothing else changes.
LLAMA_TENSORS: dict[str, tuple[str, ...]] = {
    "wte.weight": ("model.embed_tokens.weight",),
    "blocks.{i}.ln_1.weight": ("model.layers.{i}.input_layernorm.weight",),
    "blocks.{i}.attn.c_attn.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "blocks.{i}.attn.c_attn.bias": (
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias",
    ),
    "blocks.{i}.attn.c_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "blocks.{i}.attn.c_proj.bias": ("model.layers.{i}.self_attn.o_proj.bias",),
    "blocks.{i}.ln_2.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "blocks.{i}.mlp.c_fc.weight": (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    ),
    "blocks.{i}.mlp.c_fc.bias": (
        "model.layers.{i}.mlp.gate_proj.bias",
        "model.layers.{i}.mlp.up_proj.bias",
    ),
    "blocks.{i}.mlp.c_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    "blocks.{i}.mlp.c_proj.bias": ("model.layers.{i}.mlp.down_proj.bias",),
    "ln_f.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
# In some checkpoints, never read: old RoPE buffers (recomputed from the config).
_LLAMA_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LLAMA_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "head_dim",
)
_LLAMA_FLOATS = ("rms_norm_eps",)
_ROPE_FLOATS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor")


def _llama_config(hf: dict, source: Path | str) -> GPTConfig:
    _check_types(hf, source, _LLAMA_INTS, _LLAMA_FLOATS)
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if k not in hf
    ]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{source}: hidden_act {hf['hidden_act']!r} unsupported (Llama's MLP is SwiGLU: silu)"
        )
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if key in hf and not isinstance(hf[key], bool):
            raise ValueError(f"{source}: {key}={hf[key]!r} must be true or false")
    d, nh = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and (nh < 1 or head_dim * nh != d):
        raise ValueError(
            f"{source}: head_dim={head_dim} must equal hidden_size / num_attention_heads "
            f"({d} / {nh}): GPT's heads split the residual stream"
        )
    rope = _llama_rope(hf, source)
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=nh,
            n_kv_head=hf.get("num_key_value_heads") or nh,
            d_model=d,
            bias=False,
            attn_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm="rmsnorm",
            positions="rotary",
            mlp="swiglu",
            mlp_hidden=hf["intermediate_size"],
            tie_embeddings=hf.get("tie_word_embeddings", False),  # LlamaConfig's default
            **rope,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _llama_rope(hf: dict, source: Path | str) -> dict[str, Any]:
    """GPTConfig's rope fields from transformers 5's `rope_parameters` or transformers 4's top-level
    `rope_theta` and `rope_scaling`."""
    if isinstance(hf.get("rope_parameters"), dict):
        params, key = dict(hf["rope_parameters"]), "rope_parameters"
    else:
        params, key = dict(hf.get("rope_scaling") or {}), "rope_scaling"
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    _check_types(params, f"{source} ({key})", ("original_max_position_embeddings",), _ROPE_FLOATS)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"{source}: {key}.partial_rotary_factor={params['partial_rotary_factor']} unsupported "
            "(GPT rotates whole heads)"
        )
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise ValueError(
            f"{source}: {key}.rope_type={rope_type!r} unsupported (supported: default, llama3)"
        )
    need = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if need:
        raise ValueError(f"{source}: {key} of rope_type llama3 lacks {need}")
    return {
        **out,
        "rope_scaling_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_context": params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192)
        ),
    }


def _llama_rows(c: GPTConfig, ours: str, count: int) -> list[int] | None:
    """Rows of each HF tensor stacked into our tensor `ours` (None: just one)."""
    if count == 1:
        return None
    if ".attn.c_attn." in ours:
        return [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
    return [c.ffn_hidden, c.ffn_hidden]


def _llama_names(c: GPTConfig, ours: list[str]) -> dict[str, tuple[str, ...]]:
    """Our tensor names -> the HF names they are made of, for this config's layers."""
    table: dict[str, tuple[str, ...]] = {}
    for pattern, hf_names in LLAMA_TENSORS.items():
        for i in range(c.n_layer) if "{i}" in pattern else [0]:
            name = pattern.format(i=i)
            if name in ours:
                table[name] = tuple(n.format(i=i) for n in hf_names)
    return table


class _NoDraws(TorchFunctionMode):
    """Skips `nn.init.normal_`, initial values that a meta-device model cannot hold anyway: torch's
    meta normal_ imports torch._dynamo on first use, 1.2-2 s here (as long as the rest of building
    the model)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _llama_model(config: GPTConfig, tensors: dict[str, torch.Tensor], source: Path | str) -> GPT:
    with torch.device("meta"), _NoDraws():  # no random init of weights about to be replaced
        model = GPT(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del shapes["lm_head.weight"]
        head = tensors.get("lm_head.weight")  # a checkpoint may store the tied head anyway
        embed = tensors.get("model.embed_tokens.weight")
        if (
            head is not None
            and embed is not None
            and head.shape == embed.shape
            and torch.equal(head, embed)
        ):
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    table = _llama_names(config, list(shapes))
    wanted = {n for names in table.values() for n in names}
    unexpected = sorted(n for n in set(tensors) - wanted if not _LLAMA_IGNORED.fullmatch(n))
    missing = sorted(wanted - set(tensors))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not fit this Llama config: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    state: dict[str, torch.Tensor] = {}
    for ours, hf_names in table.items():
        rows = _llama_rows(config, ours, len(hf_names)) or [shapes[ours][0]]
        for hf_name, n in zip(hf_names, rows, strict=True):
            expected = (n, *shapes[ours][1:])
            if tuple(tensors[hf_name].shape) != expected:
                raise ValueError(
                    f"{source}: tensor {hf_name} has shape {tuple(tensors[hf_name].shape)}, "
                    f"the config implies {expected}"
                )
        state[ours] = _stack_rows([tensors[n] for n in hf_names])
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:  # assign gave the two names two parameters: tie them again
        model.lm_head.weight = model.wte.weight
    return model.eval()


def _stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """HF's separate projections as our one (q, k, v -> c_attn; gate, up -> c_fc), fp32."""
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).float().contiguous()


def _export_llama(model: GPT, directory: Path) -> Path:
    c = model.config
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        del state["lm_head.weight"]
    hf_state: dict[str, torch.Tensor] = {}
    for ours, hf_names in _llama_names(c, list(state)).items():
        rows = _llama_rows(c, ours, len(hf_names)) or [state[ours].shape[0]]
        for name, part in zip(hf_names, torch.split(state[ours], rows, dim=0), strict=True):
            hf_state[name] = part.clone()  # safetensors refuses tensors that share storage
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = llama_hf_config(c)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


def llama_hf_config(c: GPTConfig) -> dict[str, Any]:
    """The HF config.json dict of a Llama-family GPTConfig."""
    scaling = None
    if c.rope_scaling_factor != 1.0:
        scaling = {
            "rope_type": "llama3",
            "factor": c.rope_scaling_factor,
            "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_context,
        }
    return {  # transformers 4's layout (top-level rope_theta, rope_scaling): 4 and 5 both read it
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.layer_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "attention_bias": c.linear_attn_bias,
        "attention_dropout": c.dropout,
        "mlp_bias": c.linear_mlp_bias,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
