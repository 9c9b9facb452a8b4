"""Greedy decoding throughput: gptcore generate (KV cache) vs transformers generate, same weights.

Batch 1 and batch 8, 256 new tokens, fp32 (or bf16) weights for both, interleaved runs. Also our own
no-cache path, which re-runs the whole sequence each step. Targets: >= 2x transformers, >= 5x
no-cache. Model shape from the flags: 4 layers, d=256, vocab 8192 by default;
`--d-model 64 --vocab 4096` is the tiny preset, `--d-model 768 --vocab 50257 --layers 12 --heads 12`
the GPT-2 124M shape.

    python bench/generate.py [--new-tokens 256] [--repeats 3] [--d-model D] [--vocab V]
                             [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import save

from gptcore import GPT, GPTConfig, generate
from gptcore.hf import export_gpt2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--d-model", type=int, default=256, help="width (64 with vocab 4096 is the tiny preset)"
    )
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="weights of both models"
    )
    args = ap.parse_args()
    from transformers import GPT2LMHeadModel

    cfg = GPTConfig(
        vocab_size=args.vocab,
        context_length=512,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
    )
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        export_gpt2(ours, d)
        theirs = GPT2LMHeadModel.from_pretrained(d).eval()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours.to(dtype)
    theirs.to(dtype)
    n = args.new_tokens
    results: dict = {
        "bench": "greedy new tokens/s",
        "config": cfg.to_dict(),
        "new_tokens": n,
        "dtype": args.dtype,
    }
    for batch in (1, 8):
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))

        def run_ours(use_cache: bool = True, prompts=prompts):
            out = generate(ours, prompts.tolist(), n, use_cache=use_cache)
            assert all(len(o) == n for o in out)

        def run_theirs(prompts=prompts):
            with torch.inference_mode():
                out = theirs.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == args.prompt_len + n

        run_ours()
        run_theirs()  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours.append(_time(run_ours))
            t_theirs.append(_time(run_theirs))
        t_nocache = _time(lambda: run_ours(False))
        print(
            batch,
            "seconds per run: ours",
            [round(x, 3) for x in t_ours],
            "transformers",
            [round(x, 3) for x in t_theirs],
            flush=True,
        )
        best_ours = min(t_ours)
        results[f"batch{batch}"] = {
            "gpt_kv_tokens_per_s": round(batch * n / best_ours, 1),
            "hf_tokens_per_s": round(batch * n / min(t_theirs), 1),
            "gpt_nocache_tokens_per_s": round(batch * n / t_nocache, 1),
            "ratio_vs_hf": round(min(t_theirs) / best_ours, 2),
            "ratio_vs_nocache": round(t_nocache / best_ours, 2),
        }
    results["targets"] = {"ratio_vs_hf": 2.0, "ratio_vs_nocache": 5.0}
    save(f"generate_l{args.layers}_d{args.d_model}_v{args.vocab}_{args.dtype}", results)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
