"""Smoke checks: each rule fires on the output it is for, and only there; generations are
reproducible."""

from __future__ import annotations

import pytest

from flows.evaluate.generations import MAX_RUN, generate_samples, smoke_failures
from gptcore import load_bundle


def test_a_varied_text_passes():
    assert smoke_failures(list(range(10)), "The cat sat on the mat.", cut_by_length=True) == []


@pytest.mark.parametrize("ids, text", [([], ""), ([3, 4], "  \n")])
def test_empty_output_fails(ids, text):
    assert "empty" in smoke_failures(ids, text, cut_by_length=False)


def test_one_token_on_repeat_fails():
    assert smoke_failures([5] * MAX_RUN, "ab" * MAX_RUN, cut_by_length=True) == ["repeats"]
    run_too_short = [5] * (MAX_RUN - 1) + list(
        range(10, 10 + MAX_RUN - 1)
    )  # and 5 is only half of it
    assert smoke_failures(run_too_short, "x y z", cut_by_length=True) == []


def test_one_token_dominating_the_output_fails():
    ids = [1, 2, 1, 3, 1, 4, 1, 1, 5, 1]  # id 1 is 6 of 10 tokens, never more than twice in a row
    assert smoke_failures(ids, "a b a c a d a a e a", cut_by_length=True) == ["repeats"]
    assert (
        smoke_failures(ids[:-1] + [6], "a b a c a d a a e f", cut_by_length=True) == []
    )  # exactly half


def test_invalid_utf8_fails_unless_the_length_limit_cut_a_character():
    assert smoke_failures([1, 2, 3], "caf\ufffd ok", cut_by_length=True) == ["not_text"]
    assert smoke_failures([1, 2, 3], "caf\ufffd", cut_by_length=False) == ["not_text"]
    assert smoke_failures([1, 2, 3], "caf\ufffd", cut_by_length=True) == []


def test_generations_are_greedy_reproducible_and_bounded(trained_bundle):
    model, tok, _ = load_bundle(trained_bundle)
    prompts = ("The ", "", "My friend")
    first = generate_samples(model, tok, prompts, max_new_tokens=12)
    assert first == generate_samples(model, tok, prompts, max_new_tokens=12)
    assert [r.prompt for r in first] == list(prompts)
    for r in first:
        assert 0 <= r.tokens <= 12 and r.stopped in ("eot", "length")
        assert (r.stopped == "length") == (r.tokens == 12)
        assert r.to_dict()["passed"] == (r.failures == ())


def test_a_model_stuck_on_one_token_fails_the_smoke_checks(trained_bundle):
    model, tok, _ = load_bundle(trained_bundle)
    stuck = tok.encode(" cat")[0]

    def always(module, args, logits):
        logits = logits.clone()
        logits[..., stuck] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(always)
    try:  # generation honours hooks: it leaves its flat decoding step for GPT.forward
        (record,) = generate_samples(model, tok, ["The "], max_new_tokens=MAX_RUN + 2)
    finally:
        handle.remove()
    assert record.tokens == MAX_RUN + 2 and record.stopped == "length"
    assert record.failures == ("repeats",) and not record.passed
