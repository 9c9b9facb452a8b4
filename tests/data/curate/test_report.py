"""The curation summary table and the up-front check of decontamination files (no Ray)."""

from __future__ import annotations

import pytest

from flows.config import CurateConfig, DataConfig, PipelineConfig, TrackingConfig
from flows.data.curate.report import table
from flows.data.inputs import InputError
from tests.steps import preprocess


def test_the_table_lists_kept_and_each_reason_with_pii_and_clusters():
    report = {
        "kept": {"documents": 1200, "bytes": 2_100_000, "tokens": 600_000},
        "dropped": {
            "near_duplicate": {"documents": 9, "bytes": 10_300, "tokens": 2_900},
            "gopher_short_doc": {"documents": 3, "bytes": 120, "tokens": 30},
        },
        "pii_mode": "redact",
        "pii": {"email": 39, "ip": 4},
        "near_dedup": {"clusters": 4, "dropped": 9, "records": 9814, "partitions": 16},
    }
    lines = table(report).splitlines()
    assert lines[0] == "curation:"
    assert lines[2].split() == ["kept", "1,200", "2.1M", "600.0k"]
    assert lines[3].split() == ["dropped:", "near_duplicate", "9", "10.3k", "~2.9k"]
    assert lines[4].split()[:3] == ["dropped:", "gopher_short_doc", "3"]
    assert lines[5] == "  PII redact: email 39, ip 4"
    assert lines[6].startswith("  near-duplicate clusters: 4 (9 dropped")


def test_a_missing_decontamination_file_fails_before_any_work(tmp_path):
    (tmp_path / "a.txt").write_text("Some text that is long enough to be a document of its own.\n")
    cfg = PipelineConfig(
        workdir=str(tmp_path / "w"),
        tracking=TrackingConfig(enabled=False),
        data=DataConfig(
            inputs=(str(tmp_path / "a.txt"),),
            curate=CurateConfig(decontaminate=(str(tmp_path / "eval.jsonl"),)),
        ),
    )
    with pytest.raises(InputError, match=r"data.curate.decontaminate: .*eval.jsonl is not a file"):
        preprocess(cfg)
