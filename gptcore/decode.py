"""The decoding step: one new position per row through a GPT, written as flat functional code.

GPT.forward is the model's definition; it serves training, prompts (prefill) and every caller that
relies on module hooks. Decoding calls the model once per generated token with a single position
per row, and on CPU that call costs more in per-op and per-module overhead (a hundred-odd small ops
and forty module calls, microseconds each) than in arithmetic for models up to a few tens of
millions of parameters. This step computes the same function from the same parameters with fewer
ops and no module calls: parameters looked up once per generation, no dropout checks, no position
or mask tensors built per step, this position's keys and values written to the cache in one copy,
and the residual adds and the GELU fused into the oneDNN-packed products (packed.py). Both families
run through it: the norm, the positions (a learned row added, or each row's rotary angles applied to
its query and key), grouped-query attention and the MLP follow the config as GPT.forward does.
Measured per generated token against GPT.forward with the same cache and packing: 1.2-1.7x faster
for 4-layer models of width 64-256, 1.05x for GPT-2 124M, where streaming the weights dominates.
Tests hold it to GPT.forward: same logits within 1e-5, padded batches, with and without packing.

It is not a second model: it has no parameters, no training path and no options. Generation uses
it only under inference mode and only for a plain GPT (not a subclass) without hooks: ZeRO-3
gathers weights in module hooks (training-time sampling runs under no_grad), and a hook a user
registered must see its call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from gptcore.model import GPT, KVCache, rms_norm
from gptcore.packed import PackedWeight, linear


def can_decode_flat(model: torch.nn.Module) -> bool:
    """Whether :class:`Decoder` computes exactly what `model`'s forward would."""
    if type(model) is not GPT or model.training or not torch.is_inference_mode_enabled():
        return False
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(
        nn_module, "_global_forward_pre_hooks", None
    ):
        # hooks registered for every module (torch.nn.modules.module.register_module_forward_hook)
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Dense(NamedTuple):
    """A linear layer's tensors, read once per generation instead of through module attributes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: PackedWeight | None


def _dense(module: torch.nn.Linear) -> _Dense:
    return _Dense(module.weight, module.bias, getattr(module, "packed", None))


class _Weights:
    """A GPT's parameters as plain tensors, looked up once per generation (not per step)."""

    def __init__(self, model: GPT):
        cfg = model.config
        self.model = model
        self.dims = (cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_eps)
        self.rms = cfg.norm == "rmsnorm"
        self.swiglu = cfg.mlp == "swiglu"
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None  # None: rotary positions
        self.blocks = [
            (
                b.ln_1.weight,
                getattr(b.ln_1, "bias", None),
                _dense(b.attn.c_attn),
                _dense(b.attn.c_proj),
                b.ln_2.weight,
                getattr(b.ln_2, "bias", None),
                _dense(b.mlp.c_fc),
                _dense(b.mlp.c_proj),
            )
            for b in model.blocks
        ]  # an RMSNorm has no bias
        self.ln_f = (model.ln_f.weight, getattr(model.ln_f, "bias", None))
        self.lm_head = _dense(model.lm_head)

    def embed(
        self, ids: torch.Tensor, positions: torch.Tensor | int
    ) -> tuple[torch.Tensor, tuple | None]:
        """The newest tokens' embeddings (B, C) and, for rotary positions, cos and sin (B or 1, 1,
        hs) at `positions` (B,) or one position for every row."""
        x = F.embedding(ids, self.wte)  # (B, C)
        if self.wpe is not None:
            return x + (
                self.wpe[positions]
                if isinstance(positions, int)
                else F.embedding(positions, self.wpe)
            ), None
        pos = (
            torch.tensor([positions], device=ids.device)
            if isinstance(positions, int)
            else positions
        )
        cos, sin = self.model.rope(pos, x.dtype)  # (B or 1, hs)
        return x, (cos[:, None], sin[:, None])

    def norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        eps = self.dims[-1]
        return (
            rms_norm(x, weight, eps)
            if self.rms
            else F.layer_norm(x, (x.size(-1),), weight, bias, eps)
        )

    def run(
        self,
        x: torch.Tensor,
        rope: tuple | None,
        layers: list[torch.Tensor],
        store: Callable,
        S: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits (B, vocab) for the embedded newest positions x (B, C), rotated by `rope` if given.

        Per layer, `store(kv, new)` writes this position's keys and values new (B, 2, nkv, hs) into
        that layer's cache kv (2, B_cache, nkv, T_max, hs); attention then reads the first S cached
        positions of the first B rows, under `mask` (B, 1, 1, S) or none.
        """
        B, (C, nh, nkv, hs, _) = x.size(0), self.dims
        group = nh // nkv
        for block, kv in zip(self.blocks, layers, strict=True):
            ln1_w, ln1_b, c_attn, attn_proj, ln2_w, ln2_b, c_fc, mlp_proj = block
            h = self.norm(x, ln1_w, ln1_b)
            qkv = linear(c_attn, h).view(B, nh + 2 * nkv, hs)
            if rope is not None:  # rotate the query and key heads in place (qkv is this step's own)
                qk = qkv[:, : nh + nkv]
                x1, x2 = qk.chunk(2, dim=-1)
                qk.copy_(qk * rope[0] + torch.cat((-x2, x1), dim=-1) * rope[1])
            store(kv, qkv[:, nh:].view(B, 2, nkv, hs))
            k, v = kv[:, :B].narrow(3, 0, S)  # (B, nkv, S, hs) each
            # A group's query heads attend to the same keys: as `group` queries of one head (B, nkv,
            # group, hs).
            q = qkv[:, :nh].view(B, nkv, group, hs)
            q = q if q.dtype == kv.dtype else q.to(kv.dtype)  # attention in the cache's dtype
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, C)
            x = linear(attn_proj, y if y.dtype == qkv.dtype else y.to(qkv.dtype), residual=x)
            h = self.norm(x, ln2_w, ln2_b)
            if self.swiglu:
                gate, up = linear(c_fc, h).chunk(2, dim=-1)
                x = linear(mlp_proj, F.silu(gate) * up, residual=x)
            else:
                x = linear(mlp_proj, linear(c_fc, h, gelu=True), residual=x)
        return linear(self.lm_head, self.norm(x, *self.ln_f))


class Decoder:
    """Runs the newest token of each row through `model`, reading and extending `cache`.

    Made after the prompt filled `cache`, for one generation; `padding_mask` (B, S) is the prompt's
    mask of real tokens (False = left padding), or None when no row is padded.
    """

    def __init__(self, model: GPT, cache: KVCache, padding_mask: torch.Tensor | None):
        self.cache = cache
        self.weights = _Weights(model)
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        if padding_mask is not None:
            B, S = padding_mask.shape
            self.mask = torch.ones(B, cache.max_len, dtype=torch.bool, device=padding_mask.device)
            self.mask[:, :S] = padding_mask
            self.positions = padding_mask.sum(
                dim=1
            )  # (B,) a row's next position: its real-token count

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, vocab) given each row's newest token id, ids (B,)."""
        cache, w = self.cache, self.weights
        pos = cache.pos
        if pos >= cache.max_len:
            raise ValueError(f"KV cache overflow: {pos + 1} positions > max_len {cache.max_len}")
        if self.positions is None:
            x, rope = w.embed(ids, pos)
            mask = None
        else:
            x, rope = w.embed(ids, self.positions)
            self.positions += 1
            mask = self.mask[:, None, None, : pos + 1]  # (B, 1, 1, S)

        def store(kv: torch.Tensor, new: torch.Tensor) -> None:  # every row at column pos: one copy
            kv.select(3, pos).copy_(new.transpose(0, 1))

        logits = w.run(x, rope, cache.layers, store, pos + 1, mask)
        cache.pos = pos + 1
        return logits


class RaggedDecoder:
    """The decoding step for rows at different positions (continuous batching, batching.py).

    Row i of the batch is row i of the cache; its newest token sits at position positions[i], its
    keys and values go to that column of its own row, and it attends to its own positions
    0..positions[i] only. Rows beyond the batch size are left alone.
    """

    def __init__(self, model: GPT, cache: KVCache):
        self.cache = cache
        self.weights = _Weights(model)
        self.columns = torch.arange(cache.max_len, device=cache.kv.device)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, vocab) for newest token ids (B,) at positions (B,), long."""
        w, B = self.weights, ids.size(0)
        S = int(positions.max()) + 1
        if S > self.cache.max_len:
            raise ValueError(f"KV cache overflow: {S} positions > max_len {self.cache.max_len}")
        x, rope = w.embed(ids, positions)  # (B, C), rotary angles per row
        mask = (self.columns[:S] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, S)
        rows = self.columns[:B]

        def store(kv: torch.Tensor, new: torch.Tensor) -> None:
            kv[:, rows, :, positions] = new  # kv[:, rows[i], :, positions[i]] = new[i]

        return w.run(x, rope, self.cache.layers, store, S, mask)
