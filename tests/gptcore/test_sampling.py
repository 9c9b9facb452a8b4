"""SamplingParams: one place where every decoding setting is checked (errors name the field and the
value), and the same settings given whole or one by one decode the same."""

from __future__ import annotations

import pytest
import torch

from gptcore import GPT, GPTConfig, generate, generate_stream
from gptcore.batching import BatchEngine, SequenceRequest, generate_alone
from gptcore.sampling import SamplingError, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"temperature": -0.5}, "temperature", "temperature=-0.5 must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature", "temperature=inf"),
        ({"top_k": 0}, "top_k", "top_k=0 must be an integer >= 1"),
        ({"top_k": 2.5}, "top_k", "top_k=2.5"),
        ({"top_p": 0.0}, "top_p", "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "top_p=1.5 must be in (0, 1]"),
        (
            {"repetition_penalty": 0},
            "repetition_penalty",
            "repetition_penalty=0 must be a finite number > 0",
        ),
        ({"seed": "7"}, "seed", "seed='7' must be an integer"),
        ({"stop_ids": [1, "2"]}, "stop_ids", "'2' is not a token id"),
        ({"stop_strings": "\n"}, "stop_strings", "must be a list of strings"),
    ],
)
def test_out_of_range_settings_name_the_field_and_the_value(kwargs, field, words):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and words in str(e.value)
    assert isinstance(e.value, ValueError)


def test_collections_become_hashable_values():
    p = SamplingParams(stop_ids=[3, 1, 3], stop_strings=["a", "b"])
    assert p.stop_ids == frozenset({1, 3}) and p.stop_strings == ("a", "b")
    assert p == SamplingParams(stop_ids={1, 3}, stop_strings=("a", "b")) and hash(p)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, context_length=32, n_layer=1, n_head=2, d_model=16)).eval()


def test_sampling_whole_equals_the_settings_one_by_one(model):
    settings = dict(
        temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, stop_ids=[5], seed=3
    )
    alone = generate(model, [1, 2, 3], 12, **settings)
    assert generate(model, [1, 2, 3], 12, sampling=SamplingParams(**settings)) == alone
    assert list(generate_stream(model, [1, 2, 3], 12, sampling=SamplingParams(**settings))) == alone
    with pytest.raises(ValueError, match="not both"):
        generate(model, [1, 2, 3], 12, temperature=0.5, sampling=SamplingParams(**settings))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_batch_engine_applies_the_repetition_penalty_as_generate_does(model, temperature):
    reqs = [
        SequenceRequest(
            i,
            tuple(range(1 + i, 6 + 2 * i)),
            14,
            SamplingParams(temperature=temperature, repetition_penalty=1.8, seed=10 + i),
        )
        for i in range(3)
    ]
    engine = BatchEngine(model, max_batch_size=2)
    for r in reqs:
        engine.submit(r)
    tokens: dict = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.tokens)
    for r in reqs:
        assert tokens[r.id] == generate_alone(model, r)
