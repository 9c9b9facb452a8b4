"""Preprocessing inputs: resolve the user's input specs to files, describe them, plan work units.

What it is: everything between input specs (paths, folders, globs, fsspec URLs of ``.txt``/``.md``,
``.jsonl``/``.json``, ``.parquet``, optionally ``.gz``/``.zst``; a Hugging Face ``datasets`` source)
and the list of work units the stage runs as Ray tasks. Work units are planned from the inputs alone
(never from the worker count), so the output is the same however many workers run. Opening an
input (local or fsspec, decompressed) lives here too, since planning sniffs file heads.

What it is not: per-format reading (flows/data/formats.py), cleaning (flows/data/clean.py), or Ray
scheduling (flows/data/stage.py).
"""

from __future__ import annotations

import glob as globlib
import gzip
import logging
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flows.config import ConfigError, DataConfig
from flows.data.clean import looks_binary
from flows.store import DONE, FingerprintCache

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

COMPRESSIONS = {".gz": "gz", ".zst": "zst"}

BLOCK_BYTES = 4 << 20  # bytes read at a time: bounds memory on any input
_SNIFF = 8192

_MIN_UNIT_BYTES = 64 << 10


class InputError(ConfigError):
    """An input the run cannot start from: missing path, unknown format, no usable text."""


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


def describe(paths: list[str], cache: FingerprintCache | None = None) -> list[InputFile]:
    """Size and content fingerprint of each file (sha256 locally, through `cache` when given;
    size+etag/mtime for URLs)."""
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
            fingerprint = f"sha256:{(cache or FingerprintCache(None)).sha256(path)}"
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
        except (OSError, *TRUNCATED_ERRORS):  # a corrupt archive here is counted when its unit is read
            continue
        if head and not looks_binary(head):
            return
    raise InputError(f"{key}: no usable text: every non-empty input looks binary (e.g. {files[0].path})")


def read_head(f: InputFile) -> bytes | None:
    """The first bytes of the (decompressed) file, or None when a broken archive hides them."""
    try:
        with open_input(f) as fh:
            return fh.read(_SNIFF)
    except TRUNCATED_ERRORS:
        return None


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


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


TRUNCATED_ERRORS = _decompress_errors()
