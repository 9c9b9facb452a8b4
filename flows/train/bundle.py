"""The model bundle a training run ends with, written from the DeepSpeed engine (worker side).

What it is: :func:`export_bundle`, which the training loop (flows/train/loop.py) calls on every rank
at the end: the gathers it needs are collectives under ZeRO, and rank 0 writes the bundle. With
LoRA the adapters are merged into the init model's own weights first: the bundle is a plain model.

What it is not: the resume checkpoint (flows/train/checkpoint.py: DeepSpeed's state of every rank,
training only), nor the bundle format itself (gptcore/bundle.py).
"""

from __future__ import annotations

from typing import Any

from flows.config import to_dict
from flows.train.prepare import RunSpec


def export_bundle(
    engine: Any, tokenizer: Any, spec: RunSpec, rank: int, metadata: dict[str, Any]
) -> None:
    """Rank 0 writes the bundle; under ZeRO-3 all ranks must join the parameter gather first."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gptcore import GPT, GPTConfig, save_bundle

    tc = spec.train
    if tc.lora.r:
        _export_merged(engine, tokenizer, spec, rank, metadata)
        return
    state = None
    if tc.precision in ("bf16", "fp16"):
        # The fp32 master weights, not their bf16/fp16 rounding. Each call is a collective under
        # ZeRO (a gather or all-reduce of that parameter's shards), so every rank makes them all.
        full = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
        if all(v is not None for v in full.values()):
            state = full
    if state is None and tc.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    elif state is None:
        state = engine.module.state_dict()
    if rank != 0:
        return
    model = GPT(GPTConfig.from_dict(engine.module.config.to_dict()))
    sd = {k: v.detach().float().cpu() for k, v in state.items()}
    sd.setdefault("lm_head.weight", sd["wte.weight"])  # tied; a gather may list it only once
    model.load_state_dict(sd)
    save_bundle(spec.output_dir, model, tokenizer, metadata)


def _export_merged(
    engine: Any, tokenizer: Any, spec: RunSpec, rank: int, metadata: dict[str, Any]
) -> None:
    """LoRA: the adapters (their fp32 master copies under bf16/fp16) merged into the init bundle's
    own fp32 weights, which stayed frozen -- not their bf16 rounding in the engine. A plain bundle
    of the base's size. Every rank joins the gathers (collectives under ZeRO); rank 0 writes."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gptcore import GPT, GPTConfig, load_bundle, save_bundle
    from gptcore.lora import merge_state_dict

    tc = spec.train
    adapters = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p) if tc.precision in ("bf16", "fp16") else None
            adapters[name] = (full if full is not None else p).detach().float().cpu()
    if rank != 0:
        return
    base, _, _ = load_bundle(spec.init_bundle)
    state = merge_state_dict({**base.state_dict(), **adapters}, tc.lora.r, tc.lora.alpha)
    model = GPT(
        GPTConfig.from_dict(engine.module.config.to_dict())
    )  # the run's dropout, as for full training
    model.load_state_dict(state)
    save_bundle(spec.output_dir, model, tokenizer, metadata | {"lora": to_dict(tc.lora)})
