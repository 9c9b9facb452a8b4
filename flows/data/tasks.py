"""The preprocess stage's Ray tasks: each reads one work unit and writes that unit's files.

What it is: :func:`clean_unit` (pass 1: read, clean, curate and hash a unit's documents and their
``val_piece_chars`` pieces, into ``_work/clean/``), :func:`tokenize_unit` (pass 2: token ids of the
spans the driver assigned to train and val, into ``_work/tok/``) and :func:`sft_unit` (fine-tuning
records as token ids and loss masks, into ``_work/sft/``). Each returns the unit's counts (kept,
dropped by reason, where, repaired), which the driver merges into the manifest. Memory is bounded
per task, whatever the unit: one document, or one batch of spans, at a time.

What it is not: scheduling them (flows/data/stage.py runs them as Ray tasks, resuming finished
units), nor the driver's steps between the passes (deduplication, the tokenizer, the val split).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flows.config import DataConfig
from flows.data import formats, sft
from flows.data.clean import UnitStats, pieces
from flows.data.shards import UnitWriter
from flows.data.units import WorkUnit

_BATCH_CHARS = 1 << 20  # characters per encode_batch call: amortises the call, bounds memory
_READ_BYTES = (
    4 * _BATCH_CHARS
)  # most bytes of cleaned text pass 2 reads at once (beyond one document)


def clean_unit(
    unit: WorkUnit, data: DataConfig, work: str, eval_path: str | None = None
) -> dict[str, Any]:
    """Ray task: the unit's cleaned and curated documents (concatenated UTF-8), their offsets and
    hashes, and the offsets and hashes of their pieces (for the val split, see assign_val); where
    each came from, what was dropped, and their LSH band keys (flows/data/curate/unit.py). Memory:
    one document, the readers' bounded blocks, and ~60 bytes per document (and 24 per piece)."""
    from flows.data.curate.unit import UnitCuration

    cpu = time.process_time()
    stats = UnitStats()
    out = UnitWriter(Path(work) / "clean", unit.key)
    f = out.open(".txt")
    curation = UnitCuration(data, unit.index, stats, eval_path, out.open(".dropped.jsonl"))
    offsets = array("q", [0])
    hashes = bytearray()
    piece_starts = array("q")
    piece_hashes = bytearray()
    for doc in formats.iter_documents(unit, data, stats):
        body = curation.apply(doc.strip())
        if body is None:
            continue
        curation.kept(len(offsets) - 1, body)
        raw = body.encode("utf-8")  # never raises: the cleaner replaced lone surrogates
        f.write(raw)
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        hashes += digest
        if len(body) <= data.val_piece_chars:
            piece_starts.append(offsets[-1])
            piece_hashes += digest
        else:
            at = offsets[-1]
            for piece in pieces(body, data.val_piece_chars):
                b = piece.encode("utf-8")
                piece_starts.append(at)
                piece_hashes += hashlib.blake2b(b, digest_size=16).digest()
                at += len(b)
        offsets.append(offsets[-1] + len(raw))
    # Left open: commit() fsyncs and closes every file of the unit.
    np.savez(
        out.open(".npz"),
        offsets=np.frombuffer(offsets, dtype=np.int64),
        hashes=np.frombuffer(hashes, dtype=np.uint8).reshape(-1, 16),
        piece_starts=np.frombuffer(piece_starts, dtype=np.int64),
        piece_hashes=np.frombuffer(piece_hashes, dtype=np.uint8).reshape(-1, 16),
    )
    nd = data.curate.near_dedup
    curated = curation.write(
        out.open(".loc.npz"), out.open(".bands.npy") if nd.enabled else None, nd.partitions
    )
    return out.commit(
        {
            "documents": len(offsets) - 1,
            "bytes": offsets[-1],
            "dropped": dict(stats.dropped),
            "repaired": dict(stats.repaired),
            "locations": stats.locations,
            "bad_files": stats.bad_files,
            "peak_rss_mb": _peak_rss_mb(),
            "cpu_s": time.process_time() - cpu,
            "node_id": _node_id(),
            "curation": curated,
        }
    )


_TOKENIZERS: dict[str, Any] = {}


def _load_tokenizer(path: str) -> Any:
    """One tokenizer per worker process; tokenizers' own thread pool is off (one CPU per task)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if path not in _TOKENIZERS:
        from gptcore import Tokenizer

        _TOKENIZERS[path] = Tokenizer.load(path)
    return _TOKENIZERS[path]


def tokenize_unit(
    unit: WorkUnit,
    data: DataConfig,
    work: str,
    tokenizer_path: str,
    dtype: str,
    spans: np.ndarray,
    val: np.ndarray,
) -> dict[str, Any]:
    """Ray task: token ids of the unit's spans (kept documents, or parts of them, as the driver
    assigned them to splits), each followed by <|endoftext|>, per split. The cleaned text is read
    one batch of spans at a time, never whole."""
    tok = _load_tokenizer(tokenizer_path)
    cpu = time.process_time()  # after the (once per worker) tokenizer load
    wdir = Path(work)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = UnitWriter(wdir / "tok", unit.key)
    files = {"train": out.open(".train"), "val": out.open(".val")}
    tokens = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    src = open(wdir / "clean" / f"{unit.key}.txt", "rb")

    def flush(first: int, stop: int) -> None:
        bounds = spans[first:stop].tolist()
        lo = min(start for start, _ in bounds)
        src.seek(lo)
        raw = src.read(max(end for _, end in bounds) - lo)
        texts = [raw[start - lo : end - lo].decode("utf-8") for start, end in bounds]
        encoded = tok.encode_batch(
            texts, allow_special=False
        )  # "<|endoftext|>" in text is just text
        for split in ("train", "val"):
            chosen = [
                ids
                for ids, v in zip(encoded, val[first:stop], strict=True)
                if v == (split == "val")
            ]
            if not chosen:
                continue
            n = sum(map(len, chosen)) + len(chosen)
            arr = np.fromiter(_with_eot(chosen, tok.eot_id), dtype=np_dtype, count=n)
            files[split].write(arr.tobytes())
            tokens[split] += n
            documents[split] += len(chosen)

    # Batches of spans: up to the one that reaches _BATCH_CHARS of text, and never spanning more
    # than _READ_BYTES of the file (dropped duplicates lie between spans): memory is one batch,
    # whatever the unit. Spans are in file order, so both ends are found by binary search.
    chars = np.cumsum(spans[:, 1] - spans[:, 0])
    with src:
        i = 0
        while i < len(spans):
            before = chars[i] - (spans[i, 1] - spans[i, 0])
            by_chars = int(np.searchsorted(chars, before + _BATCH_CHARS, side="left")) + 1
            by_bytes = int(np.searchsorted(spans[:, 1], spans[i, 0] + _READ_BYTES, side="right"))
            stop = max(i + 1, min(by_chars, by_bytes))
            flush(i, stop)
            i = stop
    return out.commit(
        {
            "tokens": tokens,
            "documents": documents,
            "peak_rss_mb": _peak_rss_mb(),
            "cpu_s": time.process_time() - cpu,
            "node_id": _node_id(),
        }
    )


def _with_eot(docs: list[list[int]], eot: int) -> Iterator[int]:
    for ids in docs:
        yield from ids
        yield eot


def sft_unit(
    unit: WorkUnit,
    data: DataConfig,
    work: str,
    tokenizer_path: str,
    dtype: str,
    chat: bool = False,
    max_tokens: int = 0,
) -> dict[str, Any]:
    """Ray task: fine-tuning examples as token ids, a parallel uint8 loss mask, example lengths and
    content hashes (the driver holds out sft_val by hash, see sft_holdout).

    `chat`: the records are for a base model, written in its tokenizer's chat template; `max_tokens`
    (0: no limit): a longer example is dropped (``longer_than_context``)."""
    tok = _load_tokenizer(tokenizer_path)
    fmt = sft.ChatFormat(tok) if chat else None
    stats = UnitStats()
    np_dtype = np.dtype(dtype).newbyteorder("<")
    out = UnitWriter(Path(work) / "sft", unit.key)
    ids_f, mask_f = out.open(".bin"), out.open(".mask.bin")
    lengths: list[int] = []
    hashes: list[bytes] = []
    where: list[
        tuple[str | None, int | None, int | None]
    ] = []  # each example's record, for a later drop

    def examples() -> Iterator[list[sft.Piece]]:
        for record in formats.iter_unit_records(
            unit, data, stats
        ):  # unreadable files are counted there
            try:  # the record boundary: one record's surprise costs that record only
                parts = sft.segments(record, data, stats, fmt)
            except Exception as e:
                stats.drop(f"record_error.{type(e).__name__}")
                continue
            if parts is not None:
                hashes.append(
                    hashlib.blake2b(json.dumps(parts).encode("utf-8"), digest_size=16).digest()
                )
                where.append((stats.file, stats.line, stats.offset))
                yield parts

    kept_hashes = bytearray()
    for i, (ids, mask) in enumerate(sft.tokenize_examples(examples(), tok, _BATCH_CHARS)):
        reason = (
            "longer_than_context"
            if max_tokens and len(ids) - 1 > max_tokens
            # evaluation finds examples by their one <|endoftext|>; a template that writes it
            # mid-way
            else "end_of_text_inside"
            if chat and tok.eot_id in ids[:-1]
            else None
        )
        if reason:
            stats.file, stats.line, stats.offset = where[i]
            stats.drop(reason)
            continue
        kept_hashes += hashes[i]
        ids_f.write(np.asarray(ids, dtype=np_dtype).tobytes())
        mask_f.write(np.asarray(mask, dtype=np.uint8).tobytes())
        lengths.append(len(ids))
    # Left open: commit() fsyncs and closes every file of the unit.
    np.save(out.open(".len.npy"), np.asarray(lengths, dtype=np.int64))
    np.save(
        out.open(".hash.npy"), np.frombuffer(bytes(kept_hashes), dtype=np.uint8).reshape(-1, 16)
    )
    return out.commit(
        {
            "examples": len(lengths),
            "tokens": int(sum(lengths)),
            "dropped": dict(stats.dropped),
            "repaired": dict(stats.repaired),
            "locations": stats.locations,
            "bad_files": stats.bad_files,
            "peak_rss_mb": _peak_rss_mb(),
        }
    )


def _node_id() -> str | None:
    """The Ray node this task runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
