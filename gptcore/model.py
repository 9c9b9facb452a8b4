"""The GPT: a decoder-only transformer in the GPT-2 layout, read top to bottom.

Attention, MLP, Block, GPT, in that order, plus the KV cache used for incremental decoding.
Pre-LayerNorm blocks, causal multi-head self-attention through torch's
scaled_dot_product_attention, tanh-GELU MLP (as GPT-2), learned positions, LM head tied to the
token embedding. The model knows nothing of distribution, precision policy or tracking.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptcore.config import GPTConfig
from gptcore.distillation import Distillation, chunked_distillation_loss
from gptcore.fused_loss import chunked_cross_entropy
from gptcore.packed import Linear


class KVCache:
    """Keys and values of every layer for the positions decoded so far: kv (L, 2, B, nh, T_max, hs).

    Attention over the cache runs in the cache's dtype, which may be wider than the model's: a
    bf16 model's keys and values are exact in an fp32 cache (generation uses one on CPU, where
    attention at one query per row is several times slower in bf16 than in fp32).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.n_layer, 2, batch_size, config.n_head, max_len, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)  # keys and values side by side: one copy per step
        self.layers = [self.kv[i] for i in range(config.n_layer)]  # per-layer (2, B, nh, T_max, hs) views, made once
        self.max_len = max_len
        self.pos = 0  # positions filled; advanced by GPT.forward after all layers wrote

    @classmethod
    def over(cls, kv: torch.Tensor) -> KVCache:
        """A cache that reads and writes `kv` (L, 2, B, nh, T_max, hs) in place, e.g. a view of some
        rows of a larger cache (continuous batching prefills one request into its row this way)."""
        cache = cls.__new__(cls)
        cache.kv = kv
        cache.layers = [kv[i] for i in range(kv.size(0))]
        cache.max_len = kv.size(4)
        cache.pos = 0
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values; return all so far, (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        kv = self.layers[layer]
        kv[0, :, :, self.pos:end] = k
        kv[1, :, :, self.pos:end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """Apply `module` only where it does something: a call costs microseconds each decode step."""
    return module(x) if module.training and module.p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = Linear(config.d_model, config.d_model, bias=config.bias)
        self.c_proj.residual_scaled = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = past + T
            q = q.to(k.dtype)  # attention in the cache's dtype (see KVCache)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # causal over a fresh sequence, or one new query that sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:  # (B, 1, T, S) boolean: cached prefix, left padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C).to(dtype)  # (B, T, C); a view when T == 1
        return _dropout(self.resid_dropout, self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.dropout, self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class LMHead(Linear):
    """The output projection (tied to the token embedding). Given targets, it returns the summed
    cross-entropy instead of logits, fused and chunked (see fused_loss.py). Being this module's
    forward matters under ZeRO-3, whose hooks gather a module's weights only around its forward."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                distill: Distillation | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        if distill is None:
            return chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1))
        loss_sum, ce_sum, kl_sum = chunked_distillation_loss(
            x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1),
            distill.hidden.reshape(-1, distill.hidden.size(-1)), distill.weight, distill.alpha, distill.temperature)
        distill.parts = {"ce_sum": ce_sum, "kl_sum": kl_sum}
        return loss_sum


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # ours subclass it
            std = 0.02
            if getattr(module, "residual_scaled", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        last_logits_only: bool = False,
        distill: Distillation | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over kept positions.

        A position counts in the loss when its target is not -1 and loss_mask (B, T) is true there.
        With `cache`, idx holds only the new positions; `padding_mask` (B, S) marks real tokens
        (False = left padding) over every position so far, cached ones included.
        `return_logits=False` with targets computes the loss without materialising the logits
        (fused chunked LM head + cross-entropy: faster, far less memory) and returns (None, loss).
        `last_logits_only=True` (no targets) returns logits for the last position only, (B, 1, vocab):
        what decoding needs from a prompt, without the vocab-wide logits of every prompt position.
        `distill` (with targets; see gptcore/distillation.py): the loss is the distillation loss against
        the teacher's hidden states, fused and chunked, still the mean over kept positions; its
        cross-entropy and KL sums land in ``distill.parts``.
        """
        x = self.features(idx, cache=cache, padding_mask=padding_mask)
        if targets is None:
            if last_logits_only:
                x = x[:, -1:, :]
            return self.lm_head(x), None  # (B, T, vocab)
        if loss_mask is not None:  # masked-out positions become ignored targets
            targets = targets.masked_fill(~loss_mask.bool(), -1)
        if distill is not None:
            logits, loss_sum = None, self.lm_head(x, targets, distill)
        elif return_logits:  # under autocast cross_entropy runs in fp32
            logits = self.lm_head(x)  # (B, T, vocab)
            loss_sum = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum"
            )
        else:
            logits, loss_sum = None, self.lm_head(x, targets)
        # Sum then divide by the kept count: the mean over kept positions, and 0 (with a graph,
        # not NaN) when a batch keeps none.
        return logits, loss_sum / (targets != -1).sum().clamp(min=1)

    def features(self, idx: torch.Tensor, *, cache: KVCache | None = None,
                 padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (B, T, C), after the last LayerNorm: what the LM head reads.

        A teacher hands these (and its head weight) to a student's distillation loss; see forward
        for `cache` and `padding_mask`.
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.context_length:
            raise ValueError(f"sequence of {past + T} tokens exceeds context_length {self.config.context_length}")
        positions, mask = self._positions_and_mask(B, T, past, padding_mask, idx.device)
        x = _dropout(self.drop, self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    @staticmethod
    def _positions_and_mask(
        B: int, T: int, past: int, padding_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids (B, T) and the attention mask (B, 1, T, S), or None for plain causal."""
        if padding_mask is None:
            positions = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
            if past == 0 or T == 1:
                return positions, None
            S = past + T
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
            return positions, causal.view(1, 1, T, S)
        S = past + T
        if padding_mask.shape != (B, S):
            raise ValueError(f"padding_mask must be (B, past+T) = {(B, S)}, got {tuple(padding_mask.shape)}")
        padding_mask = padding_mask.bool()
        # Left padding shifts each row's real tokens; their positions count from the first real one.
        positions = (padding_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]  # (B, T)
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
        mask = causal.view(1, 1, T, S) & padding_mask.view(B, 1, 1, S)  # (B, 1, T, S)
        # A pad query row would attend to nothing (NaN softmax); let it see itself instead.
        own = torch.zeros(T, S, dtype=torch.bool, device=device)
        own[torch.arange(T), torch.arange(past, S)] = True
        mask = mask | (own.view(1, 1, T, S) & ~padding_mask[:, past:].view(B, 1, T, 1))
        return positions, mask
