"""Work units: the pieces of the corpus that the preprocess stage runs as Ray tasks.

What it is: :class:`Segment` (a byte range or row-group range of one input file), :class:`WorkUnit`
(consecutive segments in input order) and :func:`plan_units`, which groups small files and splits
large ones into units of about :func:`unit_size` bytes, counted as what a worker reads
(:func:`content_size`: decompressed bytes of a compressed file). Units are planned from the inputs
alone (never from the worker count), so the output is the same however many workers run.

What it is not: finding or opening the files (flows/data/inputs.py), nor reading a segment
(flows/data/formats.py aligns its byte range to a line or character boundary).
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

from flows.config import DataConfig
from flows.data.inputs import TRUNCATED_ERRORS, InputFile, open_raw

_MIN_UNIT_BYTES = 64 << 10


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


def unit_size(data: DataConfig, total_bytes: int) -> int:
    """Bytes per work unit: small enough that the corpus splits into ``min_work_units`` units
    (so workers share it evenly), never more than ``work_unit_bytes`` (the memory bound)."""
    even = math.ceil(total_bytes / max(1, data.min_work_units))
    return max(1, min(data.work_unit_bytes, max(_MIN_UNIT_BYTES, even)))


_RATIO_SAMPLE = 1 << 20  # compressed bytes decompressed to measure a file's ratio
_RATIO_OUTPUT = 64 << 20  # at most this much output from them (a highly compressible head)


def content_size(f: InputFile) -> int:
    """Bytes a worker reads from `f`: its size, or for a compressed file its decompressed size,
    estimated without reading it all -- the size in the gzip trailer or the zstd frame header when
    it agrees (within 4x) with the ratio measured on the first MiB, else that measured estimate (a
    multi-member gzip's trailer holds only its last member, and sizes over 4 GiB wrap)."""
    if f.compression is None or f.size == 0:
        return f.size
    try:
        with open_raw(f.path) as fh:
            head = fh.read(_RATIO_SAMPLE)
            exact: int | None = None
            if f.compression == "gz":
                fh.seek(max(0, f.size - 4))
                exact = int.from_bytes(fh.read(4), "little")
        if f.compression == "gz":
            out = used = 0
            rest = head
            while rest and out < _RATIO_OUTPUT:  # member after member
                d = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip (or zlib) header
                out += len(d.decompress(rest, _RATIO_OUTPUT - out))
                used += len(rest) - len(d.unused_data) - len(d.unconsumed_tail)
                rest = d.unused_data
        else:
            import zstandard

            params = zstandard.get_frame_parameters(head)
            if params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
                exact = params.content_size
            raw = io.BytesIO(head)
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            out = len(reader.read(_RATIO_OUTPUT))
            used = raw.tell()
    except (OSError, ValueError, *TRUNCATED_ERRORS):
        return f.size  # a broken archive is counted when its unit is read
    measured = max(f.size, round(f.size * out / max(1, used)))
    if exact is not None and measured / 4 <= exact <= measured * 4:
        return exact
    return measured


def plan_units(files: list[InputFile], data: DataConfig) -> list[WorkUnit]:
    """Group small files and split large ones into units of about :func:`unit_size` bytes, counted
    as what a worker reads (:func:`content_size`: decompressed bytes of a compressed file, which is
    one unit, since a compressed stream cannot be entered in the middle)."""
    sizes = {f.path: content_size(f) for f in files}
    target = unit_size(data, sum(sizes.values()))
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
            size = _segment_bytes(seg, sizes[f.path])
            if current and current_bytes + size > target:
                flush()
            current.append(seg)
            current_bytes += size
            if current_bytes >= target:
                flush()
    flush()
    return [WorkUnit(i, tuple(segs)) for i, segs in enumerate(units)]


def _segment_bytes(seg: Segment, content: int) -> int:
    if seg.file.fmt == "parquet":
        return max(1, seg.file.size)  # rough; row groups were already sized
    end = content if seg.end is None else seg.end
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
