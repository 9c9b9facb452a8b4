"""Per-format reading: one work-unit segment of an input file to a stream of cleaned documents.

What it is: the readers of each input format -- plain text and Markdown (one document per file,
cut when too long), JSON and JSONL records (field ``data.text_field``), parquet row groups --
over a byte range or row-group range of one file, reading in bounded blocks: a JSON array is read
element by element, and a JSONL line or JSON element longer than ``data.max_line_bytes`` is
skipped without being held. The rule: every record (line, element, row, file) is kept or counted by
reason, with where the first few of each reason were (UnitStats); any exception while decoding,
parsing or cleaning one record is such a count (``record_error.<type>``), never fatal, and so are
truncated archives and unreadable files.

What it is not: the JSON parsing itself (flows/data/jsonstream.py), finding files or planning units
(flows/data/inputs.py, units.py), nor the fine-tuning record formats (flows/data/sft.py).

Document model: a ``.txt``/``.md`` file is one document; a JSON/JSONL record or a parquet row is one
document; each is cut into pieces of at most ``max_doc_chars`` characters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import IO, Any

from flows.config import DataConfig
from flows.data import jsonstream
from flows.data.clean import UnitStats, decode, emit_documents, looks_binary, pieces
from flows.data.inputs import BLOCK_BYTES, TRUNCATED_ERRORS, open_input, open_raw, read_head
from flows.data.units import Segment, WorkUnit
from flows.redact import redact_text, redact_url

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


def _blocks(
    fh: IO[bytes], seg: Segment, lines_only: bool, stats: UnitStats
) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of a segment's content in blocks; a truncated or corrupt archive is counted
    (``truncated_archive``) and ends the stream with :class:`_Truncated`."""
    if seg.start == 0 and seg.end is None:
        # Small reads from a decompressor: a truncated stream raises in the read that hits the
        # end, losing only that read's output.
        size = BLOCK_BYTES if seg.file.compression is None else 1 << 16
        read = getattr(fh, "read1", fh.read)
        pos = 0
        try:
            while block := read(size):
                yield pos, block
                pos += len(block)
        except TRUNCATED_ERRORS as e:
            stats.offset, stats.line = pos, None
            stats.drop("truncated_archive")
            log.warning(
                "%s: truncated or corrupt archive (%s); keeping what was read before", stats.file, e
            )
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
        yield pos, block
        pos += len(block)


class _Truncated(Exception):
    """Raised inside a reader when a compressed stream ends early; the partial tail is dropped."""


def iter_documents(unit: WorkUnit, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    """Cleaned documents of a work unit, in order; anything skipped is counted in `stats`."""
    for seg in unit.segments:
        yield from _guarded(seg, stats, _segment_documents(seg, data, stats))


def iter_unit_records(unit: WorkUnit, data: DataConfig, stats: UnitStats) -> Iterator[Any]:
    """The JSON records of a work unit of .jsonl/.json files (fine-tuning inputs), in order."""
    for seg in unit.segments:
        yield from _guarded(seg, stats, _segment_records(seg, data, stats))


def _guarded(seg: Segment, stats: UnitStats, items: Iterator[Any]) -> Iterator[Any]:
    """`items` read from `seg`, located in `stats`; a file that cannot be read, or a reader that
    fails outside any one record, ends the segment with a count instead of the stage."""
    path = redact_url(seg.file.path)  # locations end up in the manifest: no credentials in them
    stats.file, stats.offset, stats.line, stats.row = path, None, None, None
    try:
        yield from items
    except OSError as e:
        stats.drop("unreadable")
        log.error("cannot read %s: %s", path, redact_text(str(e)))
    except Exception as e:  # e.g. pyarrow's ArrowInvalid on a corrupt parquet page
        stats.drop(f"read_error.{type(e).__name__}")
        log.error(
            "cannot read %s (%s: %s); skipping the rest of it",
            path,
            type(e).__name__,
            redact_text(str(e)),
        )
    finally:
        stats.file = stats.offset = stats.line = stats.row = None


def _segment_documents(seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    f = seg.file
    if f.fmt == "parquet":
        yield from _parquet_documents(seg, data, stats)
        return
    if seg.sniff:
        head = read_head(f)
        if head is not None and looks_binary(head):
            if seg.start == 0:  # count a binary file once, not once per range
                stats.drop("binary")
                log.warning("skipping %s: binary content", stats.file)
            return
        if head == b"" and seg.start == 0:
            stats.drop("empty")
            return
    with open_input(f) as fh:
        if f.fmt == "text":
            yield from _text_documents(fh, seg, data, stats)
        else:
            yield from _record_documents(fh, seg, data, stats)


def _segment_records(seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[Any]:
    with open_input(seg.file) as fh:
        yield from iter_records(fh, seg, data, stats)


def _utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` are an incomplete UTF-8 sequence (0 to 3)."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


def _text_documents(
    fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats
) -> Iterator[str]:
    # Decode block by block (carrying a split UTF-8 sequence or a split \r\n to the next block) and
    # cut pieces from a buffer: piece boundaries depend on the text alone, not on block sizes.
    buf = ""
    carry = b""
    max_chars = data.max_doc_chars
    counted = UnitStats()  # repairs are counted once per document, not once per block
    try:
        for pos, block in _blocks(fh, seg, lines_only=False, stats=stats):
            if stats.offset is None:
                stats.offset = pos  # a drop in this document is located at its start
            block = carry + block
            k = _utf8_tail(block)
            carry = block[len(block) - k :] if k else b""
            text = decode(block[: len(block) - k] if k else block, counted)
            if text.endswith("\r"):
                text, carry = text[:-1], b"\r" + carry
            buf += text
            while len(buf) > max_chars * 2:  # keep the buffer bounded on a huge single document
                cut = _first_cut(buf, max_chars)
                yield from _documents(buf[:cut], data, stats)
                buf = buf[cut:]
        if carry:
            buf += decode(carry, counted)
    except _Truncated:
        return  # the unfinished tail is dropped; counted once per file in _blocks
    finally:
        for reason in counted.repaired:
            stats.repaired[reason] += 1
    if not buf.strip():
        stats.drop("empty")
        return
    yield from _documents(buf, data, stats)


def _first_cut(text: str, max_chars: int) -> int:
    return len(next(pieces(text, max_chars)))


def _documents(value: Any, data: DataConfig, stats: UnitStats) -> list[str]:
    """The cleaned documents of one record's text; none (and a count) when it has none.

    The record boundary: whatever one record's text does to the cleaner is counted
    (``record_error.<type>``: a dot, not a colon, since each reason becomes an MLflow metric name
    and MLflow refuses colons on Windows) and costs that record only.
    """
    if value is None:
        stats.drop("missing_text_field")
        return []
    if not isinstance(value, str):
        stats.drop("bad_text_field")
        return []
    try:
        return list(emit_documents(value, data, stats))
    except Exception as e:
        stats.drop(f"record_error.{type(e).__name__}")
        return []


def _record_documents(
    fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats
) -> Iterator[str]:
    field_name = data.text_field
    for record in iter_records(fh, seg, data, stats):
        if isinstance(record, dict):
            value = record.get(field_name)
        else:
            # a JSON array (or lines) of plain strings: each is a document; other values
            # have no text
            value = record if isinstance(record, str) else None
        yield from _documents(value, data, stats)


def iter_records(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[Any]:
    """JSON values of a .jsonl segment (one per line), or of a .json file (an array, read element
    by element; one value; or JSON lines). Each line or element is a value or a count:
    ``blank_line``, ``malformed_json``, ``json_too_deep``, ``line_too_long``,
    ``record_too_long``."""
    blocks = _blocks(fh, seg, lines_only=True, stats=stats)
    cap = data.max_line_bytes
    try:
        if seg.file.fmt == "json":
            yield from jsonstream.file_values(blocks, cap, stats)
        else:
            yield from jsonstream.line_values(blocks, cap, stats, numbered=seg.start == 0)
    except _Truncated:
        return  # the unfinished record is dropped with the truncation, counted once in _blocks


def _parquet_documents(seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    with open_raw(seg.file.path) as fh:
        pf = pq.ParquetFile(fh)
        groups = list(range(seg.start, seg.end if seg.end is not None else pf.num_row_groups))
        if not groups:
            return
        row = sum(pf.metadata.row_group(g).num_rows for g in range(groups[0]))
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[data.text_field]):
            for value in _column_values(batch.column(0), stats):
                stats.row = row
                row += 1
                yield from _documents(value, data, stats)


def _column_values(column: Any, stats: UnitStats) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # Parquet writers need not check that a string column holds UTF-8, and to_pylist raises on
        # the first value that does not: decode each one instead, repairing it (``invalid_utf8``).
        import pyarrow as pa

        raw = column.cast(
            pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        )
        return [None if v is None else decode(v, stats) for v in raw.to_pylist()]
