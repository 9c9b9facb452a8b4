"""The teacher of a distillation run, on a training worker: loaded from its bundle, frozen, beside
the student.

What it is: :class:`Teacher`, which the training loop (flows/train/loop.py) builds when its config
names a teacher bundle. For each micro-batch it runs the teacher forward without gradients and hands
the student's forward a :class:`gptcore.Distillation` (the teacher's final hidden states and LM-head
weight), so the student's loss becomes ``alpha * CE + (1 - alpha) * T^2 * KL`` in the same fused,
chunked LM head that computes plain cross-entropy (gptcore/distillation.py): neither model's
(B, T, vocab) logits exist.

What it is not: a second training loop, or a DeepSpeed engine. The teacher is never trained, so it
has no gradients, optimizer state or checkpoint: every worker holds one full copy in the student's
compute dtype (bf16 weights under bf16, fp32 otherwise; bf16 matmuls under bf16-autocast), and a
restarted worker reloads it from the bundle. ZeRO partitions the student only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptcore import Distillation


class Teacher:
    def __init__(
        self, bundle: str, precision: str, alpha: float, temperature: float, device: torch.device
    ):
        from gptcore import load_bundle

        model, _, _ = load_bundle(bundle)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.autocast = precision == "bf16-autocast"
        self.alpha, self.temperature, self.device = alpha, temperature, device

    @torch.no_grad()
    def targets(self, x: np.ndarray) -> Distillation:
        """What the student's forward needs for input windows `x` (B, T)."""
        idx = torch.from_numpy(x).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.model.features(idx)
        return Distillation(hidden, self.model.lm_head.weight, self.alpha, self.temperature)


def loss_parts(
    kd: Distillation, batch: tuple[np.ndarray, np.ndarray, np.ndarray | None]
) -> tuple[float, float]:
    """The mean cross-entropy and KL over the batch's kept positions, after the student's
    forward."""
    _, y, m = batch
    kept = (y != -1) if m is None else (y != -1) & m.astype(bool)
    n = max(1, int(kept.sum()))
    parts: dict[str, Any] = kd.parts
    return float(parts["ce_sum"]) / n, float(parts["kl_sum"]) / n
