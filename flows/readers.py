"""Raw inputs for preprocessing: find files, plan work units, read and clean documents.

What it is: everything between a user's input specs (paths, folders, globs, fsspec URLs of
``.txt``/``.md``, ``.jsonl``/``.json``, ``.parquet``, optionally ``.gz``/``.zst``) and a stream of
cleaned documents, with every repair and every skip counted by reason. Work units are planned from
the inputs alone (never from the worker count), so the output is the same however many workers run.

What it is not: tokenization, deduplication or Ray scheduling (flows/preprocess.py), nor the
fine-tuning record formats (flows/sft.py).

Document model: a ``.txt``/``.md`` file is one document; one longer than ``max_doc_chars`` is cut
into pieces of at most that many characters (at a line break when one is near, else at a space).
A JSON/JSONL record or a parquet row is one document (cut the same way when too long).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import logging
import math
import os
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flows.config import ConfigError, DataConfig
from flows.outputs import DONE

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
_BLOCK = 4 << 20  # bytes read at a time: bounds memory on any input
_ALIGN_WINDOW = 64 << 10  # how far past a range boundary to look for a line break
_SNIFF = 8192
_MIN_UNIT_BYTES = 64 << 10

# Bytes that never occur in text (NUL, C0 controls other than \t \n \r \f, DEL is allowed-ish).
_BINARY_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))
# Characters removed by cleaning: C0/C1 controls and DEL, except tab and newline.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class InputError(ConfigError):
    """An input the run cannot start from: missing path, unknown format, no usable text."""


# --------------------------------------------------------------------------- inputs and plan


@dataclass(frozen=True)
class InputFile:
    """One input file, resolved: where it is, how to read it, and a fingerprint of its content."""

    path: str
    size: int
    fmt: str  # text | jsonl | json | parquet
    compression: str | None  # gz | zst | None
    fingerprint: str


@dataclass(frozen=True)
class Segment:
    """Part of one input file: a byte range (text, jsonl) or a row-group range (parquet)."""

    file: InputFile
    start: int = 0
    end: int | None = None  # None: to the end of the file
    sniff: bool = True  # check the file's head for binary content


@dataclass(frozen=True)
class WorkUnit:
    """What one Ray task reads: consecutive segments in input order."""

    index: int
    segments: tuple[Segment, ...]

    @property
    def key(self) -> str:
        return f"{self.index:05d}"


def is_url(spec: str) -> bool:
    return "://" in spec


def classify(path: str) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, or None when the format is not supported."""
    name = path.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            if fmt == "parquet" and compression:
                return None  # parquet compresses inside; a .parquet.gz is not readable by row group
            return fmt, compression
    return None


def resolve_paths(specs: tuple[str, ...], key: str, skipped: Counter) -> list[str]:
    """Expand files, folders and globs (local or fsspec) into files in input order.

    Raises InputError naming the spec when one matches nothing. Files in a folder with an
    unsupported suffix are skipped and counted (``unsupported_file``); an unsupported file named
    directly is an error.
    """
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        found = _expand(spec, key)
        for path, explicit in found:
            if classify(path) is None:
                if explicit:
                    raise InputError(
                        f"{key}: {path} has an unsupported format; supported: "
                        f"{', '.join(FORMATS)} (optionally {', '.join(COMPRESSIONS)})"
                    )
                skipped["unsupported_file"] += 1
                log.warning("skipping %s: not one of %s", path, ", ".join(FORMATS))
                continue
            if path not in seen:  # the same file named twice would only produce duplicates
                seen.add(path)
                out.append(path)
    return out


def _expand(spec: str, key: str) -> list[tuple[str, bool]]:
    if is_url(spec):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(spec)
        files: list[tuple[str, bool]] = []
        for p in sorted(paths):
            if fs.isdir(p):
                files += [(fs.unstrip_protocol(f), False) for f in sorted(fs.find(p))]
            elif fs.exists(p):
                # unstrip_protocol, not f"{protocol}://{p}": http(s) paths keep their protocol
                files.append((fs.unstrip_protocol(p), not globlib.has_magic(spec)))
        if not files:
            raise InputError(f"{key}: {spec} does not exist or matches no files")
        return files
    if globlib.has_magic(spec):
        matches = sorted(globlib.glob(spec, recursive=True))
        files = []
        for m in matches:
            files += _expand_local(Path(m), explicit=False)
        if not files:
            raise InputError(f"{key}: the pattern {spec} matches no files")
        return files
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{key}: {spec} does not exist")
    return _expand_local(path, explicit=True)


def _expand_local(path: Path, explicit: bool) -> list[tuple[str, bool]]:
    if path.is_dir():
        return [
            (str(p.resolve()), False)
            for p in sorted(path.rglob("*"))
            # Hidden files and stage DONE markers are bookkeeping, not corpus.
            if p.is_file() and p.name != DONE
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    return [(str(path.resolve()), explicit)]


def describe(paths: list[str]) -> list[InputFile]:
    """Size and content fingerprint of each file (sha256 locally; size+etag/mtime for URLs)."""
    out = []
    for path in paths:
        fmt, compression = classify(path)  # type: ignore[misc]  # resolve_paths filtered these
        if is_url(path):
            import fsspec

            fs, _, (p,) = fsspec.get_fs_token_paths(path)
            info = fs.info(p)
            size = int(info.get("size") or 0)
            tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or ""
            fingerprint = f"size={size};tag={tag}"
        else:
            size = os.path.getsize(path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(_BLOCK):
                    h.update(block)
            fingerprint = f"sha256:{h.hexdigest()}"
        out.append(InputFile(path, size, fmt, compression, fingerprint))
    return out


def check_usable(files: list[InputFile], key: str) -> None:
    """Fail before any Ray work when no file can hold text (all empty or all binary)."""
    if not files:
        raise InputError(f"{key}: no input files")
    if all(f.size == 0 for f in files):
        raise InputError(f"{key}: every input file is empty ({len(files)} files, e.g. {files[0].path})")
    for f in files:
        if f.size == 0:
            continue
        if f.fmt == "parquet":
            return
        try:
            with open_input(f) as fh:
                head = fh.read(_SNIFF)
        except (OSError, *_TRUNCATED):  # a corrupt archive here is counted when its unit is read
            continue
        if head and not looks_binary(head):
            return
    raise InputError(f"{key}: no usable text: every non-empty input looks binary (e.g. {files[0].path})")


def unit_size(data: DataConfig, total_bytes: int) -> int:
    """Bytes per work unit: small enough that the corpus splits into ``min_work_units`` units
    (so workers share it evenly), never more than ``work_unit_bytes`` (the memory bound)."""
    even = math.ceil(total_bytes / max(1, data.min_work_units))
    return max(1, min(data.work_unit_bytes, max(_MIN_UNIT_BYTES, even)))


def plan_units(files: list[InputFile], data: DataConfig) -> list[WorkUnit]:
    """Group small files and split large ones into units of about :func:`unit_size` bytes."""
    target = unit_size(data, sum(f.size for f in files))
    # A text file is one document, so cutting it more finely than max_doc_chars would insert
    # document boundaries that the piece size alone would not.
    text_range = max(target, min(data.max_doc_chars, data.work_unit_bytes))
    units: list[list[Segment]] = []
    current: list[Segment] = []
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            units.append(current)
        current, current_bytes = [], 0

    for f in files:
        segments: list[Segment] = []
        if f.fmt == "parquet":
            segments = _parquet_segments(f, target)
        elif f.compression is None and f.fmt in ("text", "jsonl"):
            step = text_range if f.fmt == "text" else target
            if f.size > step:
                segments = [
                    Segment(f, start, min(start + step, f.size), sniff=True)
                    for start in range(0, f.size, step)
                ]
        if not segments:
            segments = [Segment(f)]
        for seg in segments:
            size = _segment_bytes(seg)
            if current and current_bytes + size > target:
                flush()
            current.append(seg)
            current_bytes += size
            if current_bytes >= target:
                flush()
    flush()
    return [WorkUnit(i, tuple(segs)) for i, segs in enumerate(units)]


def _segment_bytes(seg: Segment) -> int:
    if seg.file.fmt == "parquet":
        return max(1, seg.file.size)  # rough; row groups were already sized
    end = seg.file.size if seg.end is None else seg.end
    return max(1, end - seg.start)


def _parquet_segments(f: InputFile, target: int) -> list[Segment]:
    import pyarrow.parquet as pq

    with open_raw(f.path) as fh:
        meta = pq.ParquetFile(fh).metadata
    segments, start, acc = [], 0, 0
    for rg in range(meta.num_row_groups):
        acc += meta.row_group(rg).total_byte_size
        if acc >= target:
            segments.append(Segment(f, start, rg + 1, sniff=False))
            start, acc = rg + 1, 0
    if start < meta.num_row_groups or not segments:
        segments.append(Segment(f, start, meta.num_row_groups, sniff=False))
    return segments


def check_parquet_field(files: list[InputFile], text_field: str, key: str) -> None:
    """A parquet file without the text column is a config error, raised before any Ray work."""
    import pyarrow.parquet as pq

    for f in files:
        if f.fmt != "parquet":
            continue
        with open_raw(f.path) as fh:
            names = pq.ParquetFile(fh).schema_arrow.names
        if text_field not in names:
            raise InputError(
                f"{key}: {f.path} has no column {text_field!r} (columns: {', '.join(names)}); "
                "set data.text_field"
            )


# --------------------------------------------------------------------------- opening files


def open_raw(path: str) -> IO[bytes]:
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def open_input(f: InputFile) -> IO[bytes]:
    """A binary stream of the file's (decompressed) content."""
    raw = open_raw(f.path)
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if f.compression == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return raw


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


_TRUNCATED = _decompress_errors()


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
        size = _BLOCK if seg.file.compression is None else 1 << 16
        read = getattr(fh, "read1", fh.read)
        try:
            while block := read(size):
                yield block
        except _TRUNCATED as e:
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
        block = fh.read(min(_BLOCK, end - pos))
        if not block:
            break
        pos += len(block)
        yield block


class _Truncated(Exception):
    """Raised inside a reader when a compressed stream ends early; the partial tail is dropped."""


# --------------------------------------------------------------------------- cleaning


@dataclass
class UnitStats:
    """Counts one work unit reports: documents dropped and repaired by reason."""

    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)


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
    """Line endings to \\n, Unicode normalisation, control characters (but \\t and \\n) removed."""
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


# --------------------------------------------------------------------------- documents


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
        head = _head(f)
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


def _head(f: InputFile) -> bytes | None:
    """The first bytes of the (decompressed) file, or None when a broken archive hides them."""
    try:
        with open_input(f) as fh:
            return fh.read(_SNIFF)
    except _TRUNCATED:
        return None


def _emit(text: str, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    """Clean one raw document, cut it to size, drop what is empty or too short."""
    text = clean(text, data, stats)
    for piece in pieces(text, data.max_doc_chars) if len(text) > data.max_doc_chars else (text,):
        body = piece.strip()
        if not body:
            stats.dropped["empty"] += 1
        elif len(body) < data.min_chars:
            stats.dropped["too_short"] += 1
        elif _garbled(body):
            stats.dropped["binary"] += 1
        else:
            yield piece


def _garbled(text: str) -> bool:
    """Replacement characters in most of a document: binary data that slipped past the sniff."""
    return text.count("\ufffd") > 0.3 * len(text)


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
                yield from _emit(buf[:cut], data, stats)
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
    yield from _emit(buf, data, stats)


def _first_cut(text: str, max_chars: int) -> int:
    return len(next(pieces(text, max_chars)))


def _record_documents(fh: IO[bytes], seg: Segment, data: DataConfig, stats: UnitStats) -> Iterator[str]:
    field_name = data.text_field
    for record in iter_records(fh, seg, stats):
        if isinstance(record, str):  # a JSON array (or lines) of plain strings: each is a document
            yield from _emit(record, data, stats)
            continue
        if not isinstance(record, dict) or field_name not in record or record[field_name] is None:
            stats.dropped["missing_text_field"] += 1
            continue
        value = record[field_name]
        if not isinstance(value, str):
            stats.dropped["bad_text_field"] += 1
            continue
        yield from _emit(value, data, stats)


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
                    yield from _emit(value, data, stats)


# --------------------------------------------------------------------------- Hugging Face datasets


def export_hf_dataset(data: DataConfig, cache_dir: Path) -> InputFile:
    """Load ``data.hf_dataset`` with the `datasets` library and write its text column as parquet.

    A local ``save_to_disk`` directory is opened with ``load_from_disk``; anything else goes to
    ``load_dataset`` (a hub name on a cluster, or a builder such as ``json`` with
    ``hf_data_files``). The parquet copy, named by the dataset's fingerprint, is then an ordinary
    input planned by row group, so workers on any node read it from the (shared) workdir.
    """
    import datasets

    source = data.hf_dataset or ""
    try:
        local = Path(source)
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")
        if local.is_dir() and any((local / name).exists() for name in saved):
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(
                source, data.hf_config, split=data.hf_split, data_files=list(data.hf_data_files) or None
            )
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise InputError(f"data.hf_dataset={source!r}: cannot load it with `datasets` ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if data.hf_split not in ds:
            raise InputError(f"data.hf_split={data.hf_split!r}: {source} has splits {', '.join(ds)}")
        ds = ds[data.hf_split]
    if data.text_field not in ds.column_names:
        raise InputError(
            f"data.text_field={data.text_field!r}: {source} has columns {', '.join(ds.column_names)}"
        )
    fingerprint = f"hf:{ds._fingerprint}"
    path = cache_dir / f"{ds._fingerprint}.parquet"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{path.name}.tmp-{os.getpid()}"
        ds.select_columns([data.text_field]).to_parquet(str(tmp), batch_size=10_000)
        os.replace(tmp, path)
    return InputFile(str(path), path.stat().st_size, "parquet", None, fingerprint)
