"""Streaming JSON: the values of a JSON Lines stream or a ``.json`` file, read in blocks.

What it is: :func:`line_values` (one value per line of a ``.jsonl`` range) and :func:`file_values`
(a ``.json`` file: the elements of a top-level array, streamed element by element; else the file
as one value when small enough; else its lines as JSON lines). Memory is one line or element,
whatever the file: a line or element longer than the cap is skipped without being held. Each is a
value or a count in UnitStats, located by offset (and line number): ``blank_line``,
``malformed_json``, ``json_too_deep``, ``line_too_long``, ``record_too_long``, ``empty``.

What it is not: reading the blocks from a file range (flows/data/formats.py hands them in), nor
knowing what a record means (a document's text field there, a fine-tuning record in
flows/data/sft.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

from flows.data.clean import UnitStats, decode

_BOM = b"\xef\xbb\xbf"


def line_values(
    blocks: Iterable[tuple[int, bytes]], cap: int, stats: UnitStats, numbered: bool
) -> Iterator[Any]:
    """The JSON value of each line of a stream of (offset, bytes) blocks; lines are numbered from 1
    when `numbered` (the stream starts the file)."""
    return _parse_lines(_lines(blocks, cap, numbered), stats)


def _lines(
    blocks: Iterable[tuple[int, bytes]], cap: int, numbered: bool
) -> Iterator[tuple[int, int | None, bytes | None]]:
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


def _parse_lines(
    lines: Iterator[tuple[int, int | None, bytes | None]], stats: UnitStats
) -> Iterator[Any]:
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


def file_values(blocks: Iterator[tuple[int, bytes]], cap: int, stats: UnitStats) -> Iterator[Any]:
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


def _array_elements(
    blocks: Iterator[tuple[int, bytes]], cap: int, stats: UnitStats
) -> Iterator[tuple[int, bytes | None]]:
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


def _check_trailing(
    rest: bytes, offset: int, blocks: Iterator[tuple[int, bytes]], stats: UnitStats
) -> None:
    for base, block in chain([(offset, rest)], blocks):
        if stripped := block.lstrip():
            stats.offset, stats.line = base + len(block) - len(stripped), None
            stats.drop("malformed_json")
            return
