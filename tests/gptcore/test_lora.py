"""LoRA adapters: the adapted model starts as the base, only the adapters train, and the merged
weights give the logits the base plus its adapters give."""

from __future__ import annotations

import pytest
import torch

from gptcore import GPT, GPTConfig
from gptcore.lora import ALL_TARGETS, LoRALinear, apply_lora, merge_state_dict

LLAMA = GPTConfig(
    vocab_size=97,
    context_length=32,
    n_layer=2,
    n_head=4,
    d_model=32,
    bias=False,
    attn_bias=False,
    mlp_bias=False,
    norm="rmsnorm",
    positions="rotary",
    mlp="swiglu",
    n_kv_head=2,
    mlp_hidden=48,
)


def _model(config: GPTConfig = LLAMA, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize(
    "config",
    [LLAMA, GPTConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, d_model=32)],
    ids=["llama", "gpt2"],
)
def test_the_merged_model_gives_the_logits_of_the_base_plus_its_adapters(config):
    x = torch.randint(0, config.vocab_size, (2, 16))
    model = _model(config)
    base_logits, _ = model(x)
    apply_lora(model, r=4, alpha=8.0)
    adapted_start, _ = model(x)
    assert torch.equal(
        adapted_start, base_logits
    )  # B = 0: the adapted model starts as the base exactly
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.2)  # as if trained
    adapted, _ = model(x)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merged = GPT(config).eval()
    state = merge_state_dict(model.state_dict(), r=4, alpha=8.0)
    assert not any("lora" in k for k in state) and state.keys() == GPT(config).state_dict().keys()
    merged.load_state_dict(state)
    logits, _ = merged(x)
    torch.testing.assert_close(logits, adapted, rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_the_base_names_stay():
    model = _model()
    names = set(model.state_dict())
    adapted = apply_lora(model, r=2, alpha=4.0, targets=("attn.c_attn",))
    assert adapted == ["blocks.0.attn.c_attn", "blocks.1.attn.c_attn"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"}
    assert set(model.state_dict()) == names | trainable
    loss = model(torch.randint(0, 97, (1, 8)), targets=torch.randint(0, 97, (1, 8)))[1]
    loss.backward()
    assert (
        model.blocks[0].attn.c_attn.weight.grad is None
        and model.blocks[0].attn.c_attn.lora_A.grad is not None
    )


def test_a_target_that_matches_no_layer_names_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"'attn.q_proj' matches no linear layer; the model's are: attn.c_attn"
    ):
        apply_lora(_model(), r=2, alpha=4.0, targets=("attn.q_proj",))
    assert set(ALL_TARGETS) <= {".".join(n.split(".")[-2:]) for n, _ in _model().named_modules()}
