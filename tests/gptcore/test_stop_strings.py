"""Holding back a possible stop string costs work bounded by the stop string, never by the text or
a hostile length: the check that once cost ~24 s per decode step for every client of a server."""

from __future__ import annotations

import pytest
import torch

from gptcore import GPT, GPTConfig, Tokenizer
from gptcore.batching import BatchEngine, SequenceRequest
from gptcore.sampling import MAX_STOP_CHARS, SamplingParams, ends_with_prefix


class _Counting(str):
    """A str that counts the comparisons made against it (the check's unit of work)."""

    calls = 0

    def startswith(self, *args):  # noqa: D102
        _Counting.calls += 1
        return super().startswith(*args)

    def endswith(self, *args):  # noqa: D102
        _Counting.calls += 1
        return super().endswith(*args)


def _reference(text: str, stop: str) -> bool:
    return any(text.endswith(stop[:n]) for n in range(1, len(stop)))


def test_ends_with_prefix_is_what_it_was_on_every_short_case():
    import itertools

    for t in range(0, 6):
        for s in range(1, 5):
            for text in map("".join, itertools.product("ab", repeat=t)):
                for stop in map("".join, itertools.product("ab", repeat=s)):
                    assert ends_with_prefix(text, stop) == _reference(text, stop), (text, stop)


@pytest.mark.parametrize("text_len", [3, 300, 30_000])
def test_the_check_compares_no_more_than_the_text_and_the_stop_string_allow(text_len):
    stop = _Counting("ab" * 120_000)  # 240 K characters
    text = _Counting("x" * (text_len - 1) + "a")
    _Counting.calls = 0
    assert ends_with_prefix(text, stop)
    assert _Counting.calls <= min(text_len, len(stop)), (
        _Counting.calls
    )  # it used to be 240 K, per row, per step


def test_the_serving_engine_refuses_stop_strings_past_the_cap():
    tok = Tokenizer.train(["the cat sat on the mat " * 20], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=16)
    )
    engine = BatchEngine(model, max_batch_size=2, tokenizer=tok)
    engine.submit(
        SequenceRequest(0, (1, 2), 4, SamplingParams(stop_strings=("x" * MAX_STOP_CHARS,)))
    )
    with pytest.raises(ValueError, match=f"longer than {MAX_STOP_CHARS} characters"):
        engine.submit(
            SequenceRequest(
                1, (1, 2), 4, SamplingParams(stop_strings=("x" * (MAX_STOP_CHARS + 1),))
            )
        )
