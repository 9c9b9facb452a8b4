"""Continuous batching: each sequence decodes as `generate` would for it alone, while the batch
changes under it (joins, leaves, cancels, a token budget)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from gptcore import GPT, GPTConfig, Tokenizer
from gptcore.batching import BatchEngine, SequenceRequest, generate_alone
from gptcore.sampling import SamplingParams

TEXT = [
    "the cat sat on the mat and looked at the dog. ",
    "a café → naïve robots write about rivers. ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([t * 40 for t in TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=tok.vocab_size, context_length=96, n_layer=2, n_head=2, d_model=32)
    ).eval()


def _drain(engine: BatchEngine, feed: dict[int, list[SequenceRequest]] | None = None):
    """Step until idle; `feed` submits requests at given step numbers (joining a running batch)."""
    tokens: dict = {}
    finish: dict = {}
    occupancy = []
    step = 0
    feed = dict(feed or {})
    while engine.has_work() or feed:
        for r in feed.pop(step, []):
            engine.submit(r)
        occupancy.append(engine.running)
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.tokens)
            if out.finish_reason:
                assert out.id not in finish, "a sequence finished twice"
                finish[out.id] = out.finish_reason
        step += 1
    return tokens, finish, occupancy


def _requests(n: int, seed: int, **kw) -> list[SequenceRequest]:
    rng = random.Random(seed)
    return [
        SequenceRequest(
            i,
            tuple(rng.randrange(1, 300) for _ in range(rng.randint(1, 24))),
            rng.randint(1, 48),
            SamplingParams(**kw),
        )
        for i in range(n)
    ]


def test_greedy_output_equals_generate_alone_for_mixed_lengths_and_late_joins(model):
    reqs = _requests(12, seed=1, stop_ids=frozenset({7}))
    engine = BatchEngine(model, max_batch_size=4)
    # half at once, the rest joining a running batch at different steps
    tokens, finish, occupancy = _drain(engine, {0: reqs[:6], 3: reqs[6:8], 11: reqs[8:]})
    for r in reqs:
        want = generate_alone(model, r)
        assert tokens.get(r.id, []) == want, r.id
        assert finish[r.id] == ("length" if len(want) == r.max_new_tokens else "stop")
    assert max(occupancy) == 4  # the batch really was shared, and never over its size


def test_a_finished_sequence_frees_its_row_at_once(model):
    short = SequenceRequest("short", (5, 6, 7), 2)
    long_ = SequenceRequest("long", (8, 9), 40)
    waiting = SequenceRequest("waiting", (10,), 3)
    engine = BatchEngine(model, max_batch_size=2)
    for r in (short, long_, waiting):
        engine.submit(r)
    early = engine.step()  # both rows prefilled: first tokens
    assert engine.running == 2 and engine.waiting == 1
    early += (
        engine.step()
    )  # "short" has its 2 tokens: it leaves, and "waiting" is admitted in the same step
    assert engine.running == 2 and engine.waiting == 0
    assert [o.finish_reason for o in early if o.id == "short"][-1] == "length"
    tokens, _, _ = _drain(engine)
    for r in (long_, waiting):
        assert [t for o in early if o.id == r.id for t in o.tokens] + tokens[
            r.id
        ] == generate_alone(model, r)


def test_seeded_sampling_matches_generate_alone(model):
    reqs = _requests(6, seed=2, temperature=0.9, top_p=0.9, top_k=50)
    reqs = [
        SequenceRequest(r.id, r.prompt, r.max_new_tokens, replace(r.sampling, seed=100 + r.id))
        for r in reqs
    ]
    tokens, _, _ = _drain(BatchEngine(model, max_batch_size=3), {0: reqs})
    for r in reqs:
        assert tokens.get(r.id, []) == generate_alone(model, r)
    assert len({tuple(tokens[r.id][:5]) for r in reqs}) > 1


def test_stop_strings_cut_as_generate_does(model, tok):
    prompts = [tok.encode(t) for t in TEXT]
    free = generate_alone(model, SequenceRequest(0, tuple(prompts[0]), 30))
    text = tok.decode(free)
    stop = text[5:8] if len(text) > 8 else text[-2:]  # a string the model will produce
    reqs = [
        SequenceRequest(i, tuple(p), 30, SamplingParams(stop_strings=(stop,)))
        for i, p in enumerate(prompts)
    ]
    tokens, finish, _ = _drain(BatchEngine(model, max_batch_size=2, tokenizer=tok), {0: reqs})
    for r in reqs:
        assert tokens.get(r.id, []) == generate_alone(model, r, tok)
    assert finish[0] == "stop" and stop not in tok.decode(tokens[0])


def test_cancel_removes_running_and_waiting_sequences(model):
    engine = BatchEngine(model, max_batch_size=1)
    a, b = SequenceRequest("a", (1, 2), 40), SequenceRequest("b", (3,), 40)
    engine.submit(a)
    engine.submit(b)
    engine.step()
    engine.cancel("a")
    engine.cancel("b")
    outs = engine.step()
    assert {o.id: o.finish_reason for o in outs} == {"a": "cancelled", "b": "cancelled"}
    assert not engine.has_work()


def test_the_token_budget_bounds_admission(model):
    engine = BatchEngine(model, max_batch_size=4, max_batch_tokens=60)
    reqs = [SequenceRequest(i, (1, 2, 3, 4, 5), 25) for i in range(4)]  # 30 tokens each: two fit
    tokens, _, occupancy = _drain(engine, {0: reqs})
    assert max(occupancy) == 2
    assert all(tokens[r.id] == generate_alone(model, r) for r in reqs)


def test_logprobs_are_the_models_and_the_chosen_token_is_the_best_under_greedy(model):
    r = SequenceRequest("x", (4, 5, 6), 5, logprobs=3)
    engine = BatchEngine(model, max_batch_size=2)
    engine.submit(r)
    entries = []
    while engine.has_work():
        for out in engine.step():
            entries += out.logprobs or []
    assert len(entries) == 5
    ids = [4, 5, 6]
    with torch.no_grad():
        for e in entries:
            lp = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1].float(), -1)
            assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-4)
            assert e.top[0][0] == e.token and len(e.top) == 3
            ids.append(e.token)


def test_requests_that_cannot_fit_are_refused_when_submitted(model, tok):
    engine = BatchEngine(model, max_batch_size=2, max_batch_tokens=50)
    with pytest.raises(ValueError, match="context length of 96"):
        engine.submit(SequenceRequest(0, tuple(range(1, 90)), 10))
    with pytest.raises(ValueError, match="budget of 50"):
        engine.submit(SequenceRequest(0, (1,), 60))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(SequenceRequest(0, (tok.vocab_size,), 1))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(SequenceRequest(0, (), 1))
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(SequenceRequest(0, (1,), 1, SamplingParams(temperature=float("nan"))))
    assert not engine.has_work()


def test_rotary_positions_per_row_make_a_late_join_exact(tok):
    """Llama family: each row's keys are rotated by its own positions, so a sequence joining a
    running batch (other rows far ahead of it) decodes as it would alone."""
    torch.manual_seed(0)
    llama = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            context_length=96,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            bias=False,
            norm="rmsnorm",
            positions="rotary",
            mlp="swiglu",
            tie_embeddings=False,
        )
    ).eval()
    reqs = _requests(10, seed=3)
    tokens, _, occupancy = _drain(
        BatchEngine(llama, max_batch_size=4), {0: reqs[:5], 4: reqs[5:7], 9: reqs[7:]}
    )
    for r in reqs:
        assert tokens.get(r.id, []) == generate_alone(llama, r), r.id
    assert max(occupancy) == 4
