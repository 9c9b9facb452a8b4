"""The DeepSpeed engine a training worker runs, and the gate that can skip one update.

What it is: :func:`init_engine` (``deepspeed.initialize`` over a gptcore model with the driver's
DeepSpeed config, torch's AdamW as the client optimizer) and :class:`UpdateGate`, through which the
training loop (flows/train/loop.py) skips an update on every rank at once without leaving
DeepSpeed's step. What it is not: the DeepSpeed config (flows/train/ds_config.py, generated on the
driver).
"""

from __future__ import annotations

from typing import Any

import torch

from flows.config import TrainConfig


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear layers, embeddings), none on biases and
    LayerNorms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class UpdateGate:
    """Makes the innermost optimizer's ``step()`` a no-op while ``skip`` is set.

    Why here and not around ``engine.step()``: the engine step also ends the gradient-accumulation
    boundary (ZeRO bucket and gradient resets, ``zero_grad``, step counters, the lr schedule), which
    must happen on every rank at every step. Only the base optimizer's update is skipped, so the
    weights *and* the Adam state (moments, step count) stay exactly as they were. Under ZeRO the
    wrapper still copies its fp32 partition back into the model parameters afterwards; the partition
    did not change, so neither do the weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        self._step = optimizer.step
        optimizer.step = self._gated  # an instance attribute wins over the class's (hooked) step

    def _gated(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.skip else self._step(*args, **kwargs)


def init_engine(tc: TrainConfig, ds_config: dict[str, Any], model: torch.nn.Module):
    """The DeepSpeed engine and the gate that can skip one update of its base optimizer."""
    import deepspeed

    from flows.train.op_build import clear_stale_build_locks

    clear_stale_build_locks()  # else a lock left by a killed build hangs deepspeed.initialize
    groups = _param_groups(model, tc.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        # torch's AdamW as the client optimizer: no JIT-compiled DeepSpeed op on CPU (see
        # STACK-NOTES), fused kernels on GPU. DeepSpeed wraps it for ZeRO and drives the schedule
        # from its config.
        kwargs: dict[str, Any] = {"lr": tc.lr, "betas": (tc.beta1, tc.beta2), "eps": 1e-8}
        if tc.use_gpu:
            kwargs["fused"] = True
        optimizer = torch.optim.AdamW(groups, **kwargs)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        config=ds_config,
        dist_init_required=False,
    )
    # basic_optimizer: the client AdamW, or DeepSpeed's own (CPU Adam) with offload; ZeRO and bf16
    # wrappers call its step() by attribute lookup, so the gate sees every update.
    return engine, UpdateGate(engine.basic_optimizer)
