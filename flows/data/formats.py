"""Per-format reading: one work-unit segment of an input file to a stream of cleaned documents.

What it is: the readers of each input format -- plain text and Markdown (one document per file,
cut when too long), JSON and JSONL records (field ``data.text_field``), parquet row groups --
over a byte range or row-group range of one file, reading in bounded blocks: a JSON array is read
element by element, and a JSONL line or JSON element longer than ``data.max_line_bytes`` is
skipped without being held. The rule: every record (line, element, row, file) is kept or counted by
reason, with where the first few of each reason were (UnitStats); any exception while decoding,
parsing or cleaning one record is such a count (``record_error.<type>``), never fatal, and so are
truncated archives and unreadable files.

What it is not: finding files or planning units (flows/data/inputs.py), nor the fine-tuning record
formats (flows/data/sft.py).

Document model: a ``.txt``/``.md`` file is one document; a JSON/JSONL record or a parquet row is one
document; each is cut into pieces of at most ``max_doc_chars`` characters.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from itertools import chain
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
    redact_text,
    redact_url,
)

log = logging.getLogger(__name__)


_ALIGN_WINDOW = 64 << 10  # how far past a range boundary to look for a line break

_BOM = b"\xef\xbb\xbf"


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


def _blocks(fh: IO[bytes], seg: Segment, lines_only: bool, stats: UnitStats) -> Iterator[tuple[int, bytes]]:
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
            log.warning("%s: truncated or corrupt archive (%s); keeping what was read before", stats.file, e)
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
        log.error("cannot read %s (%s: %s); skipping the rest of it", path, type(e).__name__, redact_text(str(e)))
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


def _text_documents(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
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
    (``record_error.<type>``: a dot, not a colon, since each reason becomes an MLflow metric name and
    MLflow refuses colons on Windows) and costs that record only.
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


def _record_documents(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    field_name = data.text_field
    for record in iter_records(fh, seg, data, stats):
        if isinstance(record, dict):
            value = record.get(field_name)
        else:  # a JSON array (or lines) of plain strings: each is a document; other values have no text
            value = record if isinstance(record, str) else None
        yield from _documents(value, data, stats)


def iter_records(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[Any]:
    """JSON values of a .jsonl segment (one per line), or of a .json file (an array, read element
    by element; one value; or JSON lines). Each line or element is a value or a count:
    ``blank_line``, ``malformed_json``, ``json_too_deep``, ``line_too_long``, ``record_too_long``."""
    blocks = _blocks(fh, seg, lines_only=True, stats=stats)
    cap = data.max_line_bytes
    try:
        if seg.file.fmt == "json":
            yield from _json_values(blocks, cap, stats)
        else:
            yield from _parse_lines(_lines(blocks, cap, numbered=seg.start == 0), stats)
    except _Truncated:
        return  # the unfinished record is dropped with the truncation, counted once in _blocks


def _lines(blocks: Iterable[tuple[int, bytes]], cap: int,
           numbered: bool) -> Iterator[tuple[int, int | None, bytes | None]]:
    """(offset, number, bytes) of each line of a stream (without its ``\\n``); numbers count from 1
    when the stream starts the file. The bytes are None for a line longer than `cap`: what is past
    the cap is read and dropped until the next line break, never held."""
    parts: list[bytes] = []
    size, over, number, start = 0, False, 0, -1
    for base, block in blocks:
        if start < 0:
            start = base
        i = 0
        while (j := block.find(b"\n", i)) >= 0:
            number += 1
            if over or size + j - i > cap:
                raw = None
            elif parts:
                parts.append(block[i:j])
                raw = b"".join(parts)
            else:
                raw = block[i:j]
            yield start, number if numbered else None, raw
            parts, size, over = [], 0, False
            i = j + 1
            start = base + i
        if i < len(block) and not over:
            size += len(block) - i
            if size > cap:
                over, parts = True, []
            else:
                parts.append(block[i:])
    if parts or over:
        yield start, number + 1 if numbered else None, None if over else b"".join(parts)


def _parse_lines(lines: Iterator[tuple[int, int | None, bytes | None]], stats: UnitStats) -> Iterator[Any]:
    for offset, number, raw in lines:
        stats.offset, stats.line = offset, number
        if raw is None:
            stats.drop("line_too_long")
        elif not raw.strip():
            stats.drop("blank_line")
        elif (value := _parse(raw, stats)) is not _BAD:
            yield value


def _parse_int(digits: str) -> int | float:
    # Python refuses to convert more than 4300 digits to an int (CVE-2020-10735) and json.loads
    # raises; such a number is never a record's text, so it need not cost the record.
    return int(digits) if len(digits) <= 4000 else float(digits)


_DECODER = json.JSONDecoder(parse_int=_parse_int)
_BAD = object()  # what _parse returns for a record it counted instead


def _decode_json(raw: bytes, stats: UnitStats) -> str:
    # Windows tools start files with a byte-order mark; json.loads rejects it.
    return decode(raw, stats).lstrip("\ufeff")


def _parse(raw: bytes, stats: UnitStats) -> Any:
    """One JSON value, or _BAD and a count: the record boundary of the JSON readers."""
    try:
        return _DECODER.decode(_decode_json(raw, stats))
    except json.JSONDecodeError:
        stats.drop("malformed_json")
    except RecursionError:  # valid JSON nested deeper than Python's parser goes
        stats.drop("json_too_deep")
    except Exception as e:
        stats.drop(f"record_error.{type(e).__name__}")
    return _BAD


def _json_values(blocks: Iterator[tuple[int, bytes]], cap: int, stats: UnitStats) -> Iterator[Any]:
    """The values of a .json file: the elements of a top-level array, streamed; otherwise the file
    as one value when it is at most `cap` bytes and parses, else its lines as JSON lines."""
    first: list[tuple[int, bytes]] = []  # the blocks read so far, from the file's start
    head = b""
    for pos, block in blocks:
        first.append((pos, block))
        head += block
        body = head.removeprefix(_BOM).lstrip()
        if body and not _BOM.startswith(head):  # (a block boundary may cut the byte-order mark)
            break
    else:
        if first:
            stats.offset = 0
            stats.drop("empty")
        return
    at = len(head) - len(body)
    if body[:1] == b"[":
        stats.offset = at
        elements = _array_elements(chain([(at + 1, body[1:])], blocks), cap, stats)
        if (element := next(elements, None)) is None:
            stats.drop("empty")  # [], like an empty file
            return
        for offset, raw in chain([element], elements):
            stats.offset = offset if raw is None else offset + len(raw) - len(raw.lstrip())
            stats.line = None
            if raw is None:
                stats.drop("record_too_long")
            elif (value := _parse(raw, stats)) is not _BAD:
                yield value
        return
    size = len(head)
    whole = size <= cap
    if whole:
        for pos, block in blocks:
            first.append((pos, block))
            size += len(block)
            if size > cap:
                whole = False
                break
    if whole:
        scratch = UnitStats()  # a failed attempt counts nothing: the lines are read next
        try:
            value = _DECODER.decode(_decode_json(b"".join(b for _, b in first), scratch))
        except (ValueError, RecursionError):
            pass
        else:
            stats.repaired.update(scratch.repaired)
            stats.offset = at
            yield value
            return
    yield from _parse_lines(_lines(chain(first, blocks), cap, numbered=True), stats)


# Bytes that matter while looking for an array's element boundaries outside strings, and a string's
# contents up to its closing quote (escapes included) -- both matched in C, not byte by byte.
_STRUCTURE = re.compile(rb'[][{}",]')
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)
_QUOTE, _COMMA, _OPENERS = ord('"'), ord(","), (ord("["), ord("{"))


def _array_elements(blocks: Iterator[tuple[int, bytes]], cap: int,
                    stats: UnitStats) -> Iterator[tuple[int, bytes | None]]:
    """(offset, bytes) of each element of a JSON array whose ``[`` was just read; the bytes are None
    for an element longer than `cap` (skipped, never held).

    Elements are found by following strings and nesting, not by parsing: each is then parsed on its
    own, so a malformed element costs only itself and memory is one element, whatever the file.
    Anything but whitespace after the closing bracket is counted once (``malformed_json``).
    """
    depth, in_string, escaped = 1, False, False
    parts: list[bytes] = []
    size, over, blank, elements, start = 0, False, True, 0, -1
    for base, block in blocks:
        n, i, mark = len(block), 0, 0  # mark: where the current element's bytes in this block begin
        if start < 0:
            start = base
        while i < n:
            if in_string:
                if escaped:  # a backslash ended the previous block: this byte is what it escapes
                    i, escaped = i + 1, False
                    continue
                i = _STRING_BODY.match(block, i).end()  # type: ignore[union-attr]  # matches ""
                if i < n:
                    if block[i] == _QUOTE:
                        in_string = False
                    else:  # a backslash that ends the block
                        escaped = True
                    i += 1
                continue
            m = _STRUCTURE.search(block, i)
            if m is None:
                break
            j = m.start()
            c, i = block[j], j + 1
            if c == _QUOTE:
                in_string = True
                continue
            if c in _OPENERS:
                depth += 1
                continue
            if c != _COMMA:  # a closing bracket or brace
                depth -= 1
                if depth > 0:
                    continue
            elif depth > 1:  # a comma inside an element
                continue
            # A comma between elements, or the array's closing bracket: the element ends at j.
            raw = None if over or size + j - mark > cap else b"".join([*parts, block[mark:j]])
            if c == _COMMA or elements or not blank or block[mark:j].strip():  # not "[ ]"
                yield start, raw
            elements += 1
            parts, size, over, blank, mark, start = [], 0, False, True, i, base + i
            if c != _COMMA:
                _check_trailing(block[i:], base + i, blocks, stats)
                return
        if blank and block[mark:].strip():
            blank = False
        if not over:
            size += n - mark
            if size > cap:
                over, parts = True, []
            else:
                parts.append(block[mark:])
    # The array never closed: what is left is the last element (a cut one fails to parse).
    if start >= 0:
        yield start, None if over else b"".join(parts)


def _check_trailing(rest: bytes, offset: int, blocks: Iterator[tuple[int, bytes]], stats: UnitStats) -> None:
    for base, block in chain([(offset, rest)], blocks):
        if stripped := block.lstrip():
            stats.offset, stats.line = base + len(block) - len(stripped), None
            stats.drop("malformed_json")
            return


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

        raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        return [None if v is None else decode(v, stats) for v in raw.to_pylist()]
