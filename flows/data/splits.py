"""Which text is validation: the val split of the pretraining text and the held-out fine-tuning
examples.

The validation split is decided on the driver, between the passes. Pass 1 left each kept
document's byte range and content hash, and the same for its pieces (val_piece_chars characters
cut at a line break or space, a shorter document being one piece). Units -- whole documents when
they are many and small next to the target, else pieces -- are ranked by hash, and the lowest are
val until they hold the target share of the bytes; pass 2 writes each span to the split chosen.
The choice depends on content and config only (never on the worker count), identical text always
lands in one split, and the text is partitioned: no byte is in both.

How far off: the share is exact in bytes up to the last unit taken (a piece, or at most
_MAX_VAL_DOCUMENT_SHARE of the target for a document). In tokens it is off by how much the val
units' bytes per token differ from the corpus's -- a few percent for a hash-random sample of 20+
units of one kind of text, more for a corpus mixing code and prose with few val units. The floor
is converted to bytes with bytes per token measured on a 1 MiB sample, so it is aimed at with a
margin (_FLOOR_MARGIN) for that sample's error: val holds at least val_min_tokens unless the val
units' bytes per token is more than that far from the sample's (on the default corpus, code and
prose mixed, val came out 3.4% under its target of 1.05 x val_min_tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig
from flows.data import inputs
from flows.data.inputs import InputError, InputFile
from flows.data.shards import load_index, load_pieces
from flows.data.units import WorkUnit

_MIN_VAL_DOCUMENTS = 20  # whole documents only when val is made of at least this many ...

_MAX_VAL_DOCUMENT_SHARE = 0.1  # ... and none of them holds more than this share of the target

_BPT_SAMPLE_BYTES = 1 << 20  # cleaned text encoded to measure the corpus's bytes per token

_FLOOR_MARGIN = 1.05


def check_val_possible(files: Sequence[InputFile], data: DataConfig) -> None:
    """Refuse, before any Ray work, inputs whose sizes cannot give a val split of val_min_tokens
    tokens and a train split at least as large.

    Optimistic on purpose, so it never refuses a corpus that could make it: a byte-level BPE token
    covers at least one byte, and 2 tokens per input byte also covers what cleaning can add
    (normalisation, one <|endoftext|> per document). Compressed files, parquet and URLs that report
    no size can hold any amount of text: then only the exact check after pass 1 applies.
    """
    if data.val_fraction > 0.5:
        raise InputError(
            f"data.val_fraction={data.val_fraction} would leave train smaller than val; use at "
            "most 0.5"
        )
    if data.val_min_tokens == 0:
        return
    if any(
        f.compression or f.fmt == "parquet" or (inputs.is_url(f.path) and f.size == 0)
        for f in files
    ):
        return
    size = sum(f.size for f in files)
    most = 2 * size  # tokens, at the very most
    if most < 2 * data.val_min_tokens:
        raise InputError(
            f"data.inputs: too little text for a validation split: {len(files)} input files hold "
            f"{size:,} bytes, at most about {most:,} tokens, and "
            f"data.val_min_tokens={data.val_min_tokens:,} needs {2 * data.val_min_tokens:,} (val, "
            f"and a train split at least as large). {_VAL_REMEDY}"
        )


_VAL_REMEDY = (
    "Add text, lower data.val_min_tokens, or set data.val_min_tokens=0 and data.val_fraction=0 "
    "to build no validation split."
)


def hash_rank(hashes: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 16-byte content hash, as a number to rank by."""
    return np.ascontiguousarray(hashes[:, :8]).view("<u8").ravel()


def _lowest(h64: np.ndarray, sizes: np.ndarray, target: float) -> np.ndarray:
    """The units of lowest hash that hold `target` bytes (at least one unit); equal hashes (equal
    text) are taken together."""
    order = np.argsort(h64, kind="stable")
    k = min(int(np.searchsorted(np.cumsum(sizes[order]), target, side="left")), len(order) - 1)
    return h64 <= h64[order[k]]


def _bytes_per_token(
    tok: Any, units: Sequence[WorkUnit], keep: dict[str, np.ndarray], work: Path
) -> float:
    """Bytes of cleaned text per token, measured on up to 1 MiB read from the start of every
    unit."""
    budget = max(4096, _BPT_SAMPLE_BYTES // max(1, len(units)))
    texts: list[str] = []
    for unit in units:
        offsets, _ = load_index(work, unit.key)
        left = budget
        with open(work / "clean" / f"{unit.key}.txt", "rb") as f:
            for i in np.flatnonzero(keep[unit.key]):
                if left <= 0:
                    break
                f.seek(int(offsets[i]))
                take = min(left, int(offsets[i + 1] - offsets[i]))
                texts.append(f.read(take).decode("utf-8", errors="ignore"))  # may cut a character
                left -= take
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tok.encode_batch(texts, allow_special=False)))
    return n_bytes / max(1, n_tokens)


def assign_val(
    units: Sequence[WorkUnit],
    keep: dict[str, np.ndarray],
    work: Path,
    data: DataConfig,
    tok: Any,
    fixed: dict[str, bool] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """What the manifest records about the val split, and per unit the spans pass 2 writes (byte
    ranges of the unit's cleaned text, each becoming one <|endoftext|>-terminated sequence) with
    their split. Raises InputError when the corpus is too small for the split asked for.

    Units in `fixed` (key -> val?) go whole to the split given, outside the share and the floor:
    knowledge statements, whose held-out facts are the val split of a dataset of knowledge alone.
    """
    fixed = fixed or {}
    free = [u for u in units if u.key not in fixed]
    spans = {}
    for u in units:
        if u.key in fixed:
            offsets = load_index(work, u.key)[0]
            spans[u.key] = _document_spans(
                offsets, keep[u.key], np.full(int(keep[u.key].sum()), fixed[u.key])
            )
    if not free:
        return {
            "mode": "fixed",
            "fixed_units": len(fixed),
            "target_fraction": 0.0,
            "target_tokens": 0,
            "min_tokens": data.val_min_tokens,
            "piece_chars": data.val_piece_chars,
        }, spans
    info, free_spans = _assign_free(free, keep, work, data, tok)
    if fixed:
        info["fixed_units"] = len(fixed)
    return info, spans | free_spans


def _assign_free(
    units: Sequence[WorkUnit], keep: dict[str, np.ndarray], work: Path, data: DataConfig, tok: Any
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    index = {u.key: load_index(work, u.key) for u in units}
    sizes = [np.diff(index[u.key][0])[keep[u.key]] for u in units]
    doc_sizes = np.concatenate(sizes)
    total_bytes, documents = int(doc_sizes.sum()), len(doc_sizes)
    info: dict[str, Any] = {
        "mode": "none",
        "target_fraction": 0.0,
        "target_tokens": 0,
        "min_tokens": data.val_min_tokens,
        "piece_chars": data.val_piece_chars,
    }
    if data.val_fraction == 0 and data.val_min_tokens == 0:
        return info, {u.key: _document_spans(index[u.key][0], keep[u.key], None) for u in units}

    bpt = _bytes_per_token(tok, units, keep, work)
    corpus_tokens = total_bytes / bpt + documents  # + one <|endoftext|> per document
    target = max(data.val_fraction * corpus_tokens, _FLOOR_MARGIN * data.val_min_tokens)
    if 2 * target > corpus_tokens:
        raise InputError(
            f"data.inputs: too little text for a validation split: {documents:,} documents hold "
            f"{total_bytes:,} bytes after cleaning, about {corpus_tokens:,.0f} tokens ({bpt:.2f} "
            f"bytes per token); a val split of {target:,.0f} tokens "
            f"(data.val_min_tokens={data.val_min_tokens:,}, data.val_fraction={data.val_fraction}) "
            f"needs {2 * target:,.0f} so that train keeps as many. {_VAL_REMEDY}"
        )
    target_bytes = total_bytes * target / corpus_tokens
    info.update(
        target_fraction=round(target / corpus_tokens, 6),
        target_tokens=round(target),
        bytes_per_token=round(bpt, 4),
    )

    val = _lowest(
        np.concatenate([hash_rank(index[u.key][1])[keep[u.key]] for u in units]),
        doc_sizes,
        target_bytes,
    )
    if (
        val.sum() >= _MIN_VAL_DOCUMENTS
        and doc_sizes[val].max() <= _MAX_VAL_DOCUMENT_SHARE * target_bytes
    ):
        info.update(mode="documents", units=int(val.sum()))
        per_unit = np.split(val, np.cumsum([len(s) for s in sizes])[:-1])
        return info, {
            u.key: _document_spans(index[u.key][0], keep[u.key], v)
            for u, v in zip(units, per_unit, strict=True)
        }

    spans = []  # (start, end, document) of each unit's kept pieces
    hashes = []
    for u in units:
        offsets = index[u.key][0]
        starts, piece_hashes = load_pieces(work, u.key)
        ends = np.append(starts[1:], offsets[-1])
        doc = np.searchsorted(offsets, starts, side="right") - 1
        kept = keep[u.key][doc]
        spans.append((starts[kept], ends[kept], doc[kept]))
        hashes.append(hash_rank(piece_hashes)[kept])
    piece_sizes = np.concatenate([e - s for s, e, _ in spans])
    val = _lowest(np.concatenate(hashes), piece_sizes, target_bytes)
    if 2 * int(piece_sizes[val].sum()) > total_bytes:
        raise InputError(
            f"data.val_piece_chars={data.val_piece_chars}: pieces this long cannot give a val "
            f"split of about {target:,.0f} tokens out of {corpus_tokens:,.0f} and leave train as "
            f"large; lower it. {_VAL_REMEDY}"
        )
    info.update(mode="pieces", units=int(val.sum()))
    per_unit = np.split(val, np.cumsum([len(s) for s, _, _ in spans])[:-1])
    return info, {
        u.key: _piece_spans(*p, v) for u, p, v in zip(units, spans, per_unit, strict=True)
    }


def _document_spans(
    offsets: np.ndarray, keep: np.ndarray, val: np.ndarray | None
) -> dict[str, np.ndarray]:
    idx = np.flatnonzero(keep)
    return {
        "spans": np.stack([offsets[idx], offsets[idx + 1]], axis=1),
        "val": np.zeros(len(idx), dtype=bool) if val is None else val,
    }


def _piece_spans(
    starts: np.ndarray, ends: np.ndarray, doc: np.ndarray, val: np.ndarray
) -> dict[str, np.ndarray]:
    """Consecutive pieces of one document in the same split make one span: a document is cut only
    where the split changes, and each part ends with <|endoftext|> like a document."""
    if len(starts) == 0:
        return {"spans": np.zeros((0, 2), dtype=np.int64), "val": np.zeros(0, dtype=bool)}
    first = np.ones(len(starts), dtype=bool)
    first[1:] = (doc[1:] != doc[:-1]) | (val[1:] != val[:-1])
    idx = np.flatnonzero(first)
    last = np.append(idx[1:] - 1, len(starts) - 1)
    return {"spans": np.stack([starts[idx], ends[last]], axis=1), "val": val[idx]}


def sft_val_count(examples: int, data: DataConfig) -> int:
    """How many of `examples` fine-tuning examples are held out as sft_val: sft_val_fraction of them
    (rounded up), at least sft_val_min_examples when there are twice as many, at least one of two or
    more, never more than half; none of fewer than two, or when both settings are 0."""
    if examples < 2 or (data.sft_val_fraction == 0 and data.sft_val_min_examples == 0):
        return 0
    n = max(1, math.ceil(data.sft_val_fraction * examples))
    if examples >= 2 * data.sft_val_min_examples:
        n = max(n, data.sft_val_min_examples)
    return min(n, examples // 2)


def sft_holdout(
    src: Path, keys: list[str], data: DataConfig, fixed: dict[str, bool] | None = None
) -> dict[str, np.ndarray]:
    """Per unit, which examples are held out: the sft_val_count lowest content hashes, so the same
    examples whatever the worker count, and identical examples on one side. Units in `fixed`
    (key -> held out?) go whole to the side given, outside the count (knowledge pairs)."""
    fixed = fixed or {}
    held = {k: np.full(len(np.load(src / f"{k}.hash.npy")), fixed[k]) for k in keys if k in fixed}
    return held | _holdout_free(src, [k for k in keys if k not in fixed], data)


def _holdout_free(src: Path, keys: list[str], data: DataConfig) -> dict[str, np.ndarray]:
    hashes = [hash_rank(np.load(src / f"{k}.hash.npy")) for k in keys]
    h64 = np.concatenate(hashes) if hashes else np.zeros(0, dtype="<u8")
    n = sft_val_count(len(h64), data)
    val = np.zeros(len(h64), dtype=bool)
    if n:
        threshold = np.sort(h64)[n - 1]
        val = h64 <= threshold
        if 2 * val.sum() > len(
            h64
        ):  # repeats of one example tie at the threshold: they stay in sft
            val = h64 < threshold
    if not keys:
        return {}
    return dict(zip(keys, np.split(val, np.cumsum([len(h) for h in hashes])[:-1]), strict=True))
