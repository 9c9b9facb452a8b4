"""The model's fast paths agree with the plain ones: fused chunked loss, oneDNN-packed CPU linears,
the flat decoding step."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import gptcore.fused_loss as fused_loss
from gptcore import GPT, GPTConfig, KVCache, generate
from gptcore.decode import Decoder, can_decode_flat
from gptcore.generation import _cache_dtype, _left_pad
from gptcore.packed import Linear, pack_linears, supported

# d_model 64 with a 4096-token head: the head is large enough to be packed, the blocks are not.
CFG = GPTConfig(vocab_size=4096, context_length=64, n_layer=2, n_head=2, d_model=64)
WIDE = GPTConfig(
    vocab_size=1024, context_length=64, n_layer=2, n_head=4, d_model=256
)  # all but attn c_proj packed
NO_BIAS = GPTConfig(
    vocab_size=1024, context_length=64, n_layer=2, n_head=4, d_model=256, bias=False
)
# The Llama family: RMSNorm, RoPE with Llama-3 scaling, GQA, SwiGLU (packed), untied head, attention
# biases.
LLAMA = GPTConfig(
    vocab_size=4096,
    context_length=64,
    n_layer=2,
    n_head=8,
    n_kv_head=2,
    d_model=256,
    bias=False,
    attn_bias=True,
    norm="rmsnorm",
    positions="rotary",
    mlp="swiglu",
    mlp_hidden=384,
    tie_embeddings=False,
    rope_theta=5e5,
    rope_scaling_factor=8.0,
    rope_original_context=32,
)


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (3, 40), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (3, 40), generator=g)
    targets[0, :7] = -1
    mask = torch.rand(3, 40, generator=g) > 0.3
    return idx, targets, mask


@pytest.mark.parametrize(
    "chunk_elements", [1 << 22, 4096 * 5]
)  # one chunk; several, the last one short
@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_fused_loss_matches_plain_loss_and_gradients(monkeypatch, chunk_elements, cfg):
    monkeypatch.setattr(fused_loss, "_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(fused_loss, "_MIN_CHUNK_ROWS", 1)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, targets, mask = _batch()
    _, plain = model(idx, targets, mask)
    plain.backward()
    expected = _grads(model)
    logits, fused = model(idx, targets, mask, return_logits=False)
    fused.backward()
    got = _grads(model)
    assert logits is None
    assert torch.allclose(fused, plain, rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name


def test_fused_loss_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx, targets, mask = _batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = model(idx, targets, mask)
    plain.backward()
    expected = _grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fused = model(idx, targets, mask, return_logits=False)
    fused.backward()
    got = _grads(model)
    assert fused.dtype == torch.float32
    assert abs(float(fused) - float(plain)) < 2e-2
    head, head_plain = got["wte.weight"], expected["wte.weight"]
    assert float((head - head_plain).norm() / head_plain.norm()) < 2e-2


def test_fused_loss_with_every_target_masked_is_zero_with_a_graph():
    model = GPT(CFG)
    idx, targets, _ = _batch()
    _, loss = model(idx, targets, torch.zeros_like(targets, dtype=torch.bool), return_logits=False)
    loss.backward()
    assert float(loss) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


needs_onednn = pytest.mark.skipif(
    not supported(torch.zeros(1)), reason="no oneDNN linear in this torch build"
)


@needs_onednn
@pytest.mark.parametrize("cfg", [CFG, WIDE, LLAMA], ids=["head-only", "most-layers", "llama"])
def test_packed_decoding_matches_plain_decoding(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 12]
    with torch.no_grad():  # generate does not pack under no_grad: the plain reference
        expected = generate(model, prompts, 30)
        logits_plain, _ = model(torch.tensor([prompts[2]]))
    assert generate(model, prompts, 30, pack_weights=False) == expected
    assert all(
        m.packed is None for m in model.modules() if isinstance(m, Linear)
    )  # opted out: nothing packed
    packed = generate(model, prompts, 30)  # inference mode: packs
    assert packed == expected
    assert any(m.packed is not None for m in model.modules() if isinstance(m, Linear))
    with torch.inference_mode():
        logits_packed, _ = model(torch.tensor([prompts[2]]))
    assert torch.allclose(logits_packed, logits_plain, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_packed_weights_are_never_used_stale_or_with_grad():
    torch.manual_seed(0)
    model = GPT(WIDE)
    with torch.inference_mode():
        assert (
            pack_linears(model) == 2 * 3 + 1
        )  # qkv, MLP up and down per block, the head (not 256x256)
    layer = model.blocks[0].mlp.c_fc
    x = torch.randn(2, 5, WIDE.d_model)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # like an optimizer step: the packed copy is now stale
    with torch.inference_mode():
        assert torch.allclose(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5
        )
        pack_linears(model)  # refreshed
        assert torch.allclose(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4
        )
    clone = copy.deepcopy(model)  # the packed cache is not copied (nor pickled) with the model
    assert all(m.packed is None for m in clone.modules() if isinstance(m, Linear))
    assert pickle.loads(pickle.dumps(layer)).packed is None
    y = layer(x)  # grad mode: the plain path, differentiable in the weight
    y.sum().backward()
    assert layer.weight.grad is not None


@needs_onednn
def test_packed_model_decodes_under_autocast_like_the_plain_one():
    # Under bf16 autocast some layers see bf16 activations: the fp32 packed weights must step aside.
    cfg = GPTConfig(
        vocab_size=1024, context_length=64, n_layer=2, n_head=4, d_model=512
    )  # attn c_proj packed too
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            expected = generate(model, [[1, 2, 3], [4, 5]], 8)
        assert generate(model, [[1, 2, 3], [4, 5]], 8) == expected


@needs_onednn
@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN on this CPU"
)
def test_packed_bf16_decoding_matches_plain_bf16():
    torch.manual_seed(0)
    model = GPT(WIDE).eval().to(torch.bfloat16)
    with torch.no_grad():
        logits_plain, _ = model(torch.arange(20).view(1, 20))
    with torch.inference_mode():
        assert pack_linears(model) > 0
        logits_packed, _ = model(torch.arange(20).view(1, 20))
    assert logits_packed.dtype == torch.bfloat16
    assert float((logits_packed.float() - logits_plain.float()).abs().max()) < 0.1


@pytest.mark.parametrize(
    "cfg", [CFG, WIDE, NO_BIAS, LLAMA], ids=["small", "wide", "no-bias", "llama"]
)
@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "left-padded"])
def test_flat_decoding_step_matches_forward_with_a_cache(cfg, pack, padded):
    if pack and not supported(torch.zeros(1)):
        pytest.skip("no oneDNN linear in this torch build")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 12] if padded else [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    idx, mask = _left_pad(prompts, torch.device("cpu"))
    mask = mask if padded else None
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        if pack:
            assert pack_linears(model) > 0
        caches = [KVCache(cfg, len(prompts), cfg.context_length) for _ in range(2)]
        for cache in caches:
            model(idx, cache=cache, padding_mask=mask)
        reference, flat = caches
        decoder = Decoder(model, flat, mask)
        for _ in range(8):
            ids = torch.randint(0, cfg.vocab_size, (len(prompts),), generator=g)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
            expected = model(ids[:, None], cache=reference, padding_mask=mask)[0][:, -1]
            assert torch.allclose(decoder(ids), expected, atol=1e-5, rtol=1e-5)
        assert flat.pos == reference.pos
        assert torch.allclose(flat.kv, reference.kv, atol=1e-6)


def test_flat_decoding_only_where_it_computes_what_forward_would():
    model = GPT(CFG).eval()

    class Subclass(GPT):
        pass

    with torch.inference_mode():
        assert can_decode_flat(model)
        assert not can_decode_flat(Subclass(CFG))
    with torch.no_grad():  # training-time sampling (ZeRO-3 gathers weights in module hooks)
        assert not can_decode_flat(model)
    # A hook that forces token 5 must be honoured: generation then goes through GPT.forward.
    prompt = [1, 2, 3]
    free = generate(model, prompt, 6)
    assert free != [5] * 6
    handle = model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([5]), 1e4)
    )
    try:
        assert generate(model, prompt, 6) == [5] * 6
    finally:
        handle.remove()
    assert generate(model, prompt, 6) == free


@pytest.mark.skipif(
    not supported(torch.zeros(1, dtype=torch.bfloat16)), reason="no bf16 oneDNN on this CPU"
)
def test_bf16_model_attends_in_an_exact_fp32_cache_on_cpu():
    torch.manual_seed(0)
    model = GPT(WIDE).eval().to(torch.bfloat16)
    assert _cache_dtype(model) == torch.float32
    idx = torch.randint(0, WIDE.vocab_size, (2, 10))
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        pack_linears(model)
        narrow = KVCache(WIDE, 2, WIDE.context_length, dtype=torch.bfloat16)
        wide = KVCache(WIDE, 2, WIDE.context_length, dtype=torch.float32)
        expected, _ = model(idx, cache=narrow)
        got, _ = model(idx, cache=wide)
        assert got.dtype == torch.bfloat16
        assert float((got.float() - expected.float()).abs().max()) < 0.05
        assert torch.equal(
            wide.kv.to(torch.bfloat16).float(), wide.kv
        )  # bf16 keys and values, stored exactly
        assert torch.equal(
            wide.kv[0, ..., :10, :].to(torch.bfloat16), narrow.kv[0, ..., :10, :]
        )  # first layer: same input
        decoder = Decoder(model, wide, None)
        for _ in range(6):
            ids = torch.randint(0, WIDE.vocab_size, (2,), generator=g)
            expected = model(ids[:, None], cache=narrow)[0][:, -1]
            got = decoder(ids)
            assert got.dtype == torch.bfloat16
            assert float((got.float() - expected.float()).abs().max()) < 0.05
