"""Memory is bounded by the work unit, not by a file, a line or a document: what the readers, pass 2
and the driver's deduplication hold, measured with tracemalloc (Python's allocations, numpy's
included) against the size of what they read. Without Ray; read blocks are made small
(``BLOCK_BYTES``) so that small files show the bound. And units are sized by decompressed bytes."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import zstandard

from flows.config import DataConfig
from flows.data import formats, inputs, stage, tasks
from flows.data.clean import UnitStats
from flows.data.units import Segment, WorkUnit, content_size, plan_units
from tests.data.preprocess_data import document

BLOCK = 64 << 10


def _data(**overrides) -> DataConfig:
    base = dict(min_chars=1, min_work_units=1)
    base.update(overrides)
    return DataConfig(**base)


def _peak_while(fn):
    """(result, peak bytes Python allocated while `fn` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _read(path: Path, data: DataConfig) -> tuple[list[str], UnitStats, int]:
    """Documents, counts and peak memory of reading `path` as planned (the plan made beforehand)."""
    units = plan_units(inputs.describe([str(path)]), data)
    stats = UnitStats()
    with mock.patch.object(formats, "BLOCK_BYTES", BLOCK):
        docs, peak = _peak_while(
            lambda: sum((len(d) for u in units for d in formats.iter_documents(u, data, stats)), 0)
        )
    return docs, stats, peak


def _records(n: int) -> list[dict]:
    return [{"text": f"record {i} " + document(i, 150), "id": i} for i in range(n)]


@pytest.mark.parametrize("gz", [False, True], ids=["json", "json.gz"])
def test_a_json_array_is_read_one_element_at_a_time(tmp_path, gz):
    records = _records(4000)
    blob = json.dumps(records, indent=1).encode()
    assert len(blob) > 3_000_000
    path = tmp_path / ("big.json.gz" if gz else "big.json")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    chars, stats, peak = _read(path, _data())
    assert chars == sum(len(r["text"]) for r in records) and not stats.dropped
    assert peak < len(blob) / 8, (
        f"peak {peak:,} bytes reading a {len(blob):,}-byte array"
    )  # it was 3x the file


def test_a_compressed_file_is_sized_by_what_it_decompresses_to(tmp_path):
    blob = "".join(json.dumps(r) + "\n" for r in _records(2000)).encode()
    big = tmp_path / "big.jsonl.gz"
    big.write_bytes(gzip.compress(blob))
    for i in range(3):
        (tmp_path / f"small{i}.txt").write_text(document(i, 100))
    files = inputs.describe([str(big), *(str(p) for p in sorted(tmp_path.glob("*.txt")))])
    assert content_size(files[0]) == len(blob) > 3 * files[0].size
    units = plan_units(files, _data(work_unit_bytes=len(blob) // 2))
    # The archive fills a unit of its own; before, its (compressed) size let the small files join
    # it.
    assert [[s.file.path for s in u.segments] for u in units][0] == [str(big)]


def test_content_size_of_compressed_files(tmp_path):
    blob = "".join(json.dumps(r) + "\n" for r in _records(3000)).encode()
    assert len(blob) > 2 * (1 << 20)

    def size_of(name: str, data: bytes) -> int:
        (tmp_path / name).write_bytes(data)
        return content_size(inputs.describe([str(tmp_path / name)])[0])

    assert size_of("a.jsonl.gz", gzip.compress(blob)) == len(blob)  # the gzip trailer
    assert size_of("b.jsonl.zst", zstandard.ZstdCompressor().compress(blob)) == len(
        blob
    )  # the frame header
    streamed = zstandard.ZstdCompressor().compressobj()  # no content size in the header: measured
    assert 0.5 < size_of("c.jsonl.zst", streamed.compress(blob) + streamed.flush()) / len(blob) < 2
    # Two members: the trailer holds only the last one's size, so the measured ratio is used.
    assert (
        0.5
        < size_of("d.jsonl.gz", gzip.compress(blob[:1000]) + gzip.compress(blob)) / len(blob)
        < 2
    )
    cut = gzip.compress(blob)[:20_000]  # truncated: the "trailer" is compressed data
    assert 20_000 <= size_of("e.jsonl.gz", cut) < 50 * len(blob)
    assert size_of("f.jsonl.gz", b"not gzip at all") == len(b"not gzip at all")


@pytest.mark.parametrize("at_end", [False, True], ids=["then-more-records", "at-the-end"])
def test_a_jsonl_line_over_the_cap_is_counted_never_held(tmp_path, at_end):
    good = [json.dumps({"text": document(i, 60)}) for i in range(4)]
    huge = '{"text": "' + "word " * 800_000  # 4 MB and no newline until the end of the line, if any
    path = tmp_path / "long.jsonl"
    lines = [good[0], huge, *good[1:]] if not at_end else [*good, huge]
    path.write_text("\n".join(lines) + ("" if at_end else "\n"))
    cap = 256 << 10
    chars, stats, peak = _read(path, _data(max_line_bytes=cap))
    assert chars == sum(len(document(i, 60)) for i in range(4))  # every record after it is read
    assert stats.dropped == {"line_too_long": 1}
    assert stats.locations["line_too_long"] == [
        {
            "file": str(path),
            "line": 5 if at_end else 2,
            "offset": len("\n".join(lines[: 4 if at_end else 1])) + 1,
        }
    ]
    assert peak < 2 * cap < len(huge) / 4, f"peak {peak:,} bytes on a {len(huge):,}-byte line"


def test_a_json_element_over_the_cap_is_counted_never_held(tmp_path):
    records = [{"text": document(i, 60)} for i in range(3)]
    records.insert(1, {"text": "word " * 800_000})
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    cap = 256 << 10
    chars, stats, peak = _read(path, _data(max_line_bytes=cap))
    assert chars == sum(len(document(i, 60)) for i in range(3))
    assert stats.dropped == {"record_too_long": 1}
    assert peak < 2 * cap, f"peak {peak:,} bytes"


def test_pass_2_reads_the_cleaned_unit_in_bounded_batches(tmp_path):
    from gptcore import Tokenizer

    docs = [document(i, 120).encode() for i in range(8000)]  # ~7 MB of cleaned text
    work = tmp_path / "work"
    (work / "clean").mkdir(parents=True)
    (work / "tok").mkdir()
    (work / "clean" / "00000.txt").write_bytes(b"".join(docs))
    offsets = np.cumsum([0] + [len(d) for d in docs])
    keep = np.arange(len(docs)) % 3 != 1  # dropped duplicates leave gaps between the spans
    spans = np.stack([offsets[:-1][keep], offsets[1:][keep]], axis=1)
    val = np.zeros(len(spans), dtype=bool)
    val[::7] = True
    tok_path = tmp_path / "tok.json"
    tok = Tokenizer.train([d.decode() for d in docs[:200]], vocab_size=400)
    tok.save(tok_path)
    with (
        mock.patch.object(tasks, "_BATCH_CHARS", 16 << 10),
        mock.patch.object(tasks, "_READ_BYTES", 64 << 10),
    ):
        tasks._load_tokenizer(str(tok_path))  # loaded once per worker, not what is measured
        meta, peak = _peak_while(
            lambda: tasks.tokenize_unit(
                WorkUnit(0, ()), _data(), str(work), str(tok_path), "uint16", spans=spans, val=val
            )
        )
    total = offsets[-1]
    assert peak < total / 8, (
        f"peak {peak:,} bytes for a {total:,}-byte unit"
    )  # it read the unit whole
    kept = [d.decode() for d, k in zip(docs, keep, strict=True) if k]
    want = {
        s: [
            i
            for (text, v) in zip(kept, val, strict=True)
            if v == (s == "val")
            for i in [*tok.encode(text, allow_special=False), tok.eot_id]
        ]
        for s in ("train", "val")
    }
    for split in ("train", "val"):
        got = np.fromfile(work / "tok" / f"00000.{split}", dtype="<u2").tolist()
        assert got == want[split] and meta["tokens"][split] == len(got)


def test_dedup_holds_hashes_not_a_python_object_per_document(tmp_path):
    rng = np.random.default_rng(0)
    units = [WorkUnit(i, (Segment(inputs.InputFile("x", 0, "text", None, "f")),)) for i in range(3)]
    (tmp_path / "clean").mkdir()
    n = 100_000
    pool = rng.integers(0, 256, size=(20 * n, 16), dtype=np.uint8)  # 3n documents, some 7% repeated
    per_unit = [pool[rng.integers(0, len(pool), size=n)] for _ in units]
    for u, h in zip(units, per_unit, strict=True):
        np.savez(tmp_path / "clean" / f"{u.key}.npz", offsets=np.arange(n + 1) * 10_000, hashes=h)
    (keep, duplicates), peak = _peak_while(lambda: stage._dedup(units, tmp_path, enabled=True))
    seen: set[bytes] = set()
    for u, h in zip(units, per_unit, strict=True):
        want = []
        for row in h:
            want.append(row.tobytes() not in seen)
            seen.add(row.tobytes())
        assert keep[u.key].tolist() == want  # the first in input order wins
    assert duplicates == 3 * n - len(seen)
    assert 0 < duplicates < n
    # A set of 16-byte bytes objects took ~90 bytes a document here; the hashes and a sort, ~40.
    assert peak / (3 * n) < 64, f"{peak / (3 * n):.0f} bytes per document"
