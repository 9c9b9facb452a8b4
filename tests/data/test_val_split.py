"""The validation split exists for any corpus that can hold one: a few long documents are cut into
pieces assigned by hash, many small documents are assigned whole, the text is partitioned (no val
text in train), a corpus too small for the split is refused (before Ray when its sizes show it),
and fine-tuning data gets a held-out split ``sft_val`` the same way."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from flows.config import DataConfig
from flows.context import StepContext
from flows.data.dataset import read_manifest
from flows.data.inputs import InputError
from flows.data.splits import sft_val_count
from flows.data.stage import preprocess
from tests.data.preprocess_data import document, documents_of, shard_tokens


def run(tmp: Path, **data) -> tuple[Path, dict]:
    cfg = DataConfig(
        **{"vocab_size": 512, "min_chars": 16, "tokenizer_sample_chars": 600_000, **data}
    )
    out = preprocess(cfg, tmp / "out", StepContext(workdir=tmp))
    return out, read_manifest(out, verify=True)


def novel(seed: int, chars: int) -> str:
    """Pseudo-English that never repeats a 200-character window: Zipf-weighted words from a
    3,000-word made-up vocabulary, sentences and paragraphs of random lengths."""
    rng = random.Random(seed)
    onsets, vowels, codas = (
        "b c d f g h k l m n p r s t v w br cl dr gr pl st th tr".split(),
        "a e i o u ai ea ou".split(),
        ["", "n", "r", "s", "t", "ng", "ck"],
    )
    vocab = sorted(
        {
            "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
            + rng.choice(codas)
            for _ in range(3_000)
        }
    )
    weights = [1 / (i + 1) for i in range(len(vocab))]
    paragraphs, size = [], 0
    while size < chars:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = rng.choices(vocab, weights, k=rng.randint(5, 20))
            if len(words) > 8:
                words[rng.randrange(2, len(words) - 2)] += ","
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def decoded_runs(out: Path, m: dict, split: str) -> list[str]:
    from gptcore import Tokenizer

    tok = Tokenizer.load(out / "tokenizer.json")
    return [tok.decode(d) for d in documents_of(shard_tokens(out, m, split), m["eot_id"])]


def test_six_long_documents_are_cut_into_pieces_and_val_shares_no_text_with_train(
    tmp_path, ray_local
):
    six_novels = [novel(i, 300_000 + 60_000 * i) for i in range(6)]  # 300 to 600 KB each
    root = tmp_path / "in"
    root.mkdir()
    for i, text in enumerate(six_novels):
        (root / f"novel{i}.txt").write_text(text, encoding="utf-8")
    out, m = run(tmp_path, inputs=(str(root),), val_fraction=0.05, val_min_tokens=1_000)
    va, splits = m["val_assignment"], m["splits"]
    assert m["documents"]["kept"] == 6 and va["mode"] == "pieces"
    val_tokens, total = splits["val"]["tokens"], splits["train"]["tokens"] + splits["val"]["tokens"]
    assert va["tokens"] == val_tokens > 0
    # Tolerance: 10% of the target share. The share is exact in bytes to one 4 KiB piece in ~40
    # (2.5%); bytes per token of hash-chosen pieces of one kind of text differ by less.
    assert abs(val_tokens / total - 0.05) <= 0.005, (val_tokens, total, va)

    train, val = decoded_runs(out, m, "train"), decoded_runs(out, m, "val")
    assert len(val) == splits["val"]["documents"] and len(val) >= 10
    # A partition of the text: every part is a stretch of one novel, and the parts add up to them.
    novels = "\x00".join(t.strip() for t in six_novels)
    assert all(part in novels for part in train + val)
    assert sum(map(len, train + val)) == sum(len(t.strip()) for t in six_novels)
    # ... and val shares no text with train: no 200-character window of val occurs in train.
    train_text = "\x00".join(train)
    windows = [part[i : i + 200] for part in val for i in range(0, max(1, len(part) - 200), 100)]
    assert len(windows) > 100
    assert not [w for w in windows if w in train_text]


def test_many_small_documents_are_assigned_whole_and_the_floor_is_met(tmp_path, ray_local):
    docs = [document(7000 + i, 130) for i in range(600)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # Default val_min_tokens (20,000) outweighs 1% of ~200k tokens.
    out, m = run(tmp_path, inputs=(str(tmp_path / "docs.jsonl"),), val_fraction=0.01)
    va, splits = m["val_assignment"], m["splits"]
    assert va["mode"] == "documents" and va["min_tokens"] == 20_000
    assert 20_000 <= splits["val"]["tokens"] <= 1.2 * va["target_tokens"], va
    train, val = decoded_runs(out, m, "train"), decoded_runs(out, m, "val")
    expected = sorted(d.strip() for d in docs)
    assert sorted(train + val) == expected  # each document whole, in exactly one split
    assert not set(train) & set(val)
    assert len(val) == splits["val"]["documents"] == va["units"] >= 20


def _no_ray(*_args, **_kwargs):
    raise AssertionError("Ray was started for an input that should have failed first")


class _RayStarted(Exception):
    pass


def _ray_started(*_args, **_kwargs):
    raise _RayStarted


def test_a_corpus_too_small_for_a_val_split_fails_before_ray(tmp_path, monkeypatch):
    import flows.cluster

    monkeypatch.setattr(flows.cluster, "ensure_ray", _no_ray)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.txt").write_text(document(i, 300))  # ~6 KB in all
    with pytest.raises(
        InputError, match=r"too little text for a validation split.*data\.val_min_tokens=20,000"
    ):
        run(tmp_path, inputs=(str(root),))
    with pytest.raises(InputError, match=r"data\.val_fraction=0\.6"):
        run(tmp_path, inputs=(str(root),), val_fraction=0.6, val_min_tokens=0)
    # No val split asked for: the same corpus gets as far as Ray.
    monkeypatch.setattr(flows.cluster, "ensure_ray", _ray_started)
    with pytest.raises(_RayStarted):
        run(tmp_path, inputs=(str(root),), val_fraction=0.0, val_min_tokens=0)
    # A compressed file's size says little about its text: not refused early.
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "d.txt.gz").write_bytes(gzip.compress(document(0, 300).encode()))
    with pytest.raises(_RayStarted):
        run(tmp_path, inputs=(str(packed),))


def test_the_exact_check_after_cleaning_refuses_what_the_sizes_could_not(tmp_path, ray_local):
    """30 KB of text passes the optimistic check on sizes (<= 60k tokens) but holds ~10k tokens,
    fewer than a 20k-token val split and a train split as large need."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(5):
        (root / f"d{i}.txt").write_text(document(100 + i, 1000))
    assert sum(p.stat().st_size for p in root.iterdir()) > 20_000
    with pytest.raises(
        InputError,
        match=r"too little text for a validation split: 5 documents hold .* bytes after "
        r"cleaning, about .* tokens",
    ):
        run(tmp_path, inputs=(str(root),))


def test_sft_val_count_follows_the_fraction_the_floor_and_the_bounds():
    data = DataConfig(sft_val_fraction=0.05, sft_val_min_examples=16)
    assert [sft_val_count(n, data) for n in (0, 1, 2, 3, 10, 31, 32, 100, 1000)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        16,
        16,
        50,
    ]
    assert sft_val_count(100, DataConfig(sft_val_fraction=0.0, sft_val_min_examples=0)) == 0
    assert (
        sft_val_count(10, DataConfig(sft_val_fraction=0.9, sft_val_min_examples=0)) == 5
    )  # at most half


def test_fine_tuning_examples_get_a_disjoint_held_out_split(tmp_path, ray_local):
    from gptcore import Tokenizer

    tok_path = Tokenizer.train([document(i, 200) for i in range(20)], vocab_size=300).save(
        tmp_path / "tok.json"
    )
    records = [
        {
            "prompt": f"Question {i}: {document(i, 12).strip()}\nAnswer:",
            "completion": " " + document(500 + i, 10),
        }
        for i in range(120)
    ]
    records += records[:10]  # exact repeats: never one copy in each split
    random.Random(0).shuffle(records)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out, m = run(
        tmp_path, inputs=(), sft_inputs=(str(tmp_path / "sft.jsonl"),), tokenizer_path=str(tok_path)
    )
    sft, held = m["splits"]["sft"], m["splits"]["sft_val"]
    assert sft["examples"] + held["examples"] == m["sft_examples"]["kept"] == 130
    assert 16 <= held["examples"] <= 16 + 10  # the floor: 5% of 130 is 7
    assert all("mask_file" in s for s in held["shards"])  # read_manifest(verify=True) checked them

    def examples(split: str) -> list[tuple[int, ...]]:
        ids = shard_tokens(out, m, split)
        mask = np.concatenate(
            [
                np.fromfile(out / s["mask_file"], dtype=np.uint8)
                for s in m["splits"][split]["shards"]
            ]
        )
        assert len(mask) == len(ids) and mask[-1] == 1
        return [tuple(d) for d in documents_of(ids, m["eot_id"])]

    train, val = examples("sft"), examples("sft_val")
    assert len(train) == sft["examples"] and len(val) == held["examples"]
    assert not set(train) & set(val)
    assert len(set(train) | set(val)) == 120
