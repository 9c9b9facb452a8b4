"""Interpretability artifacts for one text: per-token loss, attention maps, worst tokens,
attribution.

What it is: the numbers (:func:`token_losses`, :func:`attention_maps`, :func:`input_attribution`),
the files drawn from them (an HTML page and a PNG of the per-token loss, one PNG grid of every
layer's and head's attention, the worst-predicted tokens as Markdown, CSV and JSON, an attribution
bar chart), and :func:`explain`, which makes all of them for any text and a bundle.

What it is not: a general interpretability toolkit, nor part of the model. Attention weights are
recomputed here from each attention module's input, because gptcore attends through fused
scaled_dot_product_attention, which never materialises them; :func:`attention_maps` checks the
recomputation against the module's real output, so a change in gptcore's attention cannot make
these pictures silently wrong.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: that needs no
global backend (nothing of a notebook's own backend is switched) and keeps no figure registry
that would hold every figure drawn in a long-lived process. Saving a Figure to PNG uses Agg.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.evaluate.metrics import token_bytes
from flows.workdir import atomic_write_text
from gptcore.model import apply_rope

log = logging.getLogger(__name__)

_GRID_COLUMNS = 32  # tokens per row of the loss heatmap
_LABELLED_TOKENS = 1024  # above this, heatmap cells are too small to carry their token text


@dataclass(frozen=True)
class TokenRow:
    """One target token of a sample: what it was, what the model expected instead, what it cost."""

    position: int
    """Index of the token in the sample (the first token is never a target)."""
    token: str
    loss: float
    """Cross-entropy of this token given the ones before it, in nats."""
    predicted: str
    """The model's most likely token at this position."""
    context: str
    """Up to 40 characters of text before the token."""


# --------------------------------------------------------------------------- numbers


def token_losses(model: Any, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-target loss (n-1,) in nats and the model's argmax prediction (n-1,) for a sample of n
    ids."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([list(ids[:-1])], device=device)  # (1, T)
    y = torch.tensor(list(ids[1:]), device=device)  # (T,)
    with torch.inference_mode():
        logits, _ = model(x)  # (1, T, vocab)
        logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, vocab)
        losses = -logp[torch.arange(len(y), device=device), y]
    return losses.cpu().numpy().astype(np.float64), logits[0].argmax(-1).cpu().numpy()


def _recompute_attention(
    attn: torch.nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights (B, nh, T, T) of a CausalSelfAttention for its (already normed) input
    x (B, T, C) and rotary angles if any, and the module output they imply (B, T, C), mirroring
    gptcore/model.py."""
    B, T, C = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = attn.c_attn(x).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
    q, k, v = qkv.split((nh, nkv, nkv), dim=1)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = (
        k.repeat_interleave(nh // nkv, dim=1),
        v.repeat_interleave(nh // nkv, dim=1),
    )  # each (B, nh, T, hs)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (B, nh, T, T)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return weights, attn.c_proj(y)


def attention_maps(model: Any, ids: Sequence[int]) -> np.ndarray:
    """Attention weights of every layer and head over `ids`: (n_layer, n_head, T, T), rows sum to 1.

    Raises RuntimeError if the weights, applied to the values and projected, do not reproduce what
    each attention module returned in the real forward pass.
    """
    model.eval()
    device = next(model.parameters()).device
    seen: dict[int, tuple[torch.Tensor, tuple | None, torch.Tensor]] = {}

    def capture(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            rope = args[3] if len(args) > 3 else None  # args: (ln_1(x), mask, cache, rope)
            seen[layer] = (args[0].detach(), rope, output.detach())

        return hook

    handles = [block.attn.register_forward_hook(capture(i)) for i, block in enumerate(model.blocks)]
    try:
        with torch.inference_mode():
            model(torch.tensor([list(ids)], device=device))
            maps = []
            for layer, block in enumerate(model.blocks):
                x, rope, real = seen[layer]
                weights, implied = _recompute_attention(block.attn, x, rope)
                _check_reproduces(layer, implied, real)
                maps.append(weights[0].float().cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(maps)  # (L, nh, T, T)


def _check_reproduces(layer: int, implied: torch.Tensor, real: torch.Tensor) -> None:
    tol = 1e-4 if real.dtype == torch.float32 else 3e-2  # relative to the output's scale
    err = float((implied - real).abs().max()) / max(float(real.abs().max()), 1e-12)
    if not err <= tol:  # also catches NaN
        raise RuntimeError(
            f"attention maps of layer {layer} do not reproduce the attention output (relative "
            f"error {err:.2e} > {tol:.0e}): gptcore.model.CausalSelfAttention changed; update "
            "flows/evaluate/explain.py::_recompute_attention to match it"
        )


def input_attribution(model: Any, ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """Gradient x input of each prompt token for the model's next (argmax) token: (n,), and that
    token.

    The score of token i is the dot product of its token embedding with the gradient of the
    predicted token's logit with respect to that embedding (the first-order estimate of how much
    the logit would drop if the embedding were zeroed). Needs gradients: call it outside
    inference mode. Parameter gradients are neither computed nor left behind.
    """
    model.eval()
    device = next(model.parameters()).device
    held: dict[str, torch.Tensor] = {}

    def leaf(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        held["emb"] = output.detach().requires_grad_(True)  # a leaf we can differentiate against
        return held["emb"]

    handle = model.wte.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits, _ = model(
                torch.tensor([list(ids)], device=device), last_logits_only=True
            )  # (1, 1, vocab)
            predicted = int(logits[0, -1].argmax())
            (grad,) = torch.autograd.grad(logits[0, -1, predicted], held["emb"])  # (1, T, C)
    finally:
        handle.remove()
    scores = (grad[0].float() * held["emb"][0].detach().float()).sum(dim=-1)  # (T,)
    return scores.cpu().numpy().astype(np.float64), predicted


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text; bytes that are not UTF-8 alone (part of a multi-byte character) are
    shown as ``\\xNN`` escapes rather than all as the same U+FFFD."""
    pieces = token_bytes(tokenizer)
    return [pieces[int(i)].decode("utf-8", errors="backslashreplace") for i in ids]


def worst_tokens(
    tokenizer: Any, ids: Sequence[int], losses: np.ndarray, predicted: np.ndarray, count: int
) -> list[TokenRow]:
    """The `count` targets with the highest loss, worst first (ties: earlier position first)."""
    order = np.argsort(-losses, kind="stable")[:count].tolist()
    tokens = token_texts(tokenizer, ids)
    guesses = token_texts(tokenizer, predicted)
    return [
        TokenRow(
            position=i + 1,
            token=tokens[i + 1],
            loss=float(losses[i]),
            predicted=guesses[i],
            context=tokenizer.decode(list(ids[: i + 1]))[-40:],
        )
        for i in order
    ]


# --------------------------------------------------------------------------- files


def _show(token: str) -> str:
    """Token text made visible on a plot: whitespace drawn, `$` kept from starting mathtext."""
    return (
        token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u00b7").replace("$", r"\$")
    )


def _colour(loss: float, scale: float) -> str:
    """White (0 nats) to red (`scale` nats and above)."""
    fade = round(255 * (1.0 - min(max(loss / scale, 0.0), 1.0)))
    return f"rgb(255,{fade},{fade})"


def write_loss_html(
    path: Path,
    tokens: Sequence[str],
    losses: np.ndarray,
    predicted: Sequence[str],
    scale: float,
    title: str,
) -> None:
    """Tokens as spans shaded by their loss, with the loss and the expected token on hover."""
    esc = html.escape
    spans = [f'<span class="first" title="first token: not predicted">{esc(tokens[0])}</span>']
    for token, loss, guess in zip(tokens[1:], losses, predicted, strict=True):
        tip = f"loss {loss:.3f} nats; model expected {guess!r}"
        spans.append(
            f'<span style="background:{_colour(loss, scale)}" '
            f'title="{esc(tip)}">{esc(token)}</span>'
        )
    legend = "".join(
        f'<span style="background:{_colour(v, scale)}">&nbsp;{v:.1f}&nbsp;</span>'
        for v in np.linspace(0.0, scale, 6)
    )
    text_style = (
        "font-family: monospace; white-space: pre-wrap; line-height: 1.7; "
        "border: 1px solid #ccc; padding: 1em;"
    )
    mean_loss = float(np.mean(losses))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.text {{ {text_style} }}
.text span {{ border-right: 1px solid #eee; }}
.first {{ background: #ddd; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Each token is shaded by its loss in nats (cross-entropy given the tokens before it);
{scale:.2f} nats, as bad as a uniform guess over the vocabulary, and above is full red.
Hover over a token for its loss and the token the model expected. Mean loss {mean_loss:.3f} nats
over {len(losses)} tokens.</p>
<p>Scale: {legend}</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    atomic_write_text(path, page)


def write_loss_png(
    path: Path, tokens: Sequence[str], losses: np.ndarray, scale: float, title: str
) -> None:
    """The per-token loss as a grid of cells, _GRID_COLUMNS tokens a row, in reading order."""
    from matplotlib.figure import Figure

    n = len(tokens)
    rows = math.ceil(n / _GRID_COLUMNS)
    grid = np.full(rows * _GRID_COLUMNS, np.nan)
    grid[1:n] = losses  # the first token has no loss: left blank
    fig = Figure(figsize=(_GRID_COLUMNS * 0.45 + 1.5, rows * 0.45 + 1.0))
    ax = fig.add_subplot()
    image = ax.imshow(
        grid.reshape(rows, _GRID_COLUMNS), cmap="Reds", vmin=0.0, vmax=scale, aspect="auto"
    )
    if n <= _LABELLED_TOKENS:
        for i, token in enumerate(tokens):
            ax.text(
                i % _GRID_COLUMNS,
                i // _GRID_COLUMNS,
                _show(token)[:8],
                ha="center",
                va="center",
                fontsize=5,
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="loss (nats)", fraction=0.03)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def write_attention_png(path: Path, maps: np.ndarray, title: str) -> int:
    """One panel per layer (row) and head (column); returns the number of panels drawn."""
    from matplotlib.figure import Figure

    layers, heads = maps.shape[:2]
    fig = Figure(figsize=(heads * 1.4 + 0.8, layers * 1.4 + 0.8))
    axes = fig.subplots(layers, heads, squeeze=False, gridspec_kw={"wspace": 0.08, "hspace": 0.08})
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(
                maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(f"{title}\nrow: query position, column: key position attended to")
    fig.savefig(path, dpi=100)
    return sum(1 for ax in fig.axes if ax.images)


def write_worst_tokens(out_dir: Path, rows: Sequence[TokenRow]) -> list[Path]:
    """worst_tokens.md, .csv and .json; token texts shown as Python literals so whitespace is
    visible."""

    def cell(text: str) -> str:
        return repr(text).replace("|", "\\|")

    md = [
        "| # | position | token | loss (nats) | model expected | context |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {rank} | {r.position} | {cell(r.token)} | {r.loss:.3f} | {cell(r.predicted)} | "
        f"{cell(r.context)} |"
        for rank, r in enumerate(rows, 1)
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["position", "token", "loss", "predicted", "context"])
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    paths = [
        out_dir / "worst_tokens.md",
        out_dir / "worst_tokens.csv",
        out_dir / "worst_tokens.json",
    ]
    atomic_write_text(paths[0], "\n".join(md) + "\n")
    atomic_write_text(paths[1], buf.getvalue())
    atomic_write_text(
        paths[2], json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False) + "\n"
    )
    return paths


def write_attribution(
    out_dir: Path, tokens: Sequence[str], scores: np.ndarray, predicted: str
) -> list[Path]:
    """attribution.png (a bar per prompt token) and attribution.json."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.3 * len(tokens) + 1.5), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(len(scores)), scores, color=["tab:red" if s > 0 else "tab:blue" for s in scores])
    ax.set_xticks(range(len(tokens)), [_show(t)[:12] for t in tokens], rotation=90, fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylabel("gradient x input")
    ax.set_title(
        f"What made the model predict {_show(predicted)!r} next (gradient x input, per token)"
    )
    paths = [out_dir / "attribution.png", out_dir / "attribution.json"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    record = {
        "predicted_next": predicted,
        "tokens": [
            {"position": i, "token": t, "attribution": float(s)}
            for i, (t, s) in enumerate(zip(tokens, scores, strict=True))
        ],
    }
    atomic_write_text(paths[1], json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return paths


# --------------------------------------------------------------------------- entry points


def explain_ids(
    model: Any,
    tokenizer: Any,
    ids: Sequence[int],
    out_dir: Path,
    worst: int = 25,
    title: str = "Per-token loss",
) -> dict[str, Any]:
    """loss_heatmap.html/.png, attention.png and worst_tokens.* for a sample of 2..context+1 ids."""
    if not 2 <= len(ids) <= model.config.context_length + 1:
        raise ValueError(
            f"a sample needs 2 to {model.config.context_length + 1} tokens, got {len(ids)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    losses, predicted = token_losses(model, ids)
    tokens = token_texts(tokenizer, ids)
    guesses = token_texts(tokenizer, predicted)
    scale = math.log(model.config.vocab_size)
    write_loss_html(out_dir / "loss_heatmap.html", tokens, losses, guesses, scale, title)
    write_loss_png(out_dir / "loss_heatmap.png", tokens, losses, scale, title)
    maps = attention_maps(model, ids[:-1])  # the positions the model read to make its predictions
    panels = write_attention_png(
        out_dir / "attention.png", maps, f"Attention over {maps.shape[-1]} tokens"
    )
    table = write_worst_tokens(out_dir, worst_tokens(tokenizer, ids, losses, predicted, worst))
    files = [
        out_dir / n for n in ("loss_heatmap.html", "loss_heatmap.png", "attention.png")
    ] + table
    return {
        "tokens": len(ids),
        "mean_loss": float(np.mean(losses)),
        "attention": {"layers": int(maps.shape[0]), "heads": int(maps.shape[1]), "panels": panels},
        "files": [str(f) for f in files],
    }


def explain(
    bundle_dir: str | Path, text: str, out_dir: str | Path, worst: int = 25
) -> dict[str, Any]:
    """All interpretability artifacts for `text` under a bundle's model, written to `out_dir`.

    The loss, attention and worst-token files cover the text's first context_length + 1 tokens;
    the attribution explains the token the model predicts after the text (its last context_length
    tokens). Returns what was made: token counts, mean loss, the predicted token, the files.
    """
    from gptcore import load_bundle

    model, tokenizer, _ = load_bundle(
        bundle_dir, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    out = Path(out_dir)
    ids = tokenizer.encode(text)
    T = model.config.context_length
    summary = explain_ids(
        model, tokenizer, ids[: T + 1], out, worst, title="Per-token loss of the given text"
    )
    prompt = ids[-T:]
    scores, next_id = input_attribution(model, prompt)
    predicted = token_texts(tokenizer, [next_id])[0]
    summary["files"] += [
        str(p) for p in write_attribution(out, token_texts(tokenizer, prompt), scores, predicted)
    ]
    summary.update(text_tokens=len(ids), predicted_next=predicted)
    log.info("explain: %d tokens of text, artifacts in %s", len(ids), out)
    return summary
