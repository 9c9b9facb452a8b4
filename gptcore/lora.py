"""Low-rank adapters (LoRA, Hu et al. 2021) on gptcore's linear layers, and their merge into the
weights.

An adapted layer computes ``W x + b + (alpha / r) * B (A dropout(x))`` with ``A`` (r, in) drawn like
a Linear's weight and ``B`` (out, r) zero, so the adapted model starts out as the base exactly, and
only ``A`` and ``B`` train. :func:`apply_lora` swaps the targeted layers for :class:`LoRALinear` in
place -- sharing the base's weight and bias Parameters, so the state dict keeps the base's names
plus ``<layer>.lora_A`` / ``<layer>.lora_B`` -- and freezes every other parameter.
:func:`merge_state_dict` folds the adapters into the weights: the result is a plain state dict of
the base's shape, which is what a bundle stores (evaluation, the registry and serving never see an
adapter).

Why not peft: it wraps modules by replacing them with its own classes whose state-dict names differ
(``base_layer.weight``) and whose forward skips gptcore's packed-weight path; the few lines here
keep the names and the model file as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcore.packed import Linear

LORA_KEYS = (".lora_A", ".lora_B")
# Every matrix of a block: attention's fused q/k/v and output, the MLP's (fused gate/up) and down.
ALL_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(Linear):
    """A Linear with a trainable low-rank update beside its frozen weight."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight = base.weight  # the same Parameters: the base's state-dict names, no copy
        self.bias = base.bias
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(
            self.lora_A, a=math.sqrt(5)
        )  # nn.Linear's own init, as in the paper's code
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (B, T, out)
        update = F.linear(
            F.linear(self.lora_dropout(x), self.lora_A), self.lora_B
        )  # (B, T, r) -> (B, T, out)
        return y + self.scaling * update


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ALL_TARGETS,
) -> list[str]:
    """Adapt every Linear whose name ends with one of `targets`; freeze all else. Returns the names.

    ValueError naming the valid layer names when a target matches none."""
    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be >= 1")
    linears = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "." in name
    }
    for t in targets:
        if not any(name.endswith(t) for name in linears):
            suffixes = sorted({".".join(n.split(".")[-2:]) for n in linears})
            raise ValueError(
                f"LoRA target {t!r} matches no linear layer; the model's are: {', '.join(suffixes)}"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = [name for name in linears if any(name.endswith(t) for t in targets)]
    for name in adapted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return adapted


def merge_state_dict(
    state: Mapping[str, torch.Tensor], r: int, alpha: float
) -> dict[str, torch.Tensor]:
    """`state` with every ``<layer>.lora_A`` / ``lora_B`` pair folded into ``<layer>.weight`` (in
    fp32)."""
    scaling = alpha / r
    out = {k: v for k, v in state.items() if not k.endswith(LORA_KEYS)}
    for key in state:
        if key.endswith(".lora_A"):
            layer = key.removesuffix(".lora_A")
            a, b = state[key].float(), state[f"{layer}.lora_B"].float()
            w = out[f"{layer}.weight"]
            out[f"{layer}.weight"] = (w.float() + scaling * (b @ a)).to(
                w.dtype
            )  # (out, r) @ (r, in)
    return out
