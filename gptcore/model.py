"""The GPT: a decoder-only transformer, GPT-2 or Llama family, read top to bottom.

Norms and rotary positions, attention, MLP, Block, GPT, in that order, plus the KV cache used for
incremental decoding. Pre-norm blocks, causal self-attention through torch's
scaled_dot_product_attention. GPT-2 by default: LayerNorm, learned positions, tanh-GELU MLP, LM
head tied to the token embedding. The Llama family by the config's switches, each read where it
acts: RMSNorm, rotary positions (Hugging Face's rotate-half layout, Llama-3 scaling),
grouped-query attention, SwiGLU MLP, separate bias switches, an untied head. Parameter names are
GPT-2's for both (Llama's q/k/v live in one `c_attn`, its gate and up in one `c_fc`: one product
each). The model knows nothing of distribution, precision policy or tracking.
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
    """Keys and values of every layer for the positions decoded so far: kv (L, 2, B, nkv, T_max,
    hs), nkv the key/value heads (n_head, or fewer under grouped-query attention). Keys are stored
    after their rotary rotation, so a cached position never needs its position again.

    Attention over the cache runs in the cache's dtype, which may be wider than the model's: a
    bf16 model's keys and values are exact in an fp32 cache (generation uses one on CPU, where
    attention at one query per row is several times slower in bf16 than in fp32).
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (config.n_layer, 2, batch_size, config.kv_heads, max_len, config.head_dim)
        self.kv = torch.zeros(
            shape, device=device, dtype=dtype
        )  # keys and values side by side: one copy per step
        self.layers = [
            self.kv[i] for i in range(config.n_layer)
        ]  # per-layer (2, B, nh, T_max, hs) views, made once
        self.max_len = max_len
        self.pos = 0  # positions filled; advanced by GPT.forward after all layers wrote

    @classmethod
    def over(cls, kv: torch.Tensor) -> KVCache:
        """A cache that reads and writes `kv` (L, 2, B, nkv, T_max, hs) in place, e.g. a view of
        some rows of a larger cache (continuous batching prefills one request into its row this
        way)."""
        cache = cls.__new__(cls)
        cache.kv = kv
        cache.layers = [kv[i] for i in range(kv.size(0))]
        cache.max_len = kv.size(4)
        cache.pos = 0
        return cache

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nkv, T, hs) keys/values; return all so far, (B, nkv, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        kv = self.layers[layer]
        kv[0, :, :, self.pos : end] = k
        kv[1, :, :, self.pos : end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """Apply `module` only where it does something: a call costs microseconds each decode step."""
    return module(x) if module.training and module.p > 0 else x


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) * weight, no mean, no bias; computed in fp32 whatever the input's
    dtype, then cast back (as Hugging Face's LlamaRMSNorm, so bf16 runs match it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = F.rms_norm(x.float(), (x.size(-1),), eps=eps)
    return weight * y.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)


def rope_frequencies(config: GPTConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (hs/2,), fp32, with Llama-3's scaling when its factor is not 1:
    long wavelengths divided by the factor, short ones kept, those between interpolated smoothly
    (Hugging Face's `_compute_llama3_parameters`, step for step, so the floats agree)."""
    hs = config.head_dim
    steps = torch.arange(
        0, hs, 2, dtype=torch.int64, device="cpu"
    ).float()  # CPU even under a meta-device init
    inv_freq = 1.0 / (config.rope_theta ** (steps / hs))
    factor = config.rope_scaling_factor
    if factor == 1.0:
        return inv_freq
    low, high, old = (
        config.rope_low_freq_factor,
        config.rope_high_freq_factor,
        config.rope_original_context,
    )
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (*positions.shape, hs) for integer positions (any shape), in `dtype`."""
    freqs = positions[..., None].float() * inv_freq  # (..., hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., hs): rotate-half pairs i with i + hs/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hs) by its positions' angles: x*cos + rotate_half(x)*sin, rotate_half(x) =
    cat(-x2, x1) (Hugging Face's layout; the interleaved-pair layout would need permuted
    weights)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv = (
            self.n_head + 2 * self.n_kv_head
        ) * self.head_dim  # q, then k and v (fewer heads under GQA)
        self.c_attn = Linear(config.d_model, qkv, bias=config.linear_attn_bias)
        self.c_proj = Linear(config.d_model, config.d_model, bias=config.linear_attn_bias)
        self.c_proj.residual_scaled = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        q, k, v = qkv.split((nh, nkv, nkv), dim=1)  # (B, nh, T, hs), (B, nkv, T, hs) twice
        if rope is not None:  # rotary positions: cos, sin (B, 1, T, hs)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hs), S = past + T
            q = q.to(k.dtype)  # attention in the cache's dtype (see KVCache)
        dropout = self.dropout if self.training else 0.0
        gqa = (
            nkv != nh
        )  # each group of nh / nkv query heads shares a key/value head (HF's repeat_kv)
        if mask is None:  # causal over a fresh sequence, or one new query that sees every key
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=T > 1, enable_gqa=gqa
            )
        else:  # (B, 1, T, S) boolean: cached prefix, left padding
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa
            )
        y = y.transpose(1, 2).reshape(B, T, C).to(dtype)  # (B, T, C); a view when T == 1
        return _dropout(self.resid_dropout, self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.ffn_hidden
        # SwiGLU's gate and up projections are one matrix, gate rows first: one product.
        self.c_fc = Linear(
            config.d_model, 2 * hidden if self.swiglu else hidden, bias=config.linear_mlp_bias
        )
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Linear(hidden, config.d_model, bias=config.linear_mlp_bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return _dropout(self.dropout, self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class LMHead(Linear):
    """The output projection (tied to the token embedding unless the config unties it). Given
    targets, it returns the summed cross-entropy instead of logits, fused and chunked (see
    fused_loss.py). Being this module's forward matters under ZeRO-3, whose hooks gather a module's
    weights only around its forward."""

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        distill: Distillation | None = None,
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        if distill is None:
            return chunked_cross_entropy(
                x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1)
            )
        loss_sum, ce_sum, kl_sum = chunked_distillation_loss(
            x.reshape(-1, x.size(-1)),
            self.weight,
            targets.reshape(-1),
            distill.hidden.reshape(-1, distill.hidden.size(-1)),
            distill.weight,
            distill.alpha,
            distill.temperature,
        )
        distill.parts = {"ce_sum": ce_sum, "kl_sum": kl_sum}
        return loss_sum


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.context_length, config.d_model)
        else:
            # rotary: no parameters; the frequencies are a plain fp32 tensor, so a bf16 cast leaves
            # them exact
            self.wpe = None
            self.rope_freq = rope_frequencies(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
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

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin (*positions.shape, hs) for these positions."""
        if self.rope_freq.device != positions.device:
            self.rope_freq = self.rope_freq.to(positions.device)
        return rope_tables(self.rope_freq, positions, dtype)

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
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy over kept
        positions.

        A position counts in the loss when its target is not -1 and loss_mask (B, T) is true there.
        With `cache`, idx holds only the new positions; `padding_mask` (B, S) marks real tokens
        (False = left padding) over every position so far, cached ones included.
        `return_logits=False` with targets computes the loss without materialising the logits
        (fused chunked LM head + cross-entropy: faster, far less memory) and returns (None, loss).
        `last_logits_only=True` (no targets) returns logits for the last position only, (B, 1,
        vocab): what decoding needs from a prompt, without the vocab-wide logits of every prompt
        position.
        `distill` (with targets; see gptcore/distillation.py): the loss is the distillation loss
        against the teacher's hidden states, fused and chunked, still the mean over kept positions;
        its cross-entropy and KL sums land in ``distill.parts``.
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
                logits.view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=-1,
                reduction="sum",
            )
        else:
            logits, loss_sum = None, self.lm_head(x, targets)
        # Sum then divide by the kept count: the mean over kept positions, and 0 (with a graph,
        # not NaN) when a batch keeps none.
        return logits, loss_sum / (targets != -1).sum().clamp(min=1)

    def features(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, C), after the last norm: what the LM head reads.

        A teacher hands these (and its head weight) to a student's distillation loss; see forward
        for `cache` and `padding_mask`.
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.context_length:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds context_length {self.config.context_length}"
            )
        positions, mask = self._positions_and_mask(B, T, past, padding_mask, idx.device)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:  # each row's own positions (left padding shifts them), as cos, sin (B, 1, T, hs)
            dtype = (
                torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type)
                else x.dtype
            )
            rope = tuple(t.unsqueeze(1) for t in self.rope(positions, dtype))
        x = _dropout(self.drop, x)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, None, rope, use_reentrant=False)
            else:
                x = block(x, mask, cache, rope)
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
            raise ValueError(
                f"padding_mask must be (B, past+T) = {(B, S)}, got {tuple(padding_mask.shape)}"
            )
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
