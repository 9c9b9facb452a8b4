"""Continuous batching: one decoding loop over a batch of sequences that changes every step.

Static batching (``generate`` on a list of prompts, or Ray Serve's ``@serve.batch``) starts a batch
together and holds it until its longest member ends. Here, as in vLLM and TGI, the schedule is per
iteration. Each :meth:`BatchEngine.step` is three named parts, in vLLM's terms:

- the *decode step* advances every running sequence by one token in a single batched call, each
  row at its own position (decode.RaggedDecoder), and samples each row's next token;
- *retirement*: a sequence that stops (stop id, stop string, length, cancelled) leaves at once and
  frees its row for the next request; rows stay packed at the front of the cache, so attention
  reads one contiguous block;
- *admission* moves waiting requests into free rows (waiting -> running), each prompt prefilled
  alone into its own row of the KV cache, yielding its first token.

How a token is picked is not the scheduler's: sampling.py does it, as it does for ``generate``.
What a sequence keeps of each token (stop conditions, held-back text, logprobs) is its own
(:class:`_Running`).

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
from typing import Any

import torch

from gptcore.decode import RaggedDecoder, can_decode_flat
from gptcore.generation import _cache_dtype, generate
from gptcore.model import GPT, KVCache
from gptcore.packed import pack_linears
from gptcore.sampling import (
    MAX_STOP_CHARS,
    SamplingParams,
    make_generator,
    may_become_stop,
    sample,
    stop_cut,
)


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: its prompt ids, how many tokens at most and how to pick them."""

    id: Hashable
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
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
    """A sequence in the batch: its cache row's length and what it generated so far."""

    request: SequenceRequest
    generator: torch.Generator | None
    length: int  # positions in its cache row
    last: int = -1  # newest token, not yet run through the model
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ready: int = 0  # tokens of `out` clear of any stop string
    released: int = 0  # tokens of `out` already in a SequenceOutput

    @property
    def history(self) -> list[int]:
        """Prompt and generated tokens: what the repetition penalty looks at."""
        return [*self.request.prompt, *self.out]

    def accept(self, token: int, logits: torch.Tensor, tokenizer: Any) -> str | None:
        """Take the picked `token` (logits (vocab,) for its logprobs); why the sequence ends, if it
        does. Tokens that may begin a stop string are held back: not `ready` to release yet."""
        r = self.request
        if token in r.sampling.stop_ids:
            return "stop"
        self.last = token
        self.out.append(token)
        if r.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(lp, r.logprobs) if r.logprobs else None
            self.logprobs.append(
                TokenLogprob(
                    token,
                    float(lp[token]),
                    []
                    if top is None
                    else list(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
                )
            )
        stops = r.sampling.stop_strings
        if stops:
            cut = stop_cut(tokenizer, self.out, stops)
            if cut is not None:
                del self.out[cut:]
                del self.logprobs[cut:]
                return "stop"
            if may_become_stop(tokenizer, self.out, stops):
                return "length" if len(self.out) >= r.max_new_tokens else None  # held back
        if len(self.out) >= r.max_new_tokens:
            return "length"
        self.ready = len(self.out)
        return None

    def release(self, reason: str | None = None) -> SequenceOutput:
        """What is new and ready since the last release; all of it once the sequence finished."""
        end = self.ready if reason is None else len(self.out)
        new = self.out[self.released : end]
        lps = self.logprobs[self.released : end] if self.request.logprobs is not None else None
        self.released = end
        return SequenceOutput(
            self.request.id, new, lps, reason, len(self.request.prompt), len(self.out)
        )


class BatchEngine:
    """Iteration-level scheduler over `model`; `submit` and `cancel` may be called from any thread,
    `step` from one thread only."""

    def __init__(
        self,
        model: GPT,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int | None = None,
        tokenizer: object | None = None,
        pack_weights: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens or max_batch_size * self.context_length
        if self.max_batch_tokens < 2:
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} leaves no room for a sequence"
            )
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            if not can_decode_flat(self.model):
                raise ValueError(
                    "continuous batching needs a plain GPT without module hooks (its decoding "
                    "step computes what GPT.forward would only then)"
                )
            if pack_weights:
                pack_linears(model)
            self.cache = KVCache(
                model.config, max_batch_size, self.context_length, self.device, _cache_dtype(model)
            )
            self.decoder = RaggedDecoder(model, self.cache)
        self._lock = threading.Lock()
        self._waiting: deque[SequenceRequest] = deque()
        self._cancelled: set[Hashable] = set()
        self._running: list[_Running] = []  # row i of the cache is _running[i]

    # ----------------------------------------------------------------- from any thread

    def submit(self, request: SequenceRequest) -> None:
        """Queue a sequence; it joins the batch at a coming step. A request that cannot fit raises
        ValueError now (its sampling settings were checked when its SamplingParams was made)."""
        if not request.prompt:
            raise ValueError("a prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
        if len(request.prompt) + request.max_new_tokens > self.context_length:
            raise ValueError(
                f"{len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                f"the context length of {self.context_length}"
            )
        if len(request.prompt) + request.max_new_tokens > self.max_batch_tokens:
            raise ValueError(
                f"{len(request.prompt) + request.max_new_tokens} tokens exceed the batch token "
                f"budget of {self.max_batch_tokens}"
            )
        stops = request.sampling.stop_strings
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ValueError(f"a prompt token id is outside the vocabulary [0, {vocab})")
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
        """Drop every sequence, running or waiting (after a failed step: the cache rows are
        suspect)."""
        with self._lock:
            self._waiting.clear()
            self._cancelled.clear()
        self._running.clear()

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # ----------------------------------------------------------------- from the loop's thread

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """One iteration: retire cancelled sequences, advance the running ones by one token, retire
        those that finished, admit what fits; what each sequence released."""
        outputs = self._retire_cancelled()
        finished = self._decode_step(outputs)
        for row, reason in reversed(
            finished
        ):  # from the back: a row's removal moves the last one in
            outputs.append(self._retire(row, reason))
        for request in self._admit():
            outputs.extend(self._prefill(request))
        return outputs

    # ----------------------------------------------------------------- the decode step

    def _decode_step(self, outputs: list[SequenceOutput]) -> list[tuple[int, str]]:
        """One batched forward over every running sequence, each at its own position, and each
        one's next token; (row, why) of the sequences that finished."""
        if not self._running:
            return []
        ids = torch.tensor([s.last for s in self._running], device=self.device)
        positions = torch.tensor([s.length for s in self._running], device=self.device)
        logits = self.decoder(ids, positions).float()  # (B, vocab)
        tokens = self._sample(logits)
        finished: list[tuple[int, str]] = []
        for row, (seq, token) in enumerate(zip(self._running, tokens, strict=True)):
            seq.length += 1
            reason = self._accept(seq, token, logits[row], outputs)
            if reason:
                finished.append((row, reason))
        return finished

    def _sample(self, logits: torch.Tensor) -> list[int]:
        """Each running sequence's next token under its own settings and generator: one argmax for
        every greedy row at once, sampling.sample for each of the others."""
        argmax = logits.argmax(dim=-1).tolist()
        return [
            argmax[row]
            if seq.request.sampling.plain_argmax
            else int(
                sample(logits[row : row + 1], seq.request.sampling, seq.generator, [seq.history])[0]
            )
            for row, seq in enumerate(self._running)
        ]

    def _accept(
        self, seq: _Running, token: int, logits: torch.Tensor, outputs: list[SequenceOutput]
    ) -> str | None:
        """Give `seq` its next token, release what is ready; why the sequence ends, if it does."""
        reason = seq.accept(token, logits, self.tokenizer)
        if reason is None and seq.ready > seq.released:
            outputs.append(seq.release())
        return reason

    # ----------------------------------------------------------------- retirement

    def _retire_cancelled(self) -> list[SequenceOutput]:
        """Take the sequences cancelled since the last step out of the queue and the batch."""
        outputs: list[SequenceOutput] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                kept = deque()
                for r in self._waiting:
                    if r.id in cancelled:
                        outputs.append(
                            SequenceOutput(r.id, [], None, "cancelled", len(r.prompt), 0)
                        )
                    else:
                        kept.append(r)
                self._waiting = kept
        for row in reversed(range(len(self._running))):
            if self._running[row].request.id in cancelled:
                outputs.append(self._retire(row, "cancelled"))
        return outputs

    def _retire(self, row: int, reason: str) -> SequenceOutput:
        """Release the rest of row's sequence and free the row: the last row moves into it."""
        seq = self._running[row]
        last = len(self._running) - 1
        if row != last:
            moved = self._running[last]
            kv = self.cache.kv
            kv[:, :, row, :, : moved.length].copy_(kv[:, :, last, :, : moved.length])
            self._running[row] = moved
        self._running.pop()
        return seq.release(reason)

    # ----------------------------------------------------------------- admission

    def _admit(self) -> list[SequenceRequest]:
        """Waiting requests that fit now, first come first served: a free row each, and their
        prompt + max_new_tokens within the token budget the running sequences leave."""
        budget = self.max_batch_tokens - sum(
            len(s.request.prompt) + s.request.max_new_tokens for s in self._running
        )
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
        seq = _Running(
            request, make_generator(request.sampling, self.device), length=len(request.prompt)
        )
        self._running.append(seq)
        cache = KVCache.over(self.cache.kv[:, :, row : row + 1])
        idx = torch.tensor([request.prompt], device=self.device)
        logits = self.model(idx, cache=cache, last_logits_only=True)[0][
            :, -1, :
        ].float()  # (1, vocab)
        token = int(sample(logits, request.sampling, seq.generator, [seq.history])[0])
        outputs: list[SequenceOutput] = []
        reason = self._accept(seq, token, logits[0], outputs)
        if reason:
            outputs.append(self._retire(row, reason))
        return outputs


def generate_alone(
    model: GPT, request: SequenceRequest, tokenizer: object | None = None
) -> list[int]:
    """The reference the engine is held to: `generate` for this one sequence (used by tests and
    benchmarks)."""
    return generate(
        model,
        list(request.prompt),
        request.max_new_tokens,
        sampling=request.sampling,
        tokenizer=tokenizer,
    )
