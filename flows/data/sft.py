"""Fine-tuning examples: JSONL records to token ids with a loss mask over the completion.

What it is: the record formats (``{"prompt", "completion"}`` and chat-style ``{"messages": [{"role",
"content"}, ...]}``), the chat rendering shared with serving (:func:`render_chat_prompt`), and
:func:`tokenize_examples`, which turns records into (ids, mask) pairs where mask is 1 on exactly the
tokens the model should learn to produce: the completion, or the assistant turns, plus the
trailing ``<|endoftext|>``.

What it is not: reading files (flows/data/formats.py) or writing shards (flows/data/shards.py).

Prompt and completion are tokenized separately and concatenated, so the mask boundary falls on a
token boundary by construction (a BPE merge across it is impossible).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from flows.config import DataConfig
from flows.data.clean import UnitStats, clean

ASSISTANT = "assistant"
ROLES = ("system", "user", ASSISTANT)  # the roles serving accepts; fine-tuning data may name others


class _Encoder(Protocol):
    eot_id: int

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]: ...


def turn_header(role: str) -> str:
    """What precedes each chat turn's content (never trained on)."""
    return f"{role}: "


def render_chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The text a fine-tuned model expects before it writes the next assistant turn."""
    return "".join(turn_header(m["role"]) + m["content"] + "\n" for m in messages) + turn_header(ASSISTANT)


def segments(record: Any, data: DataConfig, stats: UnitStats) -> list[tuple[str, bool]] | None:
    """(text, trained-on) pieces of one record, cleaned; None (and a count) when it is unusable."""
    if not isinstance(record, dict):
        stats.drop("bad_sft_record")
        return None
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            stats.drop("bad_sft_record")
            return None
        out: list[tuple[str, bool]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                stats.drop("bad_sft_record")
                return None
            trained = m["role"] == ASSISTANT
            out.append((turn_header(clean(m["role"], data, stats)), False))
            out.append((clean(m["content"], data, stats) + "\n", trained))
        if not any(trained and text.strip() for text, trained in out):
            stats.drop("no_assistant_turn")
            return None
        return out
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        stats.drop("missing_prompt_or_completion")
        return None
    if not completion.strip():
        stats.drop("empty_completion")
        return None
    return [(clean(prompt, data, stats), False), (clean(completion, data, stats), True)]


def tokenize_examples(
    examples: Iterable[list[tuple[str, bool]]], tokenizer: _Encoder, batch_chars: int = 1 << 20
) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, mask) per example, in order; each ends with <|endoftext|> (mask 1)."""
    batch: list[list[tuple[str, bool]]] = []
    chars = 0
    for ex in examples:
        batch.append(ex)
        chars += sum(len(t) for t, _ in ex)
        if chars >= batch_chars:
            yield from _encode(batch, tokenizer)
            batch, chars = [], 0
    if batch:
        yield from _encode(batch, tokenizer)


def _encode(batch: list[list[tuple[str, bool]]], tokenizer: _Encoder) -> Iterator[tuple[list[int], list[int]]]:
    flat = [text for ex in batch for text, _ in ex]
    encoded = iter(tokenizer.encode_batch(flat, allow_special=False))
    for ex in batch:
        ids: list[int] = []
        mask: list[int] = []
        for _, trained in ex:
            piece = next(encoded)
            ids += piece
            mask += [int(trained)] * len(piece)
        ids.append(tokenizer.eot_id)
        mask.append(1)
        yield ids, mask


def merge_counts(into: Counter, other: dict[str, int]) -> None:
    for k, v in other.items():
        into[k] += v
