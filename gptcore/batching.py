"""Continuous batching: one decoding loop over a batch of sequences that changes every step.

Static batching (``generate`` on a list of prompts, or Ray Serve's ``@serve.batch``) starts a batch
together and holds it until its longest member ends. Here, as in vLLM and TGI, the schedule is per
iteration: each :meth:`BatchEngine.step` admits waiting requests (each prompt prefilled alone into
its own row of the KV cache, yielding its first token), then advances every running sequence by one
token in a single batched call, each row at its own position (decode.RaggedDecoder). A sequence
that stops (stop id, stop string, length, cancelled) leaves at once and frees its row for the next
request; rows stay packed at the front of the cache, so attention reads one contiguous block.

Admission is bounded by `max_batch_size` rows and a token budget (the sum over running sequences
of prompt + max_new_tokens, i.e. the KV cache positions they may come to need). Under greedy search
each sequence's output equals ``generate`` for it alone; with a seed, so do its samples (each
sequence draws from its own generator). No Ray here: the serving deployment drives the engine from
a thread (flows/serve/runner.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from gptcore.decode import RaggedDecoder, can_decode_flat
from gptcore.generation import (
    MAX_STOP_CHARS,
    _cache_dtype,
    _ends_with_prefix,
    _pick,
    _stop_cut,
    check_sampling,
)
from gptcore.model import GPT, KVCache
from gptcore.packed import pack_linears


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: its prompt ids and how to decode it."""

    id: Hashable
    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """Also return, per generated token, its log-probability and the `logprobs` most likely ones."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SequenceOutput:
    """What one step released for one sequence: new tokens (held-back ones once clear of any stop
    string) and, on its last output, why it finished ("stop", "length" or "cancelled")."""

    id: Hashable
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Running:
    request: SequenceRequest
    generator: torch.Generator | None
    length: int  # positions in its cache row
    last: int = -1  # newest token, not yet run through the model
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    released: int = 0


class BatchEngine:
    """Iteration-level scheduler over `model`; `submit` and `cancel` may be called from any thread,
    `step` from one thread only."""

    def __init__(self, model: GPT, *, max_batch_size: int = 16, max_batch_tokens: int | None = None,
                 tokenizer: object | None = None, pack_weights: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens or max_batch_size * self.context_length
        if self.max_batch_tokens < 2:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} leaves no room for a sequence")
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            if not can_decode_flat(self.model):
                raise ValueError("continuous batching needs a plain GPT without module hooks (its decoding "
                                 "step computes what GPT.forward would only then)")
            if pack_weights:
                pack_linears(model)
            self.cache = KVCache(model.config, max_batch_size, self.context_length, self.device,
                                 _cache_dtype(model))
            self.decoder = RaggedDecoder(model, self.cache)
        self._lock = threading.Lock()
        self._waiting: deque[SequenceRequest] = deque()
        self._cancelled: set[Hashable] = set()
        self._running: list[_Running] = []  # row i of the cache is _running[i]

    # ----------------------------------------------------------------- from any thread

    def submit(self, request: SequenceRequest) -> None:
        """Queue a sequence; it joins the batch at a coming step. Bad settings raise ValueError now."""
        if not request.prompt:
            raise ValueError("a prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
        if len(request.prompt) + request.max_new_tokens > self.context_length:
            raise ValueError(f"{len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                             f"the context length of {self.context_length}")
        if len(request.prompt) + request.max_new_tokens > self.max_batch_tokens:
            raise ValueError(f"{len(request.prompt) + request.max_new_tokens} tokens exceed the batch token "
                             f"budget of {self.max_batch_tokens}")
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        if any(len(s) > MAX_STOP_CHARS for s in request.stop_strings):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ValueError(f"a prompt token id is outside the vocabulary [0, {vocab})")
        check_sampling(request.temperature, request.top_k, request.top_p)
        with self._lock:
            self._waiting.append(request)

    def cancel(self, request_id: Hashable) -> None:
        """Stop a sequence (its client went away); it leaves the batch at the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def abort(self) -> None:
        """Drop every sequence, running or waiting (after a failed step: the cache rows are suspect)."""
        with self._lock:
            self._waiting.clear()
            self._cancelled.clear()
        self._running.clear()

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # ----------------------------------------------------------------- from the loop's thread

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """Advance every running sequence by one token and admit what fits; what each released."""
        outputs: list[SequenceOutput] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                kept = deque()
                for r in self._waiting:
                    if r.id in cancelled:
                        outputs.append(SequenceOutput(r.id, [], None, "cancelled", len(r.prompt), 0))
                    else:
                        kept.append(r)
                self._waiting = kept
        for row in reversed(range(len(self._running))):
            if self._running[row].request.id in cancelled:
                outputs.append(self._finish(row, "cancelled"))
        finished: list[tuple[int, str]] = []
        if self._running:
            ids = torch.tensor([s.last for s in self._running], device=self.device)
            positions = torch.tensor([s.length for s in self._running], device=self.device)
            logits = self.decoder(ids, positions).float()
            greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row
            for row, seq in enumerate(self._running):
                seq.length += 1
                token = greedy[row] if seq.request.temperature == 0 else None
                reason = self._accept(seq, logits[row:row + 1], outputs, token)
                if reason:
                    finished.append((row, reason))
        for row, reason in reversed(finished):  # from the back: a row's removal moves the last one in
            outputs.append(self._finish(row, reason))
        for request in self._admit():
            outputs.extend(self._prefill(request))
        return outputs

    def _admit(self) -> list[SequenceRequest]:
        budget = self.max_batch_tokens - sum(len(s.request.prompt) + s.request.max_new_tokens for s in self._running)
        admitted: list[SequenceRequest] = []
        with self._lock:
            while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
                need = len(self._waiting[0].prompt) + self._waiting[0].max_new_tokens
                if need > budget:
                    break  # first come, first served: a big request is not overtaken forever
                budget -= need
                admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, request: SequenceRequest) -> list[SequenceOutput]:
        """Run a new sequence's prompt into the next free cache row; its first token."""
        row = len(self._running)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        seq = _Running(request, generator, length=len(request.prompt))
        self._running.append(seq)
        cache = KVCache.over(self.cache.kv[:, :, row:row + 1])
        idx = torch.tensor([request.prompt], device=self.device)
        logits = self.model(idx, cache=cache, last_logits_only=True)[0][:, -1, :].float()
        outputs: list[SequenceOutput] = []
        reason = self._accept(seq, logits, outputs)
        if reason:
            outputs.append(self._finish(row, reason))
        return outputs

    def _accept(self, seq: _Running, logits: torch.Tensor, outputs: list[SequenceOutput],
                token: int | None = None) -> str | None:
        """Pick `seq`'s next token from logits (1, vocab) unless given (greedy, picked for the whole
        batch at once); release what is safe; why the sequence ends, if it does."""
        r = seq.request
        if token is None:
            token = int(_pick(logits, r.temperature, r.top_k, r.top_p, seq.generator)[0])
        if token in r.stop_ids:
            return "stop"
        seq.last = token
        seq.out.append(token)
        if r.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            top = torch.topk(lp, r.logprobs) if r.logprobs else None
            seq.logprobs.append(TokenLogprob(token, float(lp[token]), [] if top is None else
                                             list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
        if r.stop_strings:
            cut = _stop_cut(self.tokenizer, seq.out, r.stop_strings)
            if cut is not None:
                del seq.out[cut:]
                del seq.logprobs[cut:]
                return "stop"
            text = self.tokenizer.decode(seq.out)
            if any(_ends_with_prefix(text, s) for s in r.stop_strings):
                return "length" if len(seq.out) >= r.max_new_tokens else None  # held back
        if len(seq.out) >= r.max_new_tokens:
            return "length"
        outputs.append(self._release(seq, None))
        return None

    def _release(self, seq: _Running, reason: str | None) -> SequenceOutput:
        new = seq.out[seq.released:]
        lps = seq.logprobs[seq.released:] if seq.request.logprobs is not None else None
        seq.released = len(seq.out)
        return SequenceOutput(seq.request.id, new, lps, reason, len(seq.request.prompt), len(seq.out))

    def _finish(self, row: int, reason: str) -> SequenceOutput:
        """Release the rest of row's sequence and free the row: the last row moves into it."""
        seq = self._running[row]
        last = len(self._running) - 1
        if row != last:
            moved = self._running[last]
            kv = self.cache.kv
            kv[:, :, row, :, :moved.length].copy_(kv[:, :, last, :, :moved.length])
            self._running[row] = moved
        self._running.pop()
        return self._release(seq, reason)


def generate_alone(model: GPT, request: SequenceRequest, tokenizer: object | None = None) -> list[int]:
    """The reference the engine is held to: `generate` for this one sequence (used by tests and
    benchmarks)."""
    from gptcore.generation import generate

    return generate(model, list(request.prompt), request.max_new_tokens, temperature=request.temperature,
                    top_k=request.top_k, top_p=request.top_p, stop_ids=sorted(request.stop_ids),
                    stop_strings=request.stop_strings, tokenizer=tokenizer, seed=request.seed)

