"""Training-step throughput: gptcore GPT vs transformers GPT2LMHeadModel, same config, batch,
precision.

Both models get the same weights shape, batch, optimizer (AdamW) and precision (bf16 autocast or
fp32), in this process, interleaved in rounds so machine noise hits both. GPT uses the options it
offers and training uses: the fused chunked LM head + loss (`--plain-loss` turns it off) and, with
`--compile`, torch.compile (training's `compile: true`); the baseline runs as transformers ships it.
Target: ratio >= 1.25.

    python bench/model.py [--precision bf16|fp32] [--compile] [--plain-loss] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import save, timed

from gptcore import GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the GPT")
    ap.add_argument(
        "--plain-loss",
        action="store_true",
        help="full logits + cross_entropy instead of the fused chunked loss training uses",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig(vocab_size=8192, context_length=args.seq, n_layer=4, n_head=4, d_model=256)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    theirs = GPT2LMHeadModel(hf_cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    ours_fwd = torch.compile(ours) if args.compile else ours
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        with autocast():
            _, loss = ours_fwd(idx, targets, return_logits=args.plain_loss)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with autocast():
            # labels are shifted inside HF; same token count and loss work
            loss = theirs(input_ids=idx, labels=targets).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    tokens = args.batch * args.seq
    # Alternate single steps so that load from elsewhere on the machine hits both equally.
    timed(step_ours, warmup=3, iters=0)
    timed(step_theirs, warmup=2, iters=0)
    ours_t, theirs_t = [], []
    for _ in range(args.rounds * args.iters):
        ours_t.append(timed(step_ours, warmup=0, iters=1))
        theirs_t.append(timed(step_theirs, warmup=0, iters=1))
    ours_tps = tokens / sorted(ours_t)[len(ours_t) // 2]
    theirs_tps = tokens / sorted(theirs_t)[len(theirs_t) // 2]
    suffix = ("_compile" if args.compile else "") + ("_plainloss" if args.plain_loss else "")
    name = f"model_{args.precision}{suffix}"
    save(
        name,
        {
            "bench": "train step tokens/s, GPT vs transformers GPT2LMHeadModel",
            "config": cfg.to_dict(),
            "batch": args.batch,
            "precision": args.precision,
            "compile": args.compile,
            "fused_loss": not args.plain_loss,
            "gpt_tokens_per_s": round(ours_tps),
            "hf_tokens_per_s": round(theirs_tps),
            "ratio": round(ours_tps / theirs_tps, 3),
            "target": 1.25,
        },
    )


if __name__ == "__main__":
    main()
