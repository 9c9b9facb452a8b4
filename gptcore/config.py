"""GPTConfig: the shape of a GPT, plus named presets and the arithmetic (parameters, FLOPs) on it.

Only serializable values live here, so a config round-trips through config.json unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer in the GPT-2 layout."""

    vocab_size: int = 50257
    """Number of token ids (the tokenizer's vocabulary size, special tokens included)."""
    context_length: int = 1024
    """Longest sequence the model attends over (size of the learned position embedding)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; d_model must divide by it."""
    d_model: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 at inference)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms, as GPT-2 has them."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2 uses 1e-5)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward (less memory, ~30% more compute)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (the LM head is tied to the token embedding, so it adds nothing)."""
        d, L, b = self.d_model, self.n_layer, int(self.bias)
        per_block = (
            2 * d * b + 2 * d  # two LayerNorms (weight, and bias if any)
            + d * 3 * d + 3 * d * b  # qkv projection
            + d * d + d * b  # attention output projection
            + d * 4 * d + 4 * d * b  # MLP up
            + 4 * d * d + d * b  # MLP down
        )
        final_ln = d + d * b
        total = L * per_block + final_ln
        if include_embeddings:
            total += self.vocab_size * d + self.context_length * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N plus attention (PaLM appendix B).

        N excludes the position embedding (a lookup, no FLOPs) but includes the tied LM head.
        """
        T = seq_len or self.context_length
        n = self.num_params() - self.context_length * self.d_model
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * T

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


PRESETS: dict[str, GPTConfig] = {
    # < 1M parameters at vocab 4096: trains in seconds on a CPU, for tests and the local pipeline.
    "tiny": GPTConfig(vocab_size=4096, context_length=128, n_layer=4, n_head=4, d_model=64),
    # 1.3M parameters at vocab 4096: the default local pipeline's model, minutes on 2 CPU cores in bf16.
    "small": GPTConfig(vocab_size=4096, context_length=128, n_layer=4, n_head=4, d_model=128),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, d_model=768),
    "gpt2-350m": GPTConfig(n_layer=24, n_head=16, d_model=1024),
    "gpt2-774m": GPTConfig(n_layer=36, n_head=20, d_model=1280),
    "gpt2-1.5b": GPTConfig(n_layer=48, n_head=25, d_model=1600),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A preset by name with field overrides, e.g. ``preset("tiny", vocab_size=8000)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
