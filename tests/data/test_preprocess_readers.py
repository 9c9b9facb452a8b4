"""Readers without Ray: byte-range work units tile a file exactly, cleaning rules, the builtin
corpus."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.config import DataConfig
from flows.data import clean, formats, inputs
from flows.data.clean import UnitStats
from flows.data.units import plan_units


def _docs(paths: list[Path], data: DataConfig) -> tuple[list[str], int, UnitStats]:
    files = inputs.describe([str(p) for p in paths])
    units = plan_units(files, data)
    stats = UnitStats()
    docs = [d for u in units for d in formats.iter_documents(u, data, stats)]
    return docs, len(units), stats


def test_jsonl_byte_ranges_return_every_record_once_in_order(tmp_path):
    path = tmp_path / "r.jsonl"
    texts = [f"record {i} " + "é∂ word " * (i % 37 + 5) for i in range(3000)]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    whole, n_whole, _ = _docs([path], DataConfig(min_chars=1, min_work_units=1))
    split, n_split, stats = _docs(
        [path], DataConfig(min_chars=1, min_work_units=1, work_unit_bytes=10_000)
    )
    assert n_whole == 1 and n_split > 20
    assert whole == split == texts and not stats.dropped


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Cf")), min_size=1, max_size=3000
    ),
    step=st.integers(min_value=1, max_value=400),
    newlines=st.booleans(),
)
def test_text_ranges_tile_the_file_at_character_boundaries(tmp_path, text, step, newlines):
    if newlines:
        text = text.replace("a", "\n")
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    data = DataConfig(
        min_chars=0,
        max_doc_chars=step,
        work_unit_bytes=step,
        min_work_units=1,
        unicode_normalization="none",
    )
    docs, _, stats = _docs([path], data)
    assert "invalid_utf8" not in stats.repaired  # no range was cut inside a character
    assert all(len(d) <= step for d in docs)
    # Whitespace-only pieces are dropped (counted as empty); every other character survives, in
    # order.
    assert "".join("".join(docs).split()) == "".join(text.split())


def test_cleaning_normalises_line_endings_unicode_and_controls():
    stats = UnitStats()
    data = DataConfig()
    assert clean.clean("a\r\nb\rc\u0065\u0301\x07\x00d\te", data, stats) == "a\nb\nc\u00e9d\te"
    assert stats.repaired == Counter({"nul_bytes": 1, "control_chars": 1})
    keep = DataConfig(drop_control_chars=False, unicode_normalization="none")
    assert clean.clean("e\u0301\x07", keep, UnitStats()) == "e\u0301\x07"


def test_long_documents_are_cut_at_line_breaks():
    text = ("x" * 30 + "\n") * 10
    parts = list(clean.pieces(text, 100))
    assert "".join(parts) == text and all(len(p) <= 100 for p in parts)
    assert all(p.endswith("\n") for p in parts)


@pytest.mark.slow
def test_builtin_corpus_is_python_docs_written_once(tmp_path):
    from flows.data.corpus import materialize

    dest = materialize(tmp_path / "python-docs")
    files = sorted(p.name for p in dest.glob("*.txt"))
    assert any(f.startswith("topic-") for f in files) and "module-json.__init__.txt" in files
    assert sum(p.stat().st_size for p in dest.glob("*.txt")) > 1_000_000
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    materialize(dest)
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
