"""Evaluation figures over a dataset split: loss, perplexity, bits per byte, held-out fine-tuning
loss.

What it is: the scoring of a model on the ``val`` split (every token, or the first ``max_tokens``)
and on the masked ``sft_val`` split, as :class:`LossTotals`. Windows are fixed and in manifest
order, so the same bundle on the same data gives bit-identical figures.

What it is not: the stage (stage.py decides what to write and log), nor training's periodic
validation loss (flows/train, an estimate over its first few batches; this scores the split).

Windowing: a segment (a ``val`` shard, or one ``sft_val`` example) of n tokens is cut into windows
of at most ``context_length + 1`` tokens starting every ``context_length`` tokens, so consecutive
windows share one token: the last target of a window is the first input of the next. That way every
token but a segment's first is scored exactly once, the last partial window included. Windows never
cross a segment: a shard boundary is not a document boundary the model could see across, and a
fine-tuning example is scored alone, from its own first token, as a served prompt would be (one
longer than the context is scored in windows too, the later ones without the example's start).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.data.dataset import DataError, read_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossTotals:
    """Summed cross-entropy over the scored target tokens, and what it was summed over."""

    loss_nats: float
    """Sum of the per-token cross-entropy, in nats."""
    tokens: int
    """Target tokens scored."""
    bytes: int
    """UTF-8 bytes of the scored target tokens' text."""

    @property
    def mean_loss(self) -> float:
        return self.loss_nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.mean_loss, 700.0))  # exp overflows a float past ~709

    @property
    def bits_per_byte(self) -> float:
        """Loss per byte of text, comparable across tokenizers (a token of 4 bytes costs more)."""
        return self.loss_nats / math.log(2) / max(self.bytes, 1)


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, start + length)`` of one segment; the first ``length - 1`` are inputs."""

    tokens: np.ndarray
    mask: np.ndarray | None
    """Loss mask over the same tokens (1 = the token is a target whose loss counts), or None: all
    count."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    rest are shifted past 255. Hugging Face's ByteLevel pre-tokenizer and decoder use this table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for, by id.

    gptcore tokenizers are byte-level: each character of a vocabulary entry stands for one byte,
    so a token may hold half of a multi-byte character (decoding it alone would give U+FFFD).
    Special tokens are text of their own (``<|endoftext|>``): their UTF-8. Joined over a sequence
    these are exactly the bytes ``tokenizer.decode`` turns into text.
    """
    alphabet = _byte_alphabet()
    out = []
    for i in range(tokenizer.vocab_size):
        entry = tokenizer.id_to_token(i) or ""
        if set(entry) <= alphabet.keys():
            out.append(bytes(alphabet[c] for c in entry))
        else:
            out.append(entry.encode("utf-8"))
    return out


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes of each token id's text, (vocab,) int64: what bits per byte divides by."""
    return np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)


def segment_windows(
    tokens: np.ndarray, mask: np.ndarray | None, context_length: int
) -> Iterator[Window]:
    """The windows of one segment (see the module docstring); a segment of < 2 tokens has none."""
    for start in range(0, len(tokens) - 1, context_length):
        end = min(start + context_length + 1, len(tokens))
        yield Window(tokens[start:end], None if mask is None else mask[start:end])


def split_shards(
    dataset: Path, manifest: dict[str, Any], split: str, masked: bool
) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray | None]]:
    """(manifest entry, tokens, mask or None) of each non-empty shard of `split`, in manifest
    order."""
    for shard in manifest["splits"][split]["shards"]:
        if shard["tokens"] == 0:
            continue  # nothing to score, and an empty file cannot be memory-mapped
        tokens = read_shard(dataset, shard, manifest["dtype"])
        mask = None
        if masked:
            if "mask_file" not in shard:
                raise DataError(
                    f"{dataset / 'manifest.json'}: {split} shard {shard['file']} has no mask_file"
                )
            mask = np.memmap(dataset / shard["mask_file"], dtype=np.uint8, mode="r")
        yield shard, tokens, mask


def split_examples(
    path: Path, tokens: np.ndarray, eot_id: int, expected: int | None
) -> list[tuple[int, int]]:
    """[start, end) of each fine-tuning example in a shard: every example ends with <|endoftext|>.

    Preprocessing encodes example text with special tokens read literally, so the end-of-text id
    occurs only as an example's last token and splitting on it recovers the examples exactly.
    `expected` is the shard's recorded example count, when the manifest has one.
    """
    ends = (np.flatnonzero(np.asarray(tokens) == eot_id) + 1).tolist()
    if not ends or ends[-1] != len(tokens):
        raise DataError(
            f"{path}: a fine-tuning shard must end with <|endoftext|> (id {eot_id}), it does not"
        )
    if expected is not None and expected != len(ends):
        raise DataError(
            f"{path}: {len(ends)} examples end in <|endoftext|>, the manifest says {expected}"
        )
    return list(zip([0, *ends[:-1]], ends, strict=True))


def val_windows(
    dataset: Path, manifest: dict[str, Any], context_length: int, max_tokens: int
) -> Iterator[Window]:
    """The windows of the ``val`` split, cut so that at most `max_tokens` targets (0: all) are
    scored."""
    left: float = max_tokens or math.inf
    for _, tokens, _ in split_shards(dataset, manifest, "val", masked=False):
        for window in segment_windows(tokens, None, context_length):
            if left <= 0:
                return
            if len(window.tokens) - 1 > left:
                window = Window(window.tokens[: int(left) + 1], None)
            left -= len(window.tokens) - 1
            yield window


def sft_windows(
    dataset: Path, manifest: dict[str, Any], split: str, context_length: int
) -> Iterator[Window]:
    """The windows of each example of a masked fine-tuning split; those with no counted target are
    skipped."""
    eot = int(manifest["eot_id"])
    for shard, tokens, mask in split_shards(dataset, manifest, split, masked=True):
        for start, end in split_examples(
            dataset / shard["file"], tokens, eot, shard.get("examples")
        ):
            for window in segment_windows(tokens[start:end], mask[start:end], context_length):
                if window.mask[1:].any():
                    yield window


def batches(windows: Iterator[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows in groups of `batch_size` (the last may be smaller)."""
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def collate(batch: Sequence[Window], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (B, T_max), right padded; padded or masked-out targets are -1.

    Right padding is invisible to the real positions: attention is causal, so no real query
    attends to a pad key after it.
    """
    T = max(len(w.tokens) for w in batch) - 1
    x = np.zeros((len(batch), T), dtype=np.int64)
    y = np.full((len(batch), T), -1, dtype=np.int64)
    for row, w in enumerate(batch):
        n = len(w.tokens) - 1
        x[row, :n] = w.tokens[:-1]
        targets = np.asarray(w.tokens[1:], dtype=np.int64)
        y[row, :n] = (
            targets if w.mask is None else np.where(np.asarray(w.mask[1:]) > 0, targets, -1)
        )
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def score(
    model: torch.nn.Module,
    windows: Iterator[Window],
    batch_size: int,
    byte_lengths: np.ndarray | None = None,
) -> LossTotals:
    """Summed loss over the counted targets of `windows`; bytes counted when `byte_lengths` is
    given.

    The loss comes from the model's fused loss path (no (B, T, vocab) logits), as mean * count;
    sums are float64, added in window order, so the result is reproducible bit for bit.
    """
    model.eval()
    device = next(model.parameters()).device
    loss_nats, tokens, nbytes = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches(windows, batch_size):
            x, y = collate(batch, device)
            _, loss = model(x, y, return_logits=False)
            kept = int((y != -1).sum())
            loss_nats += float(loss.double()) * kept
            tokens += kept
            if byte_lengths is not None:
                counted = y[y != -1].cpu().numpy()
                nbytes += int(byte_lengths[counted].sum())
    return LossTotals(loss_nats=loss_nats, tokens=tokens, bytes=nbytes)


def has_tokens(manifest: dict[str, Any], split: str) -> bool:
    """Whether `split` exists and holds a shard with at least one target (two tokens)."""
    entry = manifest["splits"].get(split) or {}
    return any(s["tokens"] > 1 for s in entry.get("shards", []))


def val_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Path,
    manifest: dict[str, Any],
    context_length: int,
    batch_size: int,
    max_tokens: int = 0,
) -> LossTotals:
    """Loss, perplexity and bits per byte of the ``val`` split (its first `max_tokens` targets;
    0: all)."""
    windows = val_windows(dataset, manifest, context_length, max_tokens)
    return score(model, windows, batch_size, token_byte_lengths(tokenizer))


def sft_val_loss(
    model: torch.nn.Module,
    dataset: Path,
    manifest: dict[str, Any],
    context_length: int,
    batch_size: int,
    split: str = "sft_val",
) -> LossTotals:
    """Mean loss over the completion tokens (mask 1) of the held-out fine-tuning examples."""
    return score(model, sft_windows(dataset, manifest, split, context_length), batch_size)


def val_text_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Path,
    manifest: dict[str, Any],
    data_tokenizer: Any,
    context_length: int,
    batch_size: int,
    max_tokens: int = 0,
) -> LossTotals:
    """Like :func:`val_loss`, for a model whose tokenizer is not the dataset's: the ``val`` split's
    text (its first `max_tokens` dataset tokens; 0: all) decoded with `data_tokenizer` and encoded
    with the model's own `tokenizer`. Bits per byte then compare the two models on the same text."""
    eot = int(manifest["eot_id"])

    def windows() -> Iterator[Window]:
        left: float = max_tokens or math.inf
        for _, tokens, _ in split_shards(dataset, manifest, "val", masked=False):
            ids = np.asarray(tokens[: int(min(left, len(tokens)))])
            left -= len(ids)
            cuts = np.flatnonzero(ids == eot)
            for doc in np.split(
                ids, cuts + 1
            ):  # each document keeps its <|endoftext|> as text's end
                body = doc[:-1] if len(doc) and doc[-1] == eot else doc
                text = data_tokenizer.decode(body.tolist())
                if text:
                    own = np.asarray([*tokenizer.encode(text), tokenizer.eot_id], dtype=np.int64)
                    yield from segment_windows(own, None, context_length)
            if left <= 0:
                return

    return score(model, windows(), batch_size, token_byte_lengths(tokenizer))
