"""Generation: greedy default, cache == no cache, batching == alone, sampling, stops, streaming,
long prompts."""

from __future__ import annotations

import pytest
import torch

from gptcore import GPT, Tokenizer, generate, generate_stream, preset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(
        ["hello world, the cat sat on the mat. " * 20, "def f(x):\n    return x\n" * 20],
        vocab_size=300,
    )


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=tok.vocab_size, context_length=48))
    # A little training so greedy paths are not all the same token.
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.tensor(
        [tok.encode("hello world, the cat sat on the mat. def f(x): return x " * 2)[:48]]
    )
    for _ in range(30):
        _, loss = m(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_greedy_is_default_and_deterministic(model):
    a = generate(model, [5, 6, 7], max_new_tokens=12)
    b = generate(model, [5, 6, 7], max_new_tokens=12, temperature=0.0)
    assert a == b and len(a) == 12 and all(isinstance(t, int) for t in a)


def test_cache_equals_no_cache_including_past_the_context(model):
    prompt = list(range(3, 43))  # 40 tokens; context is 48, so the window slides
    with_cache = generate(model, prompt, max_new_tokens=30)
    without = generate(model, prompt, max_new_tokens=30, use_cache=False)
    assert with_cache == without


def test_kv_cache_holds_what_the_generation_needs_not_the_whole_context(model, monkeypatch):
    """A long-context model (SmolLM2: 8192) must not zero a context-sized cache for a short answer;
    past the context the window still slides (test above), with a cache of the context."""
    import gptcore.generation

    sizes, real = [], gptcore.generation.KVCache
    monkeypatch.setattr(
        gptcore.generation, "KVCache", lambda *a, **k: sizes.append(a[2]) or real(*a, **k)
    )
    assert generate(model, [[5, 6, 7], [8]], max_new_tokens=6) == [
        generate(model, p, max_new_tokens=6) for p in ([5, 6, 7], [8])
    ]
    assert (
        sizes[0] == 3 + 6 - 1
    )  # the prompt and every new token but the last, which is never stored
    sizes.clear()
    generate(model, list(range(3, 43)), max_new_tokens=30)
    assert sizes[0] == 48 and set(sizes) == {48}


def test_no_cache_reference_is_argmax_of_full_forward(model):
    prompt = [9, 10, 11]
    ids = list(prompt)
    for _ in range(8):
        logits, _ = model(torch.tensor([ids[-48:]]))
        ids.append(int(logits[0, -1].argmax()))
    assert generate(model, prompt, max_new_tokens=8) == ids[3:]


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[5], [20, 21, 22, 23, 24, 25, 26], [100, 101, 102]]
    batch = generate(model, prompts, max_new_tokens=15)
    assert batch == [generate(model, p, max_new_tokens=15) for p in prompts]


def test_prompt_longer_than_context_is_cut_from_the_left(model):
    long_prompt = list(range(3, 103))  # 100 tokens > 48
    assert generate(model, long_prompt, max_new_tokens=5) == generate(
        model, long_prompt[-48:], max_new_tokens=5
    )


def test_sampling_is_reproducible_with_seed_and_varies_without(model):
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95)
    assert generate(model, [5, 6], seed=3, **kw) == generate(model, [5, 6], seed=3, **kw)
    outs = {tuple(generate(model, [5, 6], seed=s, **kw)) for s in range(5)}
    assert len(outs) > 1


def test_top_k_one_is_greedy(model):
    assert generate(model, [7, 8], max_new_tokens=10, temperature=1.0, top_k=1, seed=0) == generate(
        model, [7, 8], max_new_tokens=10
    )


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, [5, 6, 7], max_new_tokens=20)
    penalized = generate(model, [5, 6, 7], max_new_tokens=20, repetition_penalty=5.0)
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_stop_ids_end_generation_and_are_not_output(model):
    full = generate(model, [5, 6, 7], max_new_tokens=20)
    stop = full[4]
    out = generate(model, [5, 6, 7], max_new_tokens=20, stop_ids=[stop])
    assert out == full[: full.index(stop)]


def test_stop_strings_cut_the_text(model, tok):
    full = generate(model, [5, 6, 7], max_new_tokens=20)
    text = tok.decode(full)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = generate(model, [5, 6, 7], max_new_tokens=20, stop_strings=[stop], tokenizer=tok)
    assert stop not in tok.decode(out)
    assert text.startswith(tok.decode(out))
    assert list(generate_stream(model, [5, 6, 7], 20, stop_strings=[stop], tokenizer=tok)) == out


def test_stream_yields_the_same_tokens_one_at_a_time(model):
    stream = generate_stream(model, [5, 6, 7], max_new_tokens=10)
    first = next(stream)
    assert (
        torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    )  # nothing leaks to the caller
    rest = list(stream)
    assert [first, *rest] == generate(model, [5, 6, 7], max_new_tokens=10)


def test_bad_arguments_are_clear(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [1], max_new_tokens=3, stop_strings=["x"])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], max_new_tokens=3, temperature=-1)


def test_numpy_and_tensor_batches_are_accepted(model):
    import numpy as np

    prompts = [[5, 6, 7], [8, 9, 10]]
    expected = generate(model, prompts, max_new_tokens=4)
    assert generate(model, np.array(prompts), max_new_tokens=4) == expected
    assert generate(model, torch.tensor(prompts), max_new_tokens=4) == expected
    assert generate(model, np.array([5, 6, 7]), max_new_tokens=4) == expected[0]


def test_generation_inside_no_grad_leaves_no_inference_tensors(model):
    """Training-time sampling runs under no_grad: its outputs and the KV cache must stay normal
    tensors (ZeRO-3 gathers weights during those forwards); alone it runs in inference mode."""
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.is_inference()))
    try:
        with torch.no_grad():
            generate(model, [5, 6], max_new_tokens=2)
        assert seen and not any(seen)
        seen.clear()
        generate(model, [5, 6], max_new_tokens=2)
        assert seen and all(seen)
    finally:
        hook.remove()
