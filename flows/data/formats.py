"""Per-format reading: one work-unit segment of an input file to a stream of cleaned documents.

What it is: the readers of each input format -- plain text and Markdown (one document per file,
cut when too long), JSON and JSONL records (field ``data.text_field``), parquet row groups --
over a byte range or row-group range of one file, reading in bounded blocks, with truncated
compressed streams and undecodable records counted, never fatal.

What it is not: finding files or planning units (flows/data/inputs.py), nor the fine-tuning record
formats (flows/data/sft.py).

Document model: a ``.txt``/``.md`` file is one document; a JSON/JSONL record or a parquet row is one
document; each is cut into pieces of at most ``max_doc_chars`` characters.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from flows.config import DataConfig
from flows.data.clean import UnitStats, decode, emit_documents, looks_binary, pieces
from flows.data.inputs import (
    BLOCK_BYTES,
    TRUNCATED_ERRORS,
    Segment,
    WorkUnit,
    open_input,
    open_raw,
    read_head,
)

log = logging.getLogger(__name__)


_ALIGN_WINDOW = 64 << 10  # how far past a range boundary to look for a line break



def _align(fh: IO[bytes], offset: int, size: int, lines_only: bool) -> int:
    """The first position at or after `offset` where a range may start: just after a line break,
    or (text only, when no line break follows within a window) at a UTF-8 character boundary.
    Both neighbours of a boundary compute the same position, so ranges tile the file exactly."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    pos = offset - 1
    fh.seek(pos)
    scanned = 0
    while True:
        block = fh.read(_ALIGN_WINDOW)
        if not block:
            return size
        i = block.find(b"\n")
        if i >= 0:
            return pos + scanned + i + 1
        if not lines_only:
            break
        scanned += len(block)
    # No line break nearby: skip UTF-8 continuation bytes (0b10xxxxxx) after the offset.
    j = 1
    while j < min(len(block), 4) and (block[j] & 0xC0) == 0x80:
        j += 1
    return pos + j


def _blocks(fh: IO[bytes], seg: Segment, lines_only: bool, stats: Counter) -> Iterator[bytes]:
    """The bytes of a segment in blocks; a truncated or corrupt archive ends the stream early
    (counted as ``truncated_archive``)."""
    if seg.start == 0 and seg.end is None:
        # Small reads from a decompressor: a truncated stream raises in the read that hits the
        # end, losing only that read's output.
        size = BLOCK_BYTES if seg.file.compression is None else 1 << 16
        read = getattr(fh, "read1", fh.read)
        try:
            while block := read(size):
                yield block
        except TRUNCATED_ERRORS as e:
            stats["truncated_archive"] += 1
            log.warning("%s: truncated or corrupt archive (%s); keeping what was read before", seg.file.path, e)
            raise _Truncated from e
        return
    size = seg.file.size
    start = _align(fh, seg.start, size, lines_only)
    end = _align(fh, seg.end if seg.end is not None else size, size, lines_only)
    fh.seek(start)
    pos = start
    while pos < end:
        block = fh.read(min(BLOCK_BYTES, end - pos))
        if not block:
            break
        pos += len(block)
        yield block


class _Truncated(Exception):
    """Raised inside a reader when a compressed stream ends early; the partial tail is dropped."""


def iter_documents(unit: WorkUnit, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    """Cleaned documents of a work unit, in order; anything skipped is counted in `stats`."""
    for seg in unit.segments:
        try:
            yield from _segment_documents(seg, data, stats)
        except OSError as e:
            stats.dropped["unreadable"] += 1
            log.error("cannot read %s: %s", seg.file.path, e)


def _segment_documents(seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    f = seg.file
    if f.fmt == "parquet":
        yield from _parquet_documents(seg, data, stats)
        return
    if seg.sniff:
        head = read_head(f)
        if head is not None and looks_binary(head):
            if seg.start == 0:  # count a binary file once, not once per range
                stats.dropped["binary"] += 1
                log.warning("skipping %s: binary content", f.path)
            return
        if head == b"" and seg.start == 0:
            stats.dropped["empty"] += 1
            return
    with open_input(f) as fh:
        if f.fmt == "text":
            yield from _text_documents(fh, seg, data, stats)
        else:
            yield from _record_documents(fh, seg, data, stats)


def _utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` are an incomplete UTF-8 sequence (0 to 3)."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


def _text_documents(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    # Decode block by block (carrying a split UTF-8 sequence or a split \r\n to the next block) and
    # cut pieces from a buffer: piece boundaries depend on the text alone, not on block sizes.
    buf = ""
    carry = b""
    max_chars = data.max_doc_chars
    counted = UnitStats()  # repairs are counted once per document, not once per block
    try:
        for block in _blocks(fh, seg, lines_only=False, stats=stats.dropped):
            block = carry + block
            k = _utf8_tail(block)
            carry = block[len(block) - k :] if k else b""
            text = decode(block[: len(block) - k] if k else block, counted)
            if text.endswith("\r"):
                text, carry = text[:-1], b"\r" + carry
            buf += text
            while len(buf) > max_chars * 2:  # keep the buffer bounded on a huge single document
                cut = _first_cut(buf, max_chars)
                yield from emit_documents(buf[:cut], data, stats)
                buf = buf[cut:]
        if carry:
            buf += decode(carry, counted)
    except _Truncated:
        return  # the unfinished tail is dropped; counted once per file in _blocks
    finally:
        for reason in counted.repaired:
            stats.repaired[reason] += 1
    if not buf.strip():
        stats.dropped["empty"] += 1
        return
    yield from emit_documents(buf, data, stats)


def _first_cut(text: str, max_chars: int) -> int:
    return len(next(pieces(text, max_chars)))


def _record_documents(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    field_name = data.text_field
    for record in iter_records(fh, seg, stats):
        if isinstance(record, str):  # a JSON array (or lines) of plain strings: each is a document
            yield from emit_documents(record, data, stats)
            continue
        if not isinstance(record, dict) or field_name not in record or record[field_name] is None:
            stats.dropped["missing_text_field"] += 1
            continue
        value = record[field_name]
        if not isinstance(value, str):
            stats.dropped["bad_text_field"] += 1
            continue
        yield from emit_documents(value, data, stats)


def iter_records(fh: IO[bytes], seg: Segment, stats: UnitStats) -> Iterator[Any]:
    """JSON values of a .jsonl segment (one per line), or of a .json file (an array, one object, or
    JSON lines). Malformed lines are counted (``malformed_json``) and skipped."""
    if seg.file.fmt == "json":
        raw = b"".join(_safe_blocks(fh, seg, stats))
        stripped = raw.removeprefix(b"\xef\xbb\xbf").lstrip()
        if stripped[:1] in (b"[", b"{"):
            try:
                value = json.loads(_decode_json(raw, stats))
            except json.JSONDecodeError:
                value = None  # maybe JSON lines in a .json file: fall through
            else:
                yield from value if isinstance(value, list) else [value]
                return
        yield from _parse_lines(_split_lines([raw]), stats)
        return
    yield from _parse_lines(_split_lines(_safe_blocks(fh, seg, stats)), stats)


def _safe_blocks(fh: IO[bytes], seg: Segment, stats: UnitStats) -> Iterator[bytes]:
    try:
        yield from _blocks(fh, seg, lines_only=True, stats=stats.dropped)
    except _Truncated:
        # The partial last line is dropped with the truncation, counted once in _blocks.
        yield b"\n\x00truncated"


def _split_lines(blocks: Iterator[bytes] | list[bytes]) -> Iterator[bytes]:
    parts: list[bytes] = []
    for block in blocks:
        if block == b"\n\x00truncated":
            return  # drop the incomplete tail
        start = 0
        while (i := block.find(b"\n", start)) >= 0:
            parts.append(block[start:i])
            yield b"".join(parts)
            parts = []
            start = i + 1
        if start < len(block):
            parts.append(block[start:])
    if parts:
        yield b"".join(parts)


def _decode_json(raw: bytes, stats: UnitStats) -> str:
    # Windows tools start files with a byte-order mark; json.loads rejects it.
    return decode(raw, stats).lstrip("\ufeff")


def _parse_lines(lines: Iterator[bytes], stats: UnitStats) -> Iterator[Any]:
    for line in lines:
        if not line.strip():
            continue
        try:
            yield json.loads(_decode_json(line, stats))
        except json.JSONDecodeError:
            stats.dropped["malformed_json"] += 1


def _parquet_documents(seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    with open_raw(seg.file.path) as fh:
        pf = pq.ParquetFile(fh)
        groups = list(range(seg.start, seg.end if seg.end is not None else pf.num_row_groups))
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[data.text_field]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    stats.dropped["missing_text_field"] += 1
                elif not isinstance(value, str):
                    stats.dropped["bad_text_field"] += 1
                else:
                    yield from emit_documents(value, data, stats)
