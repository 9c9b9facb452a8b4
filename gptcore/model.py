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


class KVCache:
    """Keys and values of every layer for the positions decoded so far: (L, B, nh, T_max, hs)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # positions filled; advanced by GPT.forward after all layers wrote

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values; return all so far, (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.c_proj.residual_scaled = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = past + T
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # causal over a fresh sequence, or one new query that sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:  # (B, 1, T, S) boolean: cached prefix, left padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


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


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over kept positions.

        A position counts in the loss when its target is not -1 and loss_mask (B, T) is true there.
        With `cache`, idx holds only the new positions; `padding_mask` (B, S) marks real tokens
        (False = left padding) over every position so far, cached ones included.
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.context_length:
            raise ValueError(f"sequence of {past + T} tokens exceeds context_length {self.config.context_length}")
        positions, mask = self._positions_and_mask(B, T, past, padding_mask, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        if loss_mask is not None:  # masked-out positions become ignored targets
            targets = targets.masked_fill(~loss_mask.bool(), -1)
        # Sum then divide by the kept count: the mean over kept positions, and 0 (with a graph,
        # not NaN) when a batch keeps none. Under autocast cross_entropy runs in fp32.
        loss_sum = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum"
        )
        loss = loss_sum / (targets != -1).sum().clamp(min=1)
        return logits, loss

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
