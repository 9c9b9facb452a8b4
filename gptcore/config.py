"""GPTConfig: the shape of a GPT, plus named presets and the arithmetic (parameters, FLOPs) on it.

One config covers two families: GPT-2 (LayerNorm, learned positions, GELU MLP, tied head; every
default) and Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases; SmolLM2,
Llama 3.x). Each switch is a field; model.py reads it where it acts.
Only serializable values live here, so a config round-trips through config.json unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer: GPT-2 by default, the Llama family by its switches."""

    vocab_size: int = 50257
    """Number of token ids (the tokenizer's vocabulary size, special tokens included)."""
    context_length: int = 1024
    """Longest sequence the model attends over (size of the learned position embedding, if any)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; d_model must divide by it."""
    d_model: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 at inference)."""
    bias: bool = True
    """Biases in LayerNorms, and in Linear layers unless attn_bias/mlp_bias say otherwise (GPT-2 has
    them)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every norm, LayerNorm or RMSNorm (GPT-2 and SmolLM2 use 1e-5)."""
    norm: str = "layernorm"
    """"layernorm" (GPT-2) or "rmsnorm" (Llama: weight only, computed in fp32)."""
    positions: str = "learned"
    """"learned" (GPT-2's position embedding) or "rotary" (RoPE on queries and keys, HF rotate-half
    layout)."""
    rope_theta: float = 10000.0
    """RoPE base: frequencies theta^(-2i/head_dim)."""
    rope_scaling_factor: float = 1.0
    """Llama-3 RoPE scaling: low frequencies divided by this (1.0 = no scaling)."""
    rope_low_freq_factor: float = 1.0
    """Llama-3 RoPE scaling: wavelengths above original_context / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama-3 RoPE scaling: wavelengths below original_context / this are left alone."""
    rope_original_context: int = 8192
    """Llama-3 RoPE scaling: the context length the model was pretrained at."""
    mlp: str = "gelu"
    """"gelu" (GPT-2: tanh-GELU) or "swiglu" (Llama: down(silu(gate(x)) * up(x)))."""
    mlp_hidden: int = 0
    """Width of the MLP's hidden layer; 0 means 4 * d_model."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention); 0 means n_head. Must divide n_head."""
    attn_bias: bool | None = None
    """Biases in the attention projections (q, k, v, output); None follows `bias`."""
    mlp_bias: bool | None = None
    """Biases in the MLP projections; None follows `bias`."""
    tie_embeddings: bool = True
    """LM head shares the token embedding's weight (GPT-2, SmolLM2, Llama 3.2); False: its own."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward (less memory, ~30% more compute)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout} must be in [0, 1)")
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "positions": ("learned", "rotary"),
            "mlp": ("gelu", "swiglu"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)!r} must be one of {', '.join(valid)}"
                )
        for name in ("mlp_hidden", "n_kv_head"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)} must be >= 0 (0 means the default)"
                )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps={self.layer_norm_eps} must be > 0")
        if self.positions == "rotary":
            if self.head_dim % 2:
                raise ValueError(
                    f"GPTConfig: rotary positions need an even head_dim, got {self.head_dim}"
                )
            if not self.rope_theta > 1.0:
                raise ValueError(f"GPTConfig.rope_theta={self.rope_theta} must be > 1")
            if not self.rope_scaling_factor >= 1.0:
                raise ValueError(
                    f"GPTConfig.rope_scaling_factor={self.rope_scaling_factor} "
                    f"must be >= 1 (1 = off)"
                )
            if self.rope_scaling_factor != 1.0 and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_context >= 1
            ):
                raise ValueError(
                    f"GPTConfig: rope scaling needs 0 < rope_low_freq_factor "
                    f"({self.rope_low_freq_factor}) < rope_high_freq_factor "
                    f"({self.rope_high_freq_factor}) and rope_original_context "
                    f">= 1 ({self.rope_original_context})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when 0."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        """The MLP's hidden width: mlp_hidden, or 4 * d_model when 0."""
        return self.mlp_hidden or 4 * self.d_model

    @property
    def linear_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def linear_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, as the model has them (a tied LM head adds nothing; an untied one counts
        as an embedding)."""
        d, L, h = self.d_model, self.n_layer, self.ffn_hidden
        qkv = (self.n_head + 2 * self.kv_heads) * self.head_dim
        ab, mb = int(self.linear_attn_bias), int(self.linear_mlp_bias)
        norm = d + d * int(self.bias and self.norm == "layernorm")  # weight, and a LayerNorm's bias
        ups = 2 if self.mlp == "swiglu" else 1  # SwiGLU: gate and up
        per_block = (
            2 * norm
            + d * qkv
            + qkv * ab  # q, k, v projections
            + d * d
            + d * ab  # attention output projection
            + ups * (d * h + h * mb)  # MLP up (and gate)
            + h * d
            + d * mb  # MLP down
        )
        total = L * per_block + norm  # the final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            total += self.context_length * d if self.positions == "learned" else 0
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N plus attention (PaLM appendix B).

        N counts every matrix a token is multiplied by, the LM head once: it excludes the lookups
        (the position embedding, and the token embedding when the head is untied).
        """
        T = seq_len or self.context_length
        n = self.num_params() - (
            self.context_length * self.d_model if self.positions == "learned" else 0
        )
        n -= 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layer * self.n_head * self.head_dim * T

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict (e.g. config.json), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


# The switches every Llama-family preset shares (the published models' eps is 1e-5).
_LLAMA: dict[str, Any] = dict(
    bias=False,
    attn_bias=False,
    mlp_bias=False,
    norm="rmsnorm",
    positions="rotary",
    mlp="swiglu",
    layer_norm_eps=1e-5,
)

PRESETS: dict[str, GPTConfig] = {
    # < 1M parameters at vocab 4096: trains in seconds on a CPU, for tests and the local pipeline.
    "tiny": GPTConfig(vocab_size=4096, context_length=128, n_layer=4, n_head=4, d_model=64),
    # 1.3M parameters at vocab 4096: the default local pipeline's model, minutes on 2 CPU cores in
    # bf16.
    "small": GPTConfig(vocab_size=4096, context_length=128, n_layer=4, n_head=4, d_model=128),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, d_model=768),
    "gpt2-350m": GPTConfig(n_layer=24, n_head=16, d_model=1024),
    "gpt2-774m": GPTConfig(n_layer=36, n_head=20, d_model=1280),
    "gpt2-1.5b": GPTConfig(n_layer=48, n_head=25, d_model=1600),
    # The Llama family's tiny: every switch of the family on the tiny shape (RMSNorm, RoPE, SwiGLU,
    # grouped-query attention, an untied head), for tests and for trying the family on a CPU.
    "tiny-llama": GPTConfig(
        vocab_size=4096,
        context_length=128,
        n_layer=4,
        n_head=4,
        d_model=64,
        **_LLAMA,
        n_kv_head=2,
        mlp_hidden=160,
        tie_embeddings=False,
    ),
    # The Llama family, shapes from the published Hugging Face configs.
    "smollm2-135m": GPTConfig(
        vocab_size=49152,
        context_length=8192,
        n_layer=30,
        n_head=9,
        d_model=576,
        **_LLAMA,
        n_kv_head=3,
        mlp_hidden=1536,
        rope_theta=100000.0,
    ),
    "smollm2-360m": GPTConfig(
        vocab_size=49152,
        context_length=8192,
        n_layer=32,
        n_head=15,
        d_model=960,
        **_LLAMA,
        n_kv_head=5,
        mlp_hidden=2560,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": GPTConfig(
        vocab_size=128256,
        context_length=131072,
        n_layer=16,
        n_head=32,
        d_model=2048,
        **_LLAMA,
        n_kv_head=8,
        mlp_hidden=8192,
        rope_theta=500000.0,
        rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_context=8192,
    ),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A preset by name with field overrides, e.g. ``preset("tiny", vocab_size=8000)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
