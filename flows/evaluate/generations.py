"""Fixed-prompt greedy generations and the smoke checks a usable model must pass on them.

What it is: :func:`generate_samples` (one record per prompt: the continuation, why it stopped,
which checks failed) and :func:`smoke_failures`, the checks themselves, a pure function of the
output so it is tested without a model. Greedy decoding makes the records reproducible.

What it is not: a quality benchmark. The checks catch a broken model (no output, bytes that are
not text, one token on repeat), not a mediocre one; the loss figures measure quality.

The rules, for a continuation of n new tokens:
- ``empty``: no new token, or only whitespace;
- ``not_text``: the text holds U+FFFD, i.e. the bytes are not valid UTF-8, except a run at the very
  end when the length limit cut a multi-byte character in half;
- ``repeats``: one token id ``MAX_RUN`` or more times in a row, or one token id making up more
  than ``MAX_SHARE`` of an output of at least ``MAX_RUN`` tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any

from gptcore import generate

log = logging.getLogger(__name__)

MAX_RUN = 8
"""The same token this many times in a row fails the ``repeats`` check."""
MAX_SHARE = 0.5
"""One token id above this share of an output (of at least MAX_RUN tokens) fails ``repeats``."""
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation and its smoke-check verdict."""

    prompt: str
    text: str
    """The continuation alone (without the prompt; the end-of-text token not included)."""
    tokens: int
    stopped: str
    """"eot" (the model ended the text) or "length" (max_new_tokens reached)."""
    failures: tuple[str, ...]
    """Names of the failed checks (see the module docstring); empty when it passed."""

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": list(self.failures), "passed": self.passed}


def smoke_failures(ids: Sequence[int], text: str, cut_by_length: bool) -> list[str]:
    """The checks (module docstring) that the continuation `ids`, decoded as `text`, fails."""
    failures = []
    if not ids or not text.strip():
        failures.append("empty")
    body = text.rstrip(_REPLACEMENT) if cut_by_length else text
    if _REPLACEMENT in body:
        failures.append("not_text")
    if ids:
        longest_run = max(len(list(run)) for _, run in groupby(ids))
        top_share = Counter(ids).most_common(1)[0][1] / len(ids)
        if longest_run >= MAX_RUN or (len(ids) >= MAX_RUN and top_share > MAX_SHARE):
            failures.append("repeats")
    return failures


def generate_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[Generation]:
    """Greedy continuation of each prompt up to `max_new_tokens`, stopping at the model's stop ids
    (<|endoftext|>, or its eos and end-of-turn tokens)."""
    records = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) or [
            tokenizer.eot_id
        ]  # an empty prompt starts a fresh document
        # pack_weights=False: packing keeps a second copy of the weights for fast CPU decoding,
        # worth it for a server, not for a handful of prompts, and it would outlive this call.
        out = generate(
            model,
            ids[-model.config.context_length :],
            max_new_tokens,
            stop_ids=tokenizer.stop_ids,
            pack_weights=False,
        )
        stopped = "length" if len(out) == max_new_tokens else "eot"
        text = tokenizer.decode(out)
        record = Generation(
            prompt,
            text,
            len(out),
            stopped,
            tuple(smoke_failures(out, text, cut_by_length=stopped == "length")),
        )
        if not record.passed:
            log.warning(
                "generation for %r fails smoke checks %s: %r", prompt, record.failures, text[:80]
            )
        records.append(record)
    return records


def as_text(records: Sequence[Generation]) -> str:
    """A human-readable listing: prompt, continuation, verdict."""
    blocks = []
    for r in records:
        verdict = "ok" if r.passed else "FAILED " + ", ".join(r.failures)
        blocks.append(
            f"--- {r.prompt!r} ({r.tokens} tokens, stopped at {r.stopped}; "
            f"{verdict})\n{r.prompt}{r.text}\n"
        )
    return "\n".join(blocks)
