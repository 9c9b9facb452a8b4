"""Fine-tuning examples: JSONL records to token ids with a loss mask over the completion.

What it is: the record formats (``{"prompt", "completion"}`` and chat-style ``{"messages": [{"role",
"content"}, ...]}``), the chat rendering shared with serving (:func:`render_chat_prompt`), and
:func:`tokenize_examples`, which turns records into (ids, mask) pairs where mask is 1 on exactly the
tokens the model should learn to produce: the completion, or the assistant turns, plus the
trailing ``<|endoftext|>``.

What it is not: reading files (flows/data/formats.py) or writing shards (flows/data/shards.py).

Prompt and completion are tokenized separately and concatenated, so the mask boundary falls on a
token boundary by construction (a BPE merge across it is impossible).

With a base model's chat template (:class:`ChatFormat`), both record kinds are rendered by the
template itself (a prompt/completion pair as one user and one assistant turn): each assistant turn's
text and end-of-turn token are trained on, everything the template writes around them (headers, a
default system prompt, the turns of the other roles) is not. The template's text is cut at the
points where rendering one more message changes it, so whatever the template does, the pieces join
up to exactly what serving renders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    return "".join(turn_header(m["role"]) + m["content"] + "\n" for m in messages) + turn_header(
        ASSISTANT
    )


@dataclass(frozen=True)
class ChatFormat:
    """How a base model's examples are written: its chat template (None: the base has none, so chat
    records are refused and prompt/completion pairs are concatenated as they are)."""

    tokenizer: Any
    """The base's gptcore Tokenizer (its apply_chat_template, stop tokens and special tokens)."""

    @property
    def has_template(self) -> bool:
        return self.tokenizer.chat_template is not None


# A piece of an example: (text, trained on?) or, for text a chat template wrote, (text, trained on?,
# True): its special-token text (<|im_start|>) encodes as the special ids.
Piece = tuple[str, bool] | tuple[str, bool, bool]


def segments(
    record: Any, data: DataConfig, stats: UnitStats, chat: ChatFormat | None = None
) -> list[Piece] | None:
    """(text, trained-on) pieces of one record, cleaned; None (and a count) when it is unusable.

    With `chat` (a base model's format) the record is rendered with its chat template."""
    if chat is not None:
        return _chat_segments(record, data, stats, chat)
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
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                stats.drop("bad_sft_record")
                return None
            trained = m["role"] == ASSISTANT
            out.append((turn_header(clean(m["role"], data, stats)), False))
            out.append((clean(m["content"], data, stats) + "\n", trained))
        if not any(trained and text.strip() for text, trained in out):
            stats.drop("no_assistant_turn")
            return None
        return out
    pair = _pair(record, stats)
    if pair is None:
        return None
    return [(clean(pair[0], data, stats), False), (clean(pair[1], data, stats), True)]


def _pair(record: dict, stats: UnitStats) -> tuple[str, str] | None:
    """(prompt, completion) of a pair record; None (and a count) when either is missing or empty."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        stats.drop("missing_prompt_or_completion")
        return None
    if not completion.strip():
        stats.drop("empty_completion")
        return None
    return prompt, completion


def _messages(record: Any, stats: UnitStats) -> list[dict[str, str]] | None:
    """The record as chat messages (a prompt/completion pair: one user turn, one assistant turn)."""
    if not isinstance(record, dict):
        stats.drop("bad_sft_record")
        return None
    if "messages" not in record:
        pair = _pair(record, stats)
        return (
            None
            if pair is None
            else [{"role": "user", "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
        )
    messages = record["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        stats.drop("bad_sft_record")
        return None
    if any(m["role"] not in ROLES for m in messages):
        stats.drop(
            "unknown_role"
        )  # the template would render it as it likes, serving never sends it
        return None
    if not any(m["role"] == ASSISTANT and m["content"].strip() for m in messages):
        stats.drop("no_assistant_turn")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _chat_segments(
    record: Any, data: DataConfig, stats: UnitStats, chat: ChatFormat
) -> list[Piece] | None:
    tok = chat.tokenizer
    if not chat.has_template:
        if isinstance(record, dict) and "messages" in record:
            stats.drop("no_chat_template")  # the base has no way of writing turns it was trained on
            return None
        return segments(record, data, stats)
    messages = _messages(record, stats)
    if messages is None:
        return None
    for m in messages:
        m["content"] = clean(m["content"], data, stats)
    specials = tok.special_texts()
    if any(s in m["content"] for m in messages for s in specials):
        stats.drop("special_token_in_text")  # it would encode as the control token it spells
        return None
    if messages[0]["role"] == ASSISTANT:
        stats.drop("no_prompt")  # nothing to answer
        return None
    ends = [t for t in (*tok.stop_tokens, tok.special_tokens.get("eos_token")) if t]
    out: list[Piece] = []
    done = ""  # the text of the pieces so far
    for i, m in enumerate(messages):
        if m["role"] != ASSISTANT:
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            stats.drop("chat_template_not_incremental")
            return None
        reply = after[len(before) :]
        # Trained: the reply up to and including its end-of-turn token (the model must learn to
        # stop); what the template writes after that (a newline) is not.
        cut = max((reply.rfind(t) + len(t) for t in ends if t in reply), default=len(reply))
        out += [
            (before[len(done) :], False, True),
            (reply[:cut], True, True),
            (reply[cut:], False, True),
        ]
        done = after
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(done):
        stats.drop("chat_template_not_incremental")
        return None
    out.append((full[len(done) :], False, True))
    return [p for p in out if p[0]]


def tokenize_examples(
    examples: Iterable[list[Piece]], tokenizer: _Encoder, batch_chars: int = 1 << 20
) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, mask) per example, in order; each ends with <|endoftext|> (mask 1, or 0 after a chat
    template's turns: the end of the turn is what the model learns to stop at)."""
    batch: list[list[Piece]] = []
    chars = 0
    for ex in examples:
        batch.append(ex)
        chars += sum(len(p[0]) for p in ex)
        if chars >= batch_chars:
            yield from _encode(batch, tokenizer)
            batch, chars = [], 0
    if batch:
        yield from _encode(batch, tokenizer)


def _encode(batch: list[list[Piece]], tokenizer: _Encoder) -> Iterator[tuple[list[int], list[int]]]:
    def special(p: Piece) -> bool:
        return len(p) > 2 and bool(p[2])

    literal = iter(
        tokenizer.encode_batch(
            [p[0] for ex in batch for p in ex if not special(p)], allow_special=False
        )
    )
    templated = iter(
        tokenizer.encode_batch([p[0] for ex in batch for p in ex if special(p)], allow_special=True)
    )
    for ex in batch:
        ids: list[int] = []
        mask: list[int] = []
        for p in ex:
            piece = next(templated if special(p) else literal)
            ids += piece
            mask += [int(p[1])] * len(piece)
        ids.append(tokenizer.eot_id)
        mask.append(0 if ex and special(ex[-1]) else 1)
        yield ids, mask
