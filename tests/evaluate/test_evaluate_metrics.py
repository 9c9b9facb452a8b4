"""The evaluation figures: exact against an independent computation, deterministic, and bounded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flows.config import EvaluateConfig
from flows.data.dataset import DataError, read_manifest
from flows.evaluate import metrics
from flows.evaluate.stage import evaluate
from gptcore import load_bundle

QUICK = EvaluateConfig(
    batch_size=4, prompts=("The ",), max_new_tokens=8, sample_tokens=16, worst_tokens=5
)


def shards(dataset, split):
    manifest = read_manifest(dataset)
    return [
        np.fromfile(dataset / s["file"], dtype="<u2").astype(np.int64)
        for s in manifest["splits"][split]["shards"]
    ]


def direct_val_loss(model, dataset, T):
    """Sum of cross-entropies window by window, one unpadded forward each, from raw shard bytes."""
    total, count = 0.0, 0
    for arr in shards(dataset, "val"):
        for start in range(0, len(arr) - 1, T):
            w = torch.from_numpy(arr[start : start + T + 1])
            logits, _ = model(w[None, :-1])
            total += float(F.cross_entropy(logits[0], w[1:], reduction="sum"))
            count += len(w) - 1
    return total, count


def test_val_loss_equals_a_direct_computation_over_every_token(trained_bundle, dataset, tok):
    model, _, _ = load_bundle(trained_bundle)
    got = metrics.val_loss(model, tok, dataset, read_manifest(dataset), 32, batch_size=3)
    with torch.no_grad():
        total, count = direct_val_loss(model, dataset, 32)
    # every token but each shard's first is a target exactly once, the partial last windows included
    assert got.tokens == count == sum(len(a) - 1 for a in shards(dataset, "val"))
    assert got.mean_loss == pytest.approx(total / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bits_per_byte_counts_utf8_bytes_of_the_targets(trained_bundle, dataset, tok):
    model, _, _ = load_bundle(trained_bundle)
    got = metrics.val_loss(model, tok, dataset, read_manifest(dataset), 32, batch_size=4)
    expected_bytes = sum(
        len(tok.decode(a[1:].tolist()).encode("utf-8")) for a in shards(dataset, "val")
    )
    text_chars = sum(len(tok.decode(a[1:].tolist())) for a in shards(dataset, "val"))
    assert (
        got.bytes == expected_bytes > text_chars
    )  # the corpus has multi-byte characters: bytes, not chars
    assert got.bits_per_byte * math.log(2) * got.bytes == pytest.approx(
        got.mean_loss * got.tokens, rel=1e-12
    )


def test_untrained_model_scores_about_ln_vocab_and_training_lowers_it(
    untrained_bundle, trained_bundle, dataset, tok
):
    manifest = read_manifest(dataset)
    untrained = metrics.val_loss(load_bundle(untrained_bundle)[0], tok, dataset, manifest, 32, 4)
    trained = metrics.val_loss(load_bundle(trained_bundle)[0], tok, dataset, manifest, 32, 4)
    assert untrained.mean_loss == pytest.approx(math.log(tok.vocab_size), abs=0.1)
    assert trained.mean_loss < untrained.mean_loss - 1.0


def test_max_tokens_limits_the_tokens_scored(trained_bundle, dataset, tok):
    model, _, _ = load_bundle(trained_bundle)
    manifest = read_manifest(dataset)
    first = shards(dataset, "val")[0]
    for limit in (1, 45, 70):  # inside a window, across windows, in the second shard
        got = metrics.val_loss(model, tok, dataset, manifest, 32, 4, max_tokens=limit)
        assert got.tokens == limit
    got = metrics.val_loss(model, tok, dataset, manifest, 32, 4, max_tokens=45)
    with torch.no_grad():  # the first 45 targets: one full window, then 13 tokens
        logits = torch.cat(
            [model(torch.from_numpy(first[s:e])[None])[0][0] for s, e in ((0, 32), (32, 45))]
        )
        direct = F.cross_entropy(logits, torch.from_numpy(first[1:46]), reduction="mean")
    assert got.mean_loss == pytest.approx(float(direct), rel=1e-5)
    everything = metrics.val_loss(model, tok, dataset, manifest, 32, 4, max_tokens=10**9)
    assert everything.tokens == sum(len(a) - 1 for a in shards(dataset, "val"))


def test_sft_val_loss_counts_only_completion_tokens(trained_bundle, dataset, tok, sft_examples):
    model, _, _ = load_bundle(trained_bundle)
    total, count = 0.0, 0
    with (
        torch.no_grad()
    ):  # by hand: each example alone, the loss of its completion and <|endoftext|>
        for prompt, completion in sft_examples:
            p, c = (
                tok.encode(prompt, allow_special=False),
                tok.encode(completion, allow_special=False),
            )
            ids = torch.tensor([*p, *c, tok.eot_id])
            logits, _ = model(ids[None, :-1])
            losses = F.cross_entropy(logits[0], ids[1:], reduction="none")
            total += float(losses[len(p) - 1 :].sum())  # targets from the first completion token on
            count += len(c) + 1
    got = metrics.sft_val_loss(model, dataset, read_manifest(dataset), 32, batch_size=2)
    assert got.tokens == count
    assert got.mean_loss == pytest.approx(total / count, rel=1e-5)


def test_windows_cover_each_target_once_and_never_cross_a_segment():
    tokens = np.arange(70)
    windows = list(metrics.segment_windows(tokens, None, 32))
    assert [(int(w.tokens[0]), len(w.tokens)) for w in windows] == [(0, 33), (32, 33), (64, 6)]
    targets = np.concatenate([w.tokens[1:] for w in windows])
    assert targets.tolist() == list(range(1, 70))
    assert list(metrics.segment_windows(np.arange(1), None, 32)) == []


def test_fine_tuning_examples_split_on_end_of_text(tmp_path):
    eot = 0
    assert metrics.split_examples(tmp_path, np.array([5, 6, 0, 7, 0]), eot, expected=2) == [
        (0, 3),
        (3, 5),
    ]
    with pytest.raises(DataError, match="manifest says 3"):
        metrics.split_examples(tmp_path, np.array([5, 6, 0, 7, 0]), eot, expected=3)
    with pytest.raises(DataError, match="must end with"):
        metrics.split_examples(tmp_path, np.array([5, 6, 0, 7]), eot, expected=None)


def test_evaluate_twice_gives_identical_metrics(trained_bundle, dataset, tmp_path):
    first = json.loads(
        (evaluate(QUICK, trained_bundle, dataset, tmp_path / "a") / "metrics.json").read_text()
    )
    second = json.loads(
        (evaluate(QUICK, trained_bundle, dataset, tmp_path / "b") / "metrics.json").read_text()
    )
    assert first == second
    assert {"val_loss", "val_perplexity", "val_bits_per_byte", "val_tokens", "sft_val_loss"} <= set(
        first
    )
    gens = [json.loads((tmp_path / d / "generations.json").read_text()) for d in ("a", "b")]
    assert gens[0] == gens[1]
