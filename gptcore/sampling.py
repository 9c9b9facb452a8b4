"""How the next token is chosen: :class:`SamplingParams`, checked once, and the code applying it.

One definition of every decoding setting (temperature, top-k, top-p, repetition penalty, stop ids
and strings, seed) shared by :func:`gptcore.generate`, the continuous-batching engine
(batching.py) and the server, which maps the errors raised here to its HTTP answers. The sampling
itself (:func:`sample`) and the stop-string tests live here too, so a row decodes the same way in
``generate`` and in a batch that changes while decoding.

Not here: how long to generate (``max_new_tokens``): its valid range is the caller's (``generate``
allows 0, the engine needs room in the context, the server has a default per request).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MAX_STOP_CHARS = 256
"""Longest stop string a serving engine accepts: holding back a possible stop string costs up to its
length squared in character comparisons per decode step."""


class SamplingError(ValueError):
    """A sampling setting out of its range; `field` names the setting (the server's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when a sequence stops. The defaults are greedy search with
    no stop condition. Out-of-range values raise SamplingError (a ValueError) naming the field and
    the value, rather than being quietly ignored: a top_p of 1.5 or a top_k of 0 used to mean "no
    filter", a NaN temperature sampled garbage."""

    temperature: float = 0.0
    """0 is greedy search (argmax); above 0 the logits are divided by it before sampling."""
    top_k: int | None = None
    """Sample among the k most likely tokens only; None for no top-k filter."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches top_p (nucleus); None for
    no nucleus filter."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on every token already in the row, prompt included; 1 is none."""
    stop_ids: frozenset[int] = frozenset()
    """Token ids that end a sequence; the stop id itself is not part of the output."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sequence once its text contains one (needs a tokenizer to decode with);
    the output is cut before the token in which the stop string begins."""
    seed: int | None = None
    """Seed of the sequence's own random generator: sampling is then reproducible."""

    def __post_init__(self) -> None:
        # Lists and sets are welcome (generate() has always taken them); stored as hashable values.
        object.__setattr__(self, "stop_ids", frozenset(_ints("stop_ids", self.stop_ids)))
        object.__setattr__(self, "stop_strings", tuple(_strings("stop_strings", self.stop_strings)))
        t, k, p, rp = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise SamplingError(
                "temperature",
                f"temperature={t!r} must be a finite number >= 0 (0 is greedy search)",
            )
        if k is not None and not (_is_int(k) and k >= 1):
            raise SamplingError(
                "top_k", f"top_k={k!r} must be an integer >= 1 (omit it for no top-k filter)"
            )
        if p is not None and not (isinstance(p, int | float) and 0 < p <= 1):
            raise SamplingError(
                "top_p",
                f"top_p={p!r} must be in (0, 1]: > 0 and at most 1 (omit it for no nucleus filter)",
            )
        if not (isinstance(rp, int | float) and math.isfinite(rp) and rp > 0):
            raise SamplingError(
                "repetition_penalty",
                f"repetition_penalty={rp!r} must be a finite number > 0 (1 is none)",
            )
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingError(
                "seed", f"seed={self.seed!r} must be an integer (omit it for an unseeded sample)"
            )

    @property
    def plain_argmax(self) -> bool:
        """Whether the next token is the raw logits' argmax (a batch picks those rows at once)."""
        return self.temperature == 0 and self.repetition_penalty == 1.0


def _is_int(v: Any) -> bool:
    """An integer, numpy's included; not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(name: str, values: Iterable[Any]) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise SamplingError(name, f"{name}={values!r} must be a collection of token ids")
    out = list(values)
    bad = next((v for v in out if not _is_int(v)), None)
    if bad is not None:
        raise SamplingError(name, f"{name}: {bad!r} is not a token id (an integer)")
    return [int(v) for v in out]


def _strings(name: str, values: Iterable[Any]) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise SamplingError(
            name, f"{name}={values!r} must be a list of strings (a single one in a list)"
        )
    out = list(values)
    bad = next((v for v in out if not isinstance(v, str)), None)
    if bad is not None:
        raise SamplingError(name, f"{name}: {bad!r} is not a string")
    return out


# --------------------------------------------------------------------------- picking a token


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The sequence's own random generator when it has a seed (else torch's global one is used)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    histories: Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """Next token per row of `logits` (B, vocab), float: the repetition penalty over each row's
    `histories` (its tokens so far, prompt included), then argmax or a filtered sample. (B,)"""
    if params.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, histories, params.repetition_penalty)
    return pick(logits, params, generator)


def pick(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample from the filtered distribution."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    top_k, top_p = params.top_k, params.top_p
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def penalize_repeats(
    logits: torch.Tensor, rows: Sequence[Sequence[int]], penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row (divide positive, multiply negative)."""
    logits = logits.clone()
    for i, r in enumerate(rows):
        seen = torch.tensor(sorted(set(r)), dtype=torch.long, device=logits.device)
        if seen.numel() == 0:
            continue
        vals = logits[i, seen]
        logits[i, seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


# --------------------------------------------------------------------------- stop strings


def stop_cut(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> int | None:
    """Tokens to keep if the decoded text holds a stop string (up to where it starts), or None."""
    text = tokenizer.decode(ids)
    starts = [text.find(s) for s in stop_strings if s and s in text]
    if not starts:
        return None
    first = min(starts)
    keep = len(ids)
    while keep > 0 and len(tokenizer.decode(ids[:keep])) > first:
        keep -= 1
    return keep


def may_become_stop(tokenizer: Any, ids: list[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of `ids` ends with the start of a stop string: a streaming caller holds
    these tokens back until it is clear they do not begin one."""
    text = tokenizer.decode(ids)
    return any(ends_with_prefix(text, s) for s in stop_strings)


def ends_with_prefix(text: str, stop: str) -> bool:
    """Whether text ends with a proper prefix of `stop` (the start of a stop string may be coming).

    Only prefixes that fit in the text are tried, and only against the text's last len(stop) - 1
    characters: the cost per call is bounded by len(stop) squared, whatever the text's length (it
    used to build every prefix of the stop string on every decode step, which a stop string of
    240 K characters turned into seconds per step for every client of a server)."""
    tail = text[-(len(stop) - 1) :] if len(stop) > 1 else ""
    return any(stop.startswith(tail[i:]) for i in range(len(tail)))
