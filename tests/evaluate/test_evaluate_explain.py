"""Interpretability: attention maps that provably are the model's, a correct attribution, real
files."""

from __future__ import annotations

import html
import json

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flows.evaluate.explain import attention_maps, explain, input_attribution, token_texts
from gptcore import load_bundle

TEXT = "A cat sat on a <b>bold</b> & café box."  # 28 tokens: within the 32-token context
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model(trained_bundle):
    return load_bundle(trained_bundle)[0]


@pytest.fixture(scope="module")
def explained(trained_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    return out, explain(trained_bundle, TEXT, out, worst=5)


def test_attention_rows_are_causal_distributions(model, tok):
    ids = tok.encode(TEXT)[:20]
    maps = attention_maps(model, ids)
    assert maps.shape == (model.config.n_layer, model.config.n_head, 20, 20)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0.0)  # no query attends to a later key
    assert np.all(np.tril(maps) >= 0.0)


def test_attention_maps_times_values_reproduce_each_attention_output(model, tok):
    """Independent of the module's own check: values and outputs captured from the real forward."""
    ids = tok.encode(TEXT)[:20]
    maps = torch.from_numpy(attention_maps(model, ids))
    values, outputs = {}, {}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(
            block.attn.c_attn.register_forward_hook(
                lambda m, a, out, i=i: values.__setitem__(i, out.detach())
            )
        )
        hooks.append(
            block.attn.register_forward_hook(
                lambda m, a, out, i=i: outputs.__setitem__(i, out.detach())
            )
        )
    with torch.no_grad():
        model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        nh, hs = model.config.n_head, model.config.head_dim
        for i, block in enumerate(model.blocks):
            v = values[i].view(1, 20, 3, nh, hs)[:, :, 2].transpose(1, 2)  # (1, nh, T, hs)
            y = (maps[i][None] @ v).transpose(1, 2).reshape(1, 20, nh * hs)
            torch.testing.assert_close(block.attn.c_proj(y), outputs[i], rtol=1e-4, atol=1e-5)


def test_attention_maps_refuse_to_draw_what_the_model_did_not_compute(model, tok, monkeypatch):
    """If gptcore's attention changes (here: made non-causal), the recomputation no longer
    matches."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: sdpa(q, k, v))
    with pytest.raises(RuntimeError, match="do not reproduce"):
        attention_maps(model, tok.encode(TEXT)[:20])


def test_gradient_times_input_matches_finite_differences(model, tok):
    """Score i is d(logit of the predicted token)/d(scale of token i's embedding) at scale 1."""
    m = type(model)(model.config)
    m.load_state_dict(model.state_dict())
    m = m.double().eval()
    ids = tok.encode(TEXT)[:12]
    scores, predicted = input_attribution(m, ids)
    assert scores.shape == (len(ids),) and np.all(np.isfinite(scores)) and np.abs(scores).max() > 0
    assert all(p.grad is None for p in m.parameters())

    def logit(position, scale):
        def rescale(module, args, out):
            out = out.clone()
            out[0, position] *= scale
            return out

        handle = m.wte.register_forward_hook(rescale)
        with torch.no_grad():
            value = float(m(torch.tensor([ids]))[0][0, -1, predicted])
        handle.remove()
        return value

    h = 1e-5
    finite = np.array([(logit(i, 1 + h) - logit(i, 1 - h)) / (2 * h) for i in range(len(ids))])
    np.testing.assert_allclose(scores, finite, rtol=1e-5, atol=1e-8)


def test_explain_writes_real_images_and_a_safe_html_page(explained, tok):
    out, summary = explained
    for name in ("loss_heatmap.png", "attention.png", "attribution.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        assert (
            image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0
        )  # not a blank canvas
    page = (out / "loss_heatmap.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<title>" in page and "Scale:" in page
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # the text's markup is escaped
    ids = tok.encode(TEXT)
    for token in token_texts(tok, ids):
        assert f">{html.escape(token)}</span>" in page
    assert page.count("<span style=") >= len(ids) - 1  # every predicted token is shaded
    assert not any(s in page for s in ("http://", "https://", "<script", "<link"))  # self-contained
    assert summary["attention"] == {"layers": 4, "heads": 4, "panels": 16}
    assert summary["tokens"] == summary["text_tokens"] == len(ids)


def test_worst_tokens_are_the_highest_losses_in_order(explained, tok):
    out, summary = explained
    rows = json.loads((out / "worst_tokens.json").read_text())
    assert len(rows) == 5
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and max(losses) > summary["mean_loss"]
    assert set(rows[0]) == {"position", "token", "loss", "predicted", "context"}
    ids = tok.encode(TEXT)
    assert all(r["token"] == token_texts(tok, [ids[r["position"]]])[0] for r in rows)
    md = (out / "worst_tokens.md").read_text().splitlines()
    assert md[0].startswith("| # | position | token |") and len(md) == 2 + 5
    assert len((out / "worst_tokens.csv").read_text().splitlines()) == 1 + 5


def test_explain_attribution_covers_every_prompt_token(explained, tok):
    out, summary = explained
    record = json.loads((out / "attribution.json").read_text())
    assert len(record["tokens"]) == len(tok.encode(TEXT))
    assert record["predicted_next"] == summary["predicted_next"]
    assert any(t["attribution"] != 0.0 for t in record["tokens"])


def test_token_texts_escape_partial_characters_instead_of_hiding_them(tok):
    ids = tok.encode("é")
    texts = token_texts(tok, ids)
    assert "\ufffd" not in "".join(texts)
    if len(ids) > 1:  # é is two bytes; with no merge for it, each byte token shows as its escape
        assert texts == ["\\xc3", "\\xa9"]


def test_attention_maps_of_a_llama_family_model_are_its_own():
    """Rotary positions and grouped-query attention: attention_maps checks itself against the
    forward."""
    from gptcore import GPT, GPTConfig

    torch.manual_seed(0)
    llama = GPT(
        GPTConfig(
            vocab_size=64,
            context_length=32,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            bias=False,
            norm="rmsnorm",
            positions="rotary",
            mlp="swiglu",
        )
    )
    maps = attention_maps(llama, list(range(1, 17)))
    assert maps.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
