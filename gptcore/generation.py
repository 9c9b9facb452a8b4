"""Text generation: greedy search by default; sampling, stop conditions, batching and streaming.

One decoding loop (:func:`_decode`) serves :func:`generate` (all tokens at the end) and
:func:`generate_stream` (tokens as they come). It runs the model with a KV cache: the prompt
is processed once, then one position per step. Prompts of different lengths in a batch are left
padded with a padding mask, so each row decodes exactly as it would alone. Past the context
length the window slides: the last `context_length` tokens are re-encoded each step, which is
what a model without a cache would see too. After the prompt, each step runs through the flat
decoding step of decode.py where it computes exactly what GPT.forward would (inference mode, no
hooks), else through GPT.forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gptcore.decode import Decoder, can_decode_flat
from gptcore.model import GPT, KVCache
from gptcore.packed import pack_linears

MAX_STOP_CHARS = 256
"""Longest stop string a serving engine accepts: holding back a possible stop string costs up to its
length squared in character comparisons per decode step."""


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    seed: int | None = None,
    use_cache: bool = True,
    pack_weights: bool = True,
) -> list[int] | list[list[int]]:
    """New token ids for one prompt (list[int]) or a batch (list[list[int]]).

    temperature 0 is greedy search; otherwise sampling, optionally restricted to the top_k tokens
    and the top_p probability mass. A stop id or stop string (needs `tokenizer`) ends a row and is
    not part of its output; the cut is at token granularity (the token in which a stop string
    begins is dropped whole, text before it in that token included). `seed` makes sampling
    reproducible. `pack_weights` (CPU only) keeps a oneDNN-packed copy of the large weight matrices
    for faster decoding (see packed.py); it costs that much memory again, so turn it off for a model
    that barely fits.
    """
    prompts, single = _as_batch(prompt_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _decode(model, prompts, max_new_tokens, temperature, top_k, top_p,
                        repetition_penalty, stop_ids, stop_strings, tokenizer, seed, use_cache, pack_weights):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    for row, out in enumerate(outputs):  # a stop string and what follows it are not output
        cut = _stop_cut(tokenizer, out, stop_strings) if stop_strings else None
        if cut is not None:
            outputs[row] = out[:cut]
    return outputs[0] if single else outputs


def generate_stream(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    seed: int | None = None,
    pack_weights: bool = True,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced; same results as generate().

    With stop strings, a token that might begin one is held back until it is clear it does not.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    out: list[int] = []
    sent = 0
    for step in _decode(model, [list(prompt_ids)], max_new_tokens, temperature, top_k, top_p,
                        repetition_penalty, stop_ids, stop_strings, tokenizer, seed, True, pack_weights):
        token = step[0]
        if token is None:
            break
        out.append(token)
        if stop_strings:
            cut = _stop_cut(tokenizer, out, stop_strings)
            if cut is not None:
                yield from out[sent:cut]
                return
            text = tokenizer.decode(out)
            if any(_ends_with_prefix(text, s) for s in stop_strings):
                continue  # hold back: these tokens may become a stop string
        yield from out[sent:]
        sent = len(out)
    yield from out[sent:]


# --------------------------------------------------------------------------- the decoding loop


def _decode(*args: Any) -> Iterator[list[int | None]]:
    """The decoding loop under inference mode (fastest), or under no_grad when the caller already
    turned gradients off: training-time sampling does, because under ZeRO-3 weights gathered in
    inference mode would become inference tensors that the next backward cannot use."""
    mode = torch.no_grad() if not torch.is_grad_enabled() else torch.inference_mode()
    # As a decorator, torch applies the mode only while the generator runs, not while it is
    # suspended at a yield (a `with` here would leak it into a streaming caller's code).
    return mode(_decode_steps)(*args)


def _decode_steps(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stop_ids: Sequence[int],
    stop_strings: Sequence[str],
    tokenizer: Any,
    seed: int | None,
    use_cache: bool,
    pack_weights: bool,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has stopped).

    A row stops at a stop id (not yielded) or once its output contains a stop string (the token
    completing it is yielded; callers cut the text at the stop string).
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    if pack_weights and torch.is_inference_mode_enabled():  # not under no_grad: ZeRO-3 sampling must use the live weights
        pack_linears(model)
    device = next(model.parameters()).device
    ctx = model.config.context_length
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(stop_ids)
    rows = [list(p) for p in prompts]  # full token history per row, prompt included
    new: list[list[int]] = [[] for _ in prompts]  # generated tokens per row
    done = [False] * len(rows)
    cache: KVCache | None = None
    mask: torch.Tensor | None = None
    flat = use_cache and can_decode_flat(model)  # whether the flat decoding step computes what forward would
    decoder: Decoder | None = None
    try:
        for taken in range(max_new_tokens):
            longest = max(len(r) for r in rows)
            if not use_cache or cache is None or cache.pos >= cache.max_len or longest > ctx:
                # (Re-)encode the last ctx tokens of every row: the first step, and each step
                # once the window slides past the context length.
                idx, mask = _left_pad([r[-ctx:] for r in rows], device)
                if bool(mask.all()):
                    mask = None  # no padding: the cheaper plain-causal attention path
                # Only as long as this generation can get: a cache of the whole context is zeroed
                # memory a long-context model pays for every call (SmolLM2's 8192 positions at batch
                # 8: 2.9 GB, seconds on this machine, for a 160-token generation).
                room = min(ctx, longest + max_new_tokens - taken - 1)  # the last token picked is never stored
                cache = KVCache(model.config, len(rows), room, device, _cache_dtype(model)) if use_cache else None
                logits, _ = model(idx, cache=cache, padding_mask=mask, last_logits_only=True)
                logits = logits[:, -1, :]
                decoder = Decoder(model, cache, mask) if flat else None
            elif decoder is not None:
                logits = decoder(torch.tensor([r[-1] for r in rows], device=device))  # (B, vocab)
            else:
                last = torch.tensor([[r[-1]] for r in rows], device=device)  # (B, 1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], dim=1)
                logits = model(last, cache=cache, padding_mask=mask)[0][:, -1, :]
            logits = logits.float()  # (B, vocab)
            if repetition_penalty != 1.0:
                logits = _penalize_repeats(logits, rows, repetition_penalty)
            next_ids = _pick(logits, temperature, top_k, top_p, generator).tolist()
            step: list[int | None] = []
            for i, token in enumerate(next_ids):
                rows[i].append(token)
                if done[i] or token in stop:
                    done[i] = True
                    step.append(None)
                    continue
                step.append(token)
                new[i].append(token)
                if stop_strings and _stop_cut(tokenizer, new[i], stop_strings) is not None:
                    done[i] = True
            yield step
            if all(done):
                return
    finally:
        model.train(was_training)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float = 1.0) -> None:
    """Refuse sampling settings outside their range rather than quietly ignore them (a top_p of 1.5
    or a top_k of 0 used to mean "no filter", a NaN temperature sampled garbage)."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy search)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (omit it for no top-k filter)")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (omit it for no nucleus filter)")
    if not (isinstance(repetition_penalty, int | float) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a finite number > 0 (1 is none)")


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with 0 and the (B, T) mask of real tokens."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if r:
            idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, T - len(r):] = True
    return idx, mask


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample from the filtered distribution."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _penalize_repeats(logits: torch.Tensor, rows: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row (divide positive, multiply negative)."""
    logits = logits.clone()
    for i, r in enumerate(rows):
        seen = torch.tensor(sorted(set(r)), dtype=torch.long, device=logits.device)
        if seen.numel() == 0:
            continue
        vals = logits[i, seen]
        logits[i, seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _cache_dtype(model: GPT) -> torch.dtype:
    """The model's dtype, except fp32 for a half-precision model on CPU: torch's CPU attention at one
    query per row measured 6x slower in bf16 than in fp32 (8 rows, 160 keys: 323 vs 51 µs), and
    half-precision keys and values are exact in fp32."""
    weight = next(model.parameters())
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight.dtype


def _as_batch(prompt_ids: Any) -> tuple[list[list[int]], bool]:
    if hasattr(prompt_ids, "tolist"):  # torch tensors and numpy arrays
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    if prompt_ids and (isinstance(prompt_ids[0], Sequence) or hasattr(prompt_ids[0], "__len__")):
        batch = [[int(t) for t in (p.tolist() if hasattr(p, "tolist") else p)] for p in prompt_ids]
        single = False
    else:
        batch, single = [[int(t) for t in prompt_ids]], True
    if any(len(p) == 0 for p in batch):
        raise ValueError("a prompt is empty: give at least one token (e.g. the end-of-text id)")
    return batch, single


def _stop_cut(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> int | None:
    """Tokens to keep if the decoded text contains a stop string (up to where it starts), else None."""
    text = tokenizer.decode(ids)
    starts = [text.find(s) for s in stop_strings if s and s in text]
    if not starts:
        return None
    first = min(starts)
    keep = len(ids)
    while keep > 0 and len(tokenizer.decode(ids[:keep])) > first:
        keep -= 1
    return keep


def _ends_with_prefix(text: str, stop: str) -> bool:
    """Whether text ends with a proper prefix of `stop` (the start of a stop string may be coming).

    Only prefixes that fit in the text are tried, and only against the text's last len(stop) - 1
    characters: the cost per call is bounded by len(stop) squared, whatever the text's length (it
    used to build every prefix of the stop string on every decode step, which a stop string of
    240 K characters turned into seconds per step for every client of a server)."""
    tail = text[-(len(stop) - 1):] if len(stop) > 1 else ""
    return any(stop.startswith(tail[i:]) for i in range(len(tail)))
