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

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gptcore.decode import Decoder, can_decode_flat
from gptcore.model import GPT, KVCache
from gptcore.packed import pack_linears
from gptcore.sampling import SamplingParams, make_generator, may_become_stop, sample, stop_cut


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
    sampling: SamplingParams | None = None,
) -> list[int] | list[list[int]]:
    """New token ids for one prompt (list[int]) or a batch (list[list[int]]).

    temperature 0 is greedy search; otherwise sampling, optionally restricted to the top_k tokens
    and the top_p probability mass. A stop id or stop string (needs `tokenizer`) ends a row and is
    not part of its output; the cut is at token granularity (the token in which a stop string
    begins is dropped whole, text before it in that token included). `seed` makes sampling
    reproducible. The same settings may come as one `sampling=SamplingParams(...)` instead (not
    both). `pack_weights` (CPU only) keeps a oneDNN-packed copy of the large weight matrices
    for faster decoding (see packed.py); it costs that much memory again, so turn it off for a model
    that barely fits.
    """
    params = _sampling_params(
        sampling,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        seed=seed,
    )
    prompts, single = _as_batch(prompt_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _decode(model, prompts, max_new_tokens, params, tokenizer, use_cache, pack_weights):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    for row, out in enumerate(outputs):  # a stop string and what follows it are not output
        cut = stop_cut(tokenizer, out, params.stop_strings) if params.stop_strings else None
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
    sampling: SamplingParams | None = None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced; same results as generate().

    With stop strings, a token that might begin one is held back until it is clear it does not.
    """
    params = _sampling_params(
        sampling,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        seed=seed,
    )
    stops = params.stop_strings
    out: list[int] = []
    sent = 0
    for step in _decode(
        model, [list(prompt_ids)], max_new_tokens, params, tokenizer, True, pack_weights
    ):
        token = step[0]
        if token is None:
            break
        out.append(token)
        if stops:
            cut = stop_cut(tokenizer, out, stops)
            if cut is not None:
                yield from out[sent:cut]
                return
            if may_become_stop(tokenizer, out, stops):
                continue  # hold back: these tokens may become a stop string
        yield from out[sent:]
        sent = len(out)
    yield from out[sent:]


def _sampling_params(sampling: SamplingParams | None, **settings: Any) -> SamplingParams:
    """The settings given one by one as SamplingParams (checked there), or `sampling` itself."""
    loose = SamplingParams(**settings)
    if sampling is None:
        return loose
    if loose != SamplingParams():
        raise ValueError(
            "give the sampling settings either as sampling=SamplingParams(...) or one by one "
            "(temperature=..., stop_ids=...), not both"
        )
    return sampling


def _check_stop_strings(params: SamplingParams, tokenizer: Any) -> None:
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")


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
    params: SamplingParams,
    tokenizer: Any,
    use_cache: bool,
    pack_weights: bool,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has stopped).

    A row stops at a stop id (not yielded) or once its output contains a stop string (the token
    completing it is yielded; callers cut the text at the stop string).
    """
    _check_stop_strings(params, tokenizer)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    was_training = model.training
    model.eval()
    if (
        pack_weights and torch.is_inference_mode_enabled()
    ):  # not under no_grad: ZeRO-3 sampling must use the live weights
        pack_linears(model)
    forward = _Forward(model, use_cache, max_new_tokens)
    generator = make_generator(params, forward.device)
    rows = _Rows(prompts, params, tokenizer)
    try:
        for taken in range(max_new_tokens):
            logits = forward.next_logits(rows.history, taken).float()  # (B, vocab)
            step = rows.take(sample(logits, params, generator, rows.history).tolist())
            yield step
            if rows.all_done:
                return
    finally:
        model.train(was_training)


class _Forward:
    """The model run of each step: the first step (and each step once the window slides past the
    context length) encodes every row's last context_length tokens into a fresh KV cache; the
    others run one position per row, through the flat decoding step where it computes exactly what
    GPT.forward would."""

    def __init__(self, model: GPT, use_cache: bool, max_new_tokens: int):
        self.model, self.use_cache, self.max_new_tokens = model, use_cache, max_new_tokens
        self.device = next(model.parameters()).device
        self.ctx = model.config.context_length
        # Whether the flat decoding step computes what forward would (no hooks, inference mode).
        self.flat = use_cache and can_decode_flat(model)
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) real tokens; None without padding
        self.decoder: Decoder | None = None

    def next_logits(self, rows: list[list[int]], taken: int) -> torch.Tensor:
        """Each row's logits for its next token (B, vocab); `taken` tokens were generated so far."""
        cache = self.cache
        if (
            not self.use_cache
            or cache is None
            or cache.pos >= cache.max_len
            or max(map(len, rows)) > self.ctx
        ):
            return self._encode(rows, taken)
        if self.decoder is not None:
            return self.decoder(
                torch.tensor([r[-1] for r in rows], device=self.device)
            )  # (B, vocab)
        return self._extend(rows)

    def _encode(self, rows: list[list[int]], taken: int) -> torch.Tensor:
        """(Re-)encode the last ctx tokens of every row into a new cache."""
        model, ctx = self.model, self.ctx
        idx, mask = _left_pad([r[-ctx:] for r in rows], self.device)
        # No padding: the cheaper plain-causal attention path.
        self.mask = None if bool(mask.all()) else mask
        # Only as long as this generation can get: a cache of the whole context is zeroed
        # memory a long-context model pays for every call (SmolLM2's 8192 positions at batch
        # 8: 2.9 GB, seconds on this machine, for a 160-token generation).
        longest = max(len(r) for r in rows)
        room = min(
            ctx, longest + self.max_new_tokens - taken - 1
        )  # the last token picked is never stored
        self.cache = (
            KVCache(model.config, len(rows), room, self.device, _cache_dtype(model))
            if self.use_cache
            else None
        )
        logits, _ = model(idx, cache=self.cache, padding_mask=self.mask, last_logits_only=True)
        self.decoder = Decoder(model, self.cache, self.mask) if self.flat else None
        return logits[:, -1, :]

    def _extend(self, rows: list[list[int]]) -> torch.Tensor:
        """One position per row through GPT.forward (a model the flat step does not cover)."""
        last = torch.tensor([[r[-1]] for r in rows], device=self.device)  # (B, 1)
        if self.mask is not None:
            self.mask = torch.cat(
                [self.mask, torch.ones(len(rows), 1, dtype=torch.bool, device=self.device)], dim=1
            )
        return self.model(last, cache=self.cache, padding_mask=self.mask)[0][:, -1, :]


class _Rows:
    """Each row's tokens so far and whether it has stopped."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, tokenizer: Any):
        self.history = [list(p) for p in prompts]  # full token history per row, prompt included
        self.new: list[list[int]] = [[] for _ in prompts]  # generated tokens per row
        self.done = [False] * len(prompts)
        self.params, self.tokenizer = params, tokenizer

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def take(self, next_ids: list[int]) -> list[int | None]:
        """Append each row's picked token; the step to yield (None for a row that has stopped)."""
        stop_ids, stop_strings = self.params.stop_ids, self.params.stop_strings
        step: list[int | None] = []
        for i, token in enumerate(next_ids):
            self.history[i].append(token)
            if self.done[i] or token in stop_ids:
                self.done[i] = True
                step.append(None)
                continue
            step.append(token)
            self.new[i].append(token)
            if stop_strings and stop_cut(self.tokenizer, self.new[i], stop_strings) is not None:
                self.done[i] = True
        return step


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with 0 and the (B, T) mask of real tokens."""
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if r:
            idx[i, T - len(r) :] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, T - len(r) :] = True
    return idx, mask


def _cache_dtype(model: GPT) -> torch.dtype:
    """The model's dtype, except fp32 for a half-precision model on CPU: torch's CPU attention at
    one query per row measured 6x slower in bf16 than in fp32 (8 rows, 160 keys: 323 vs 51 µs), and
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
