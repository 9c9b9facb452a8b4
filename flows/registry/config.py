"""The registry section: the register and promote steps (model name, the promotion gate). Read by
flows/registry/; composed into the pipeline's config by flows/config.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flows.configlib import check, hashed_only_by

# The gate's settings decide what the promote steps do, not what the register steps record.
_GATE_STEPS = ("promote", "distill_promote")
_GATE = "the promotion gate's: the register steps do not read it"


@dataclass(frozen=True)
class RegistryConfig:
    """The MLflow model registry: the register and promote steps after evaluate."""

    enabled: bool = True
    """Register the final model and gate its promotion (needs tracking)."""
    name: str = "gpt"
    """Registered model name."""
    metric: Literal["bits_per_byte", "perplexity", "sft_val_loss"] = hashed_only_by(
        *_GATE_STEPS, default="bits_per_byte", why=_GATE
    )
    """What the gate compares: bits per byte (comparable across tokenizers), perplexity, or the loss
    on the held-out fine-tuning answers (sft_val_loss: for a tuned model, the figure the tuning is
    for; a champion with another tokenizer has none, and is replaced)."""
    margin: float = hashed_only_by(*_GATE_STEPS, default=0.01, why=_GATE)
    """A challenger must beat the champion by this fraction of the champion's figure."""

    def __post_init__(self) -> None:
        check(0.0 <= self.margin < 1.0, "margin", self.margin, "in [0, 1)")
        check(
            bool(self.name) and "/" not in self.name and "@" not in self.name,
            "name",
            self.name,
            "a non-empty name without '/' or '@'",
        )
