"""GGUF interop: a llama.cpp `.gguf` file of the llama architecture as a HF-style config, HF-named
fp32 tensors and a Tokenizer.

Read with the `gguf` package (the reader llama.cpp publishes). What llama.cpp changed on the way
in is undone here, and nothing else:
- names: a table (`_NAMES`) from llama.cpp's tensor names to transformers' LlamaForCausalLM ones;
- values: quantized tensors are dequantized to fp32 by `gguf.quants.dequantize`;
- layout: llama.cpp's converter permutes the rows of Q and K for its RoPE kernel (pairs
  interleaved, HF has halves); `_unpermute` is the inverse, with the KV-head count for K;
- the head: `output.weight` when the file has one (untied), the embedding otherwise (tied);
- the tokenizer: rebuilt from the vocabulary, merges and token types in the metadata, with the
  pre-tokenizer `tokenizer.ggml.pre` names, the special tokens and `tokenizer.chat_template`.

What it is not: a writer, nor a model. :func:`read_gguf` gives what transformers'
`from_pretrained(dir, gguf_file=...)` builds (config dict, state dict, tokenizer);
:func:`load_gguf` hands that to the one HF importer (gptcore.hf) for a GPT.
Every failure is a ValueError naming the file and the problem.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptcore.tokenizer import Tokenizer, end_of_turn_tokens

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZERS = (
    "gpt2",
)  # byte-level BPE; sentencepiece ("llama") vocabularies are not built here

# llama.cpp tensor name -> transformers LlamaForCausalLM name ({i}: the block).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# The regexes that split text before BPE, by `tokenizer.ggml.pre` (llama.cpp's names). None: GPT-2's
# own regex inside the ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3")

# llama.cpp token types (llama_token_type): what becomes an added token.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFModel:
    """What a .gguf file holds, in transformers' terms."""

    path: Path
    hf_config: dict[str, Any]
    """A LlamaConfig dict (config.json) of the model."""
    tensors: dict[str, torch.Tensor]
    """HF-named fp32 tensors; `lm_head.weight` only when the file has an untied head."""
    tokenizer: Tokenizer


def read_gguf(path: str | Path) -> GGUFModel:
    """Config, fp32 tensors (HF names, HF layout) and tokenizer of a llama GGUF file."""
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported; gptcore reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    config = _hf_config(meta, arch, names)
    tensors = _tensors(reader, path, config)
    tokenizer = _tokenizer(meta)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if tokenizer.vocab_size != rows:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight has "
            f"{rows} rows"
        )
    if config["vocab_size"] != rows:
        raise ValueError(
            f"{path}: {arch}.vocab_size={config['vocab_size']} "
            f"but token_embd.weight has {rows} rows"
        )
    return GGUFModel(path, config, tensors, tokenizer)


def load_gguf(path: str | Path) -> tuple[Any, Tokenizer]:
    """(GPT in eval mode, Tokenizer) of a llama GGUF file."""
    from gptcore.hf import model_from_hf  # the Llama importer: one table for HF and GGUF names

    g = read_gguf(path)
    return model_from_hf(g.hf_config, g.tensors, source=g.path), g.tokenizer


# ---------------------------------------------------------------------- reading


def _open(path: Path) -> Any:
    import gguf

    class Reader(gguf.GGUFReader):
        # GGUFReader slices its np.memmap once per metadata value; memmap's per-slice bookkeeping
        # made that 3x slower than the same slices of a plain ndarray view of the same mapping
        # (SmolLM2's 98k vocabulary strings: ~10 s against ~3 s here).
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, KeyError, IndexError... on bad bytes
        raise ValueError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    return reader


class _Metadata:
    """The file's key/value metadata, read once, with errors that name the file and key."""

    def __init__(self, reader: Any, path: Path):
        self.path = path
        self._fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = ...) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001 - a corrupt field surfaces as any error of numpy's
            raise ValueError(f"{self.path}: metadata key {key!r} is unreadable ({e})") from e

    def integer(self, key: str, default: Any = ...) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{self.path}: metadata {key}={value!r} must be an integer")
        return int(value)

    def number(self, key: str, default: Any = ...) -> float:
        value = self.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float | np.number)
            or not np.isfinite(value)
        ):
            raise ValueError(f"{self.path}: metadata {key}={value!r} must be a finite number")
        return float(value)


def _hf_config(meta: _Metadata, arch: str, names: set[str]) -> dict[str, Any]:
    """A LlamaConfig dict from the `{arch}.*` keys, as transformers' GGUF loader derives it."""
    k = f"{arch}."
    n_head = meta.integer(k + "attention.head_count")
    d_model = meta.integer(k + "embedding_length")
    if n_head < 1 or d_model % n_head:
        raise ValueError(
            f"{meta.path}: {k}embedding_length={d_model} is not a multiple of "
            f"{k}attention.head_count={n_head}"
        )
    scaling = meta.get(k + "rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in names:
        what = (
            f"rope scaling {scaling!r}"
            if scaling not in ("none", "")
            else "a rope_freqs.weight tensor"
        )
        raise ValueError(
            f"{meta.path}: {what} (long-context RoPE) is not supported by the GGUF reader"
        )
    if "token_embd.weight" not in names:
        raise ValueError(f"{meta.path}: no token_embd.weight tensor")
    tokens = meta.get("tokenizer.ggml.tokens", None)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.integer(k + "vocab_size", len(tokens) if tokens is not None else 0),
        "hidden_size": d_model,
        "intermediate_size": meta.integer(k + "feed_forward_length"),
        "num_hidden_layers": meta.integer(k + "block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.integer(k + "attention.head_count_kv", n_head),
        "head_dim": meta.integer(k + "rope.dimension_count", d_model // n_head),
        "max_position_embeddings": meta.integer(k + "context_length"),
        "rms_norm_eps": meta.number(k + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.number(k + "rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "attention_bias": any(n.endswith(".attn_q.bias") for n in names),
        "mlp_bias": any(n.endswith(".ffn_up.bias") for n in names),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    for hf_key, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf_key] = meta.integer(f"tokenizer.ggml.{key}")
    if config["num_attention_heads"] % max(config["num_key_value_heads"], 1):
        raise ValueError(
            f"{meta.path}: {k}attention.head_count={n_head} is not a multiple of "
            f"{k}attention.head_count_kv={config['num_key_value_heads']}"
        )
    return config


def _hf_name(name: str, n_layer: int, path: Path) -> str:
    m = _BLOCK.match(name)
    key = f"blk.{{i}}.{m.group(2)}" if m else name
    if key not in _NAMES or (m and int(m.group(1)) >= n_layer):
        raise ValueError(
            f"{path}: tensor {name!r} has no place in a llama model of {n_layer} blocks"
        )
    return _NAMES[key].format(i=m.group(1)) if m else _NAMES[key]


def _tensors(reader: Any, path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, config["num_hidden_layers"], path)
        w = _dequantize(t, path)
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = _unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = _unpermute(w, config["num_key_value_heads"])
        out[name] = torch.from_numpy(w)
    return out


def _dequantize(t: Any, path: Path) -> np.ndarray:
    """The tensor as fp32 in torch's (out, in) shape; GGUF lists the fastest dimension first."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        if t.tensor_type == GGMLQuantizationType.F32:
            w = np.array(t.data, dtype=np.float32)
        else:
            w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
            f"cannot dequantize"
        ) from e
    except Exception as e:  # noqa: BLE001 - bytes that do not fill the blocks: a corrupt file
        raise ValueError(
            f"{path}: tensor {t.name} ({t.tensor_type.name}) is unreadable ({e})"
        ) from e
    if w.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: tensor {t.name} holds {w.size} values, "
            f"its shape {shape} needs {np.prod(shape)}"
        )
    return np.ascontiguousarray(w.reshape(shape), dtype=np.float32)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q or K (convert_hf_to_gguf.py's `permute`): within each
    head it interleaved the two rotary halves; HF's rotate-half layout keeps them apart."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ---------------------------------------------------------------------- tokenizer


def _tokenizer(meta: _Metadata) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ValueError(
            f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported; gptcore builds "
            f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE) vocabularies"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported; gptcore knows "
            f"{', '.join(PRE_TOKENIZERS)}"
        )
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    if len(types) != len(tokens):
        raise ValueError(f"{meta.path}: {len(tokens)} tokens but {len(types)} token types")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # A token spelled outside the byte alphabet (llama.cpp writes some added tokens as plain text)
    # is spelled in it, as transformers does, so the vocabulary and merges agree.
    spell = _bytes_to_unicode()
    vocab = {
        t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    if len(vocab) != len(tokens):
        raise ValueError(f"{meta.path}: tokenizer.ggml.tokens holds duplicate tokens")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = _pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are special: their text in the input maps to
    # their id. User-defined ones (<think>) are matched whole too, but are not special.
    hf.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL and set(t) <= alphabet
        ]
    )
    hf.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    special = _special_tokens(meta, tokens)
    template = meta.get("tokenizer.chat_template", None)
    stops = [
        tokens[meta.integer(f"tokenizer.ggml.{k}_token_id")]
        for k in ("eot", "eom")
        if f"tokenizer.ggml.{k}_token_id" in meta
        and meta.integer(f"tokenizer.ggml.{k}_token_id") < len(tokens)
    ]
    stops += end_of_turn_tokens(hf, template)
    try:
        return Tokenizer(hf, chat_template=template, stop_tokens=stops, **special)
    except ValueError as e:
        raise ValueError(f"{meta.path}: {e}") from e


def _pre_tokenizer(pre: str):
    """The pre-tokenizer `tokenizer.ggml.pre` names, as the model's own tokenizer.json has it."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # SmolLM's own tokenizer.json: each digit alone, then GPT-2's byte level
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _special_tokens(meta: _Metadata, tokens: list[str]) -> dict[str, str | None]:
    """bos/eos/unk/pad as token text (None when the file names none), their ids checked."""
    special: dict[str, str | None] = {}
    for key, name in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        i = meta.integer(f"tokenizer.ggml.{name}", -1)
        if i >= len(tokens):
            raise ValueError(
                f"{meta.path}: tokenizer.ggml.{name}={i} is past the {len(tokens)} tokens"
            )
        special[key] = tokens[i] if i >= 0 else None
    return special


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
