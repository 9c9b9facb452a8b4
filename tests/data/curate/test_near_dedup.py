"""Near-duplicate search: MinHash band keys on strings, the shuffle and components as real Ray tasks
on a synthetic corpus with ground truth, and through preprocess (dropped.jsonl, the report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.config import (
    CurateConfig,
    DataConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
    TrackingConfig,
)
from flows.data.curate.minhash import MinHasher, jaccard
from flows.data.curate.shuffle import (
    RECORD,
    bucket_partition,
    components,
    label_components,
    write_bands,
)
from tests.data.curate.texts import edited, prose, unrelated


def test_band_keys_agree_for_copies_and_differ_for_unrelated_texts():
    h = MinHasher()
    a = prose(1, 20)
    assert (h.band_keys(a) == h.band_keys(a + "\n")).all()  # whitespace and case do not matter
    assert (h.band_keys(a) == h.band_keys(a.upper())).all()
    assert not (h.band_keys(a) == h.band_keys(unrelated(1))).any()
    assert h.band_keys("!!! ... ---") is None  # no words: no bucket
    close = edited(a, 0.02, seed=3)
    assert jaccard(a, close) > 0.7 and (h.band_keys(a) == h.band_keys(close)).any()
    assert MinHasher(seed=1).band_keys(a).tolist() != h.band_keys(a).tolist()


def test_components_take_the_smallest_id_of_each_cluster():
    edges = np.array([[5, 3], [9, 5], [7, 8], [2, 20], [20, 21]], dtype=np.uint64)
    nodes, roots = label_components(edges)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == {
        2: 2,
        3: 3,
        5: 3,
        7: 7,
        8: 7,
        9: 3,
        20: 2,
        21: 2,
    }
    # A long chain needs many propagation rounds: still one component.
    chain = np.stack([np.arange(1, 500), np.arange(0, 499)], axis=1).astype(np.uint64)[::-1]
    assert set(label_components(chain)[1].tolist()) == {0}


def _ground_truth(n: int = 60) -> tuple[list[str], dict[int, int]]:
    """Originals, exact copies, 2 %-edited copies, half-edited copies and unrelated documents; the
    original each copy should be merged with (by position)."""
    docs: list[str] = []
    truth: dict[int, int] = {}
    for i in range(n):
        original = unrelated(10_000 + i, 200)
        docs.append(original)
        o = len(docs) - 1
        docs.append(original)
        truth[len(docs) - 1] = o
        docs.append(edited(original, 0.02, seed=i))
        truth[len(docs) - 1] = o
        docs.append(edited(original, 0.5, seed=i))  # should NOT be merged
        docs.append(unrelated(20_000 + i, 200))
    return docs, truth


def test_shuffle_as_ray_tasks_finds_the_planted_duplicates(tmp_path, ray_local):
    import ray

    docs, truth = _ground_truth()
    h = MinHasher()
    units = [docs[i : i + 50] for i in range(0, len(docs), 50)]  # 6 units
    files = []
    for u, texts in enumerate(units):
        keys = np.stack([h.band_keys(t) for t in texts])
        with open(tmp_path / f"{u}.npy", "wb") as f:
            bounds = write_bands(f, u, keys, np.arange(len(texts)), partitions=4)
        assert (
            len(np.load(tmp_path / f"{u}.npy")) == 14 * len(texts)
            and np.load(tmp_path / f"{u}.npy").dtype == RECORD
        )
        files.append((str(tmp_path / f"{u}.npy"), bounds.tolist()))
    task = ray.remote(bucket_partition)
    figures = ray.get([task.remote(files, p, str(tmp_path / f"p{p}.npy")) for p in range(4)])
    assert sum(f["records"] for f in figures) == 14 * len(docs)
    result = ray.get(
        ray.remote(components).remote(
            [str(tmp_path / f"p{p}.npy") for p in range(4)], str(tmp_path / "dups.npy")
        )
    )
    pairs = np.load(tmp_path / "dups.npy")

    def position(doc: int) -> int:
        return (doc >> 32) * 50 + (doc & 0xFFFFFFFF)

    found = {position(d): position(r) for d, r in pairs.tolist()}
    exact = [i for i in truth if docs[i] == docs[truth[i]]]
    close = [i for i in truth if i not in exact]
    assert all(found.get(i) == truth[i] for i in exact)
    assert sum(found.get(i) == truth[i] for i in close) >= 0.85 * len(close)
    wrong = [i for i in found if i not in truth]  # half-edited copies and unrelated documents
    assert len(wrong) <= 0.01 * len(docs), wrong
    assert result["duplicates"] == len(found) and result["clusters"] <= 60


def _corpus(root: Path) -> dict[str, str]:
    root.mkdir()
    base = {f"doc{i:02d}.txt": prose(100 + i, 14) for i in range(12)}
    for name, text in base.items():
        (root / name).write_text(text)
    (root / "zz-near.txt").write_text(edited(base["doc03.txt"], 0.01, seed=1))
    records = [{"text": prose(200 + i, 10)} for i in range(6)]
    records.insert(4, {"text": edited(base["doc05.txt"], 0.01, seed=2)})
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return base


@pytest.mark.usefixtures("ray_local")
def test_preprocess_drops_near_duplicates_and_says_where_they_were(tmp_path):
    from flows.data.dataset import read_manifest
    from tests.steps import preprocess

    _corpus(tmp_path / "in")

    def run(workdir: Path, workers: int) -> Path:
        cfg = PipelineConfig(
            workdir=str(workdir),
            tracking=TrackingConfig(enabled=False),
            data=DataConfig(
                inputs=(str(tmp_path / "in"),),
                vocab_size=300,
                min_chars=16,
                val_fraction=0.0,
                val_min_tokens=0,
                num_workers=workers,
                min_work_units=1,
                work_unit_bytes=8192,
                curate=CurateConfig(near_dedup=NearDedupConfig(partitions=3)),
            ),
        )
        return preprocess(cfg)

    out = run(tmp_path / "w1", 2)
    m = read_manifest(out, verify=True)
    assert m["documents"]["dropped"] == {"near_duplicate": 2}
    assert m["curation"]["near_dedup"] == {"clusters": 2, "duplicates": 2}
    rows = [
        json.loads(line) for line in (out / "curation" / "dropped.jsonl").read_text().splitlines()
    ]
    root = str(tmp_path / "in")
    assert sorted((r["file"], r.get("line"), r["duplicate_of"]["file"]) for r in rows) == [
        (f"{root}/records.jsonl", 5, f"{root}/doc05.txt"),
        (f"{root}/zz-near.txt", None, f"{root}/doc03.txt"),
    ]
    report = json.loads((out / "curation" / "report.json").read_text())
    assert (
        report["dropped"]["near_duplicate"]["documents"] == 2
        and report["kept"]["documents"] == 12 + 6
    )
    assert (out / "curation" / "near_dup_clusters.png").read_bytes()[:4] == b"\x89PNG"
    again = run(tmp_path / "w2", 1)
    for name in ("dropped.jsonl", "report.json", "near_dup_clusters.png"):
        assert (again / "curation" / name).read_bytes() == (out / "curation" / name).read_bytes(), (
            name
        )
    assert again.name == out.name


@pytest.mark.usefixtures("ray_local")
def test_curation_config_names_the_dataset_and_every_filter_reports(tmp_path):
    from flows.data.dataset import read_manifest
    from tests.steps import preprocess

    root = tmp_path / "in"
    root.mkdir()
    texts = [prose(300 + i, 12) for i in range(8)]
    texts[1] = "Write to jane.doe@example.com for details. " + texts[1]
    texts.append(prose(400, 10) + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.")
    texts.append("Das ist ein ganz normaler deutscher Text über das Wetter und die Stadt. " * 6)
    eval_q = " ".join(texts[2].split()[10:30])
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": eval_q}) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def cfg(**curate) -> PipelineConfig:
        return PipelineConfig(
            workdir=str(tmp_path / "w"),
            tracking=TrackingConfig(enabled=False),
            data=DataConfig(
                inputs=(str(root),),
                vocab_size=300,
                min_chars=16,
                val_fraction=0.0,
                val_min_tokens=0,
                curate=CurateConfig(**curate),
            ),
        )

    plain = preprocess(cfg())
    strict = preprocess(
        cfg(
            quality=QualityConfig(enabled=True, c4_min_sentences=0),
            languages=("en",),
            decontaminate=(str(tmp_path / "eval.jsonl"),),
            pii="drop",
        )
    )
    assert plain != strict  # the curate config is part of the dataset's identity
    m = read_manifest(strict, verify=True)
    assert m["documents"]["dropped"] == {
        "c4_lorem_ipsum": 1,
        "decontaminated": 1,
        "language.de": 1,
        "pii": 1,
    }
    rows = [
        json.loads(line)
        for line in (strict / "curation" / "dropped.jsonl").read_text().splitlines()
    ]
    assert [(r["line"], r["reason"]) for r in rows] == [
        (2, "pii"),
        (3, "decontaminated"),
        (9, "c4_lorem_ipsum"),
        (10, "language.de"),
    ]
    assert rows[3]["language"] == "de" and rows[3]["language_score"] > 0.9
    report = json.loads((strict / "curation" / "report.json").read_text())
    assert report["samples"]["language.de"][0].startswith("Das ist")
    assert "<EMAIL>" in report["samples"]["pii"][0] and "jane.doe" not in json.dumps(report)
    assert report["languages"] == {"en": 6} and sum(report["histograms"]["words"]) >= 7
    assert (strict / "curation" / "quality_scores.png").is_file()
    plain_m = read_manifest(plain)
    assert plain_m["curation"]["pii"] == {"email": 1} and plain_m["documents"]["kept"] == 10
