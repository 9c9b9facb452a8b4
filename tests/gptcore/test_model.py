"""Model invariants on the tiny preset, GPT-2 and Llama family: shapes, causality, initial loss,
masking, KV cache, activation checkpointing, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from gptcore import GPT, PRESETS, GPTConfig, KVCache, preset

# The Llama family's switches on the tiny shape: GQA, an untied head, SwiGLU of its own width.
LLAMA = dict(
    bias=False,
    norm="rmsnorm",
    positions="rotary",
    mlp="swiglu",
    n_kv_head=2,
    mlp_hidden=160,
    tie_embeddings=False,
)
FAMILIES = {"gpt2": {}, "llama": LLAMA}


@pytest.fixture(params=list(FAMILIES))
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=512, **FAMILIES[request.param])).eval()


def test_forward_shapes_and_no_loss_without_targets(model):
    idx = torch.randint(0, 512, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 512)
    assert loss is None


def test_last_logits_only_is_the_last_position_of_the_full_logits(model):
    idx = torch.randint(0, 512, (2, 9))
    full, _ = model(idx)
    last, _ = model(idx, last_logits_only=True)
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_param_count_formula_matches_module():
    for cfg in (
        preset("tiny"),
        preset("tiny", bias=False),
        GPTConfig(vocab_size=100, n_layer=2, n_head=2, d_model=32),
        preset("tiny", **LLAMA),
        preset("tiny", **(LLAMA | dict(attn_bias=True, tie_embeddings=True))),
        preset("tiny", bias=True, norm="rmsnorm", mlp_bias=False, n_kv_head=1),
    ):
        assert cfg.num_params() == GPT(cfg).num_params()


def test_presets_and_flops():
    assert PRESETS["tiny"].num_params() < 1_000_000
    assert 123e6 < PRESETS["gpt2-124m"].num_params() < 125e6  # 124,439,808 with tied head
    assert {"gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b"} <= set(PRESETS)
    t = PRESETS["tiny-llama"]  # every switch of the family, on the tiny shape
    assert (t.norm, t.positions, t.mlp, t.kv_heads, t.tie_embeddings, t.bias) == (
        "rmsnorm",
        "rotary",
        "swiglu",
        2,
        False,
        False,
    )
    assert (t.n_layer, t.d_model, t.context_length) == (
        PRESETS["tiny"].n_layer,
        PRESETS["tiny"].d_model,
        128,
    )
    c = PRESETS["gpt2-124m"]
    assert c.flops_per_token() > 6 * (c.num_params() - c.context_length * c.d_model)


def test_causality_future_tokens_do_not_change_past_logits(model):
    idx = torch.randint(0, 512, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 512
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_initial_loss_is_close_to_uniform(model):
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (8, 64))
    targets = torch.randint(0, 512, (8, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.3


def test_loss_mask_and_ignore_index_select_positions(model):
    idx = torch.randint(0, 512, (2, 10))
    targets = torch.randint(0, 512, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 5:] = True
    logits, masked = model(idx, targets, loss_mask=mask)
    manual = torch.nn.functional.cross_entropy(
        logits[:, 5:].reshape(-1, 512), targets[:, 5:].reshape(-1)
    )
    torch.testing.assert_close(masked, manual)
    ignored = targets.clone()
    ignored[:, :5] = -1
    _, via_ignore = model(idx, ignored)
    torch.testing.assert_close(via_ignore, manual)


def test_gradient_ignores_masked_positions(model):
    model.train()
    idx = torch.randint(0, 512, (1, 8))
    targets = torch.randint(0, 512, (1, 8))
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    other = targets.clone()
    other[0, :4] = (other[0, :4] + 3) % 512  # change only masked-out targets
    grads = []
    for t in (targets, other):
        model.zero_grad()
        _, loss = model(idx, t, loss_mask=mask)
        loss.backward()
        grads.append(model.wte.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_kv_cache_matches_full_forward(model):
    torch.manual_seed(2)
    idx = torch.randint(0, 512, (2, 30))
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=30)
    prefill, _ = model(idx[:, :10], cache=cache)
    steps = [prefill]
    for t in range(10, 30):
        out, _ = model(idx[:, t : t + 1], cache=cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_mask_matches_unpadded(model):
    idx = torch.randint(0, 512, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), idx], dim=1)
    mask = torch.cat(
        [torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1
    )
    a, _ = model(idx)
    b, _ = model(padded, padding_mask=mask)
    torch.testing.assert_close(b[:, 5:], a, atol=1e-5, rtol=1e-5)


def test_too_long_sequence_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, model.config.context_length + 1, dtype=torch.long))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_checkpointing_gives_the_same_gradients(family):
    idx = torch.randint(0, 128, (2, 24))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = GPT(
            preset(
                "tiny", vocab_size=128, activation_checkpointing=checkpointing, **FAMILIES[family]
            )
        ).train()
        m(idx, torch.roll(idx, -1, dims=1))[1].backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_overfits_one_batch_with_and_without_activation_checkpointing(family):
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = GPT(
            preset(
                "tiny", vocab_size=128, activation_checkpointing=checkpointing, **FAMILIES[family]
            )
        ).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        idx = torch.randint(0, 128, (4, 32))
        targets = torch.roll(idx, -1, dims=1)
        for _ in range(150):
            _, loss = m(idx, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.3, (checkpointing, loss.item())


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"vocab_size": 10, "nope": 1})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    for bad, message in (
        (dict(norm="batchnorm"), "norm='batchnorm' must be one of layernorm, rmsnorm"),
        (dict(positions="alibi"), "positions='alibi'"),
        (dict(mlp="relu"), "mlp='relu'"),
        (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
        (dict(mlp_hidden=-1), "mlp_hidden=-1"),
        (dict(positions="rotary", n_head=64, d_model=64), "even head_dim"),
        (dict(positions="rotary", rope_scaling_factor=0.5), "rope_scaling_factor"),
        (
            dict(positions="rotary", rope_scaling_factor=8.0, rope_low_freq_factor=4.0),
            "rope scaling",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            preset("tiny", **bad)
    for c in (preset("tiny"), preset("tiny", **LLAMA), PRESETS["llama-3.2-1b"]):
        assert GPTConfig.from_dict(c.to_dict()) == c
