"""Cleaning documents: decode bytes, repair text, cut long documents, count every repair and drop.

What it is: :class:`UnitStats` (the per-work-unit counters of repairs and drops by reason, with
where the first few drops were), the byte decoder, the text cleaner (lone surrogates, Unicode
normalisation, control characters, line endings, ``min_chars``) and the cutter that splits a
document longer than ``max_doc_chars`` (at a line break when one is near, else at a space).

What it is not: reading files (flows/data/formats.py) or deduplication (flows/data/stage.py).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows.config import DataConfig

log = logging.getLogger(__name__)


# Bytes that never occur in text (NUL, C0 controls other than \t \n \r \f, DEL is allowed-ish).
_BINARY_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))


# Characters removed by cleaning: C0/C1 controls and DEL, except tab and newline.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Lone surrogates: json.loads accepts "\ud800" escapes, but no such string can be written as UTF-8.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


MAX_LOCATIONS = (
    5  # where the first few drops of each reason were, kept per unit and in the manifest
)

# Drop reasons that mean a record could not be read as it was meant to be written -- a broken or
# half-written file, a malformed record -- as opposed to the filters that drop by design (empty,
# too_short, binary, blank_line, the size limits, duplicates, curation): what data.max_drop_fraction
# bounds.
BAD_RECORD_REASONS = frozenset(
    {
        "unreadable",
        "truncated_archive",
        "malformed_json",
        "json_too_deep",
        "missing_text_field",
        "bad_text_field",
        "bad_sft_record",
        "missing_prompt_or_completion",
    }
)
_BAD_RECORD_PREFIXES = ("read_error.", "record_error.")


def is_bad_record(reason: str) -> bool:
    return reason in BAD_RECORD_REASONS or reason.startswith(_BAD_RECORD_PREFIXES)


@dataclass
class UnitStats:
    """Counts one work unit reports: documents dropped and repaired by reason, and where the first
    few drops of each reason were (file, and line, byte offset or row; never the content)."""

    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    locations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Bad-record drops (is_bad_record) per file and reason: which files data.max_drop_fraction
    # names.
    bad_files: dict[str, Counter] = field(default_factory=dict)
    # The record being read, set by the readers: a drop is located there.
    file: str | None = None
    offset: int | None = None  # byte offset in the (decompressed) file
    line: int | None = None  # line number from 1, when the reader started at the file's start
    row: int | None = None  # parquet row

    # Called with (reason, where) for every drop when set: curation's dropped.jsonl
    # (curate/unit.py).
    every: Callable[[str, dict[str, Any]], None] | None = None

    def drop(self, reason: str) -> None:
        """Count one record or document dropped for `reason`, located at the record being read."""
        self.dropped[reason] += 1
        if self.file is None:
            return
        if is_bad_record(reason):
            self.bad_files.setdefault(self.file, Counter())[reason] += 1
        first = self.locations.setdefault(reason, [])
        if len(first) < MAX_LOCATIONS or self.every is not None:
            where: dict[str, Any] = {"file": self.file}
            for key in ("line", "offset", "row"):
                if (value := getattr(self, key)) is not None:
                    where[key] = value
            if len(first) < MAX_LOCATIONS:
                first.append(where)
            if self.every is not None:
                self.every(reason, where)


def merge_locations(
    into: dict[str, list[dict[str, Any]]], other: dict[str, list[dict[str, Any]]]
) -> None:
    """Add `other`'s locations after `into`'s, still at most MAX_LOCATIONS per reason."""
    for reason, where in other.items():
        first = into.setdefault(reason, [])
        first += where[: MAX_LOCATIONS - len(first)]


def looks_binary(head: bytes) -> bool:
    """Heuristic for a file's first bytes: many control bytes, or mostly invalid UTF-8."""
    if not head:
        return False
    control = len(head) - len(head.translate(None, _BINARY_BYTES))
    if control / len(head) > 0.10:
        return True
    text = head.decode("utf-8", errors="replace")
    return text.count("\ufffd") / max(1, len(text)) > 0.10


def decode(data: bytes, stats: UnitStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.repaired["invalid_utf8"] += 1
        return data.decode("utf-8", errors="replace")


def clean(text: str, data: DataConfig, stats: UnitStats) -> str:
    """Lone surrogates to U+FFFD, line endings to \\n, Unicode normalisation, control characters
    (but \\t and \\n) removed: what comes out can always be written as UTF-8."""
    if not text.isascii() and _SURROGATE_RE.search(text):
        stats.repaired["invalid_unicode"] += 1
        text = _SURROGATE_RE.sub("\ufffd", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    form = data.unicode_normalization
    if form != "none" and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    if data.drop_control_chars and _CONTROL_RE.search(text):
        if "\x00" in text:
            stats.repaired["nul_bytes"] += 1
        text, n = _CONTROL_RE.subn("", text)
        if n:
            stats.repaired["control_chars"] += 1
    return text


def pieces(text: str, max_chars: int) -> Iterator[str]:
    """Cut `text` into pieces of at most `max_chars`, at a line break or a space when one is in the
    last half of the window."""
    start = 0
    n = len(text)
    while n - start > max_chars:
        limit = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, limit)
        if cut < 0:
            cut = text.rfind(" ", start + max_chars // 2, limit)
        cut = limit if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def emit_documents(text: str, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    """Clean one raw document, cut it to size, drop what is empty or too short."""
    text = clean(text, data, stats)
    for piece in pieces(text, data.max_doc_chars) if len(text) > data.max_doc_chars else (text,):
        body = piece.strip()
        if not body:
            stats.drop("empty")
        elif len(body) < data.min_chars:
            stats.drop("too_short")
        elif _garbled(body):
            stats.drop("binary")
        else:
            yield piece


def _garbled(text: str) -> bool:
    """Replacement characters in most of a document: binary data that slipped past the sniff."""
    return text.count("\ufffd") > 0.3 * len(text)
