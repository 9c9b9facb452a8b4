"""The Llama family on a real model: SmolLM2-135M-Instruct, gptcore against transformers, same fp32
weights.

The model is `builtin:smollm2-135m-instruct` (the Q4_1 GGUF, fetched once into the gptflow cache and
sha256-checked), dequantized to fp32 by gptcore's importer; transformers gets exactly those weights
through `export_hf` and `LlamaForCausalLM.from_pretrained`. In one process:
  a. greedy decoding with the KV cache, --new-tokens (128) after a --prompt-len (32) token prompt,
     batch 1 and batch 8: gptcore `generate` vs transformers `generate`, runs interleaved, best of
     --repeats. Target >= 1.5x.
  b. batch-1 tokens/s against the memory-bandwidth limit: each token reads every weight matrix once
     (the tied head reads the embedding), so the limit is bandwidth / weight bytes; bandwidth is the
     median of seven `sum` passes over a 1 GiB fp32 tensor (a read stream, like the weights'), a
     copy reported beside it.
  c. a training step, forward + backward, 4 x 256 tokens, gptcore GPT (with the fused chunked loss
     training uses) vs LlamaForCausalLM as transformers ships it; steps interleaved one by one,
     medians. No optimizer step: AdamW over the same parameters costs both the same. Target >= 1.2x.
     --precision bf16-autocast is the target's precision; `auto` (the default) takes it where the
     CPU has bf16 matmuls (AVX512-BF16 or AMX) and fp32 elsewhere: on a CPU
     without them torch runs bf16 matmuls in a generic gemm 10-100x slower than fp32, for both
     sides.
  d. importing the GGUF: `import_model` (read, dequantize, build the GPT, write the fp32 bundle) in
     this process, and `gptflow import` in a fresh process (Python and torch start-up included).
     Target < 10 s.

    python bench/llama.py [--new-tokens 128] [--repeats 3] [--train-iters 5]
                          [--only decode,train,import] [--precision auto|fp32|bf16-autocast]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import save, timed

from flows.models.importer import import_model
from flows.models.sources import fetch_builtin
from gptcore import GPT, generate
from gptcore.gguf import load_gguf
from gptcore.hf import export_hf

SOURCE = "builtin:smollm2-135m-instruct"
PARTS = ("decode", "train", "import")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved decoding runs per side and batch"
    )
    ap.add_argument(
        "--train-iters", type=int, default=5, help="interleaved training steps per side"
    )
    ap.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16-autocast"),
        default="auto",
        help="the training step's precision (auto: bf16 autocast where the CPU has bf16 matmuls)",
    )
    args = ap.parse_args()
    if args.precision == "auto":
        args.precision = "bf16-autocast" if has_fast_bf16() else "fp32"
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        ap.error(
            f"--only: unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}"
        )
    gguf = fetch_builtin(SOURCE)
    results: dict = {
        "bench": "SmolLM2-135M: gptcore vs transformers, same fp32 weights",
        "source": SOURCE,
        "load_avg_start": os.getloadavg()[0],
    }
    rows: list[
        tuple[str, str, str, str, str]
    ] = []  # what, gptcore, transformers / limit, ratio, target
    if "import" in parts:  # first: nothing else of this run in memory yet
        results["import"] = bench_import(gguf)
        r = results["import"]
        rows.append(("import the GGUF, in process", f"{r['in_process_s']:.1f} s", "", "", "< 10 s"))
        rows.append(("import the GGUF, `gptflow import`", f"{r['cli_s']:.1f} s", "", "", "< 10 s"))
    if parts & {"decode", "train"}:
        ours, _ = load_gguf(gguf)
        with tempfile.TemporaryDirectory() as d:
            export_hf(ours, d)
            from transformers import LlamaForCausalLM

            theirs = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        results["config"] = ours.config.to_dict()
        if "decode" in parts:
            results["decode"] = bench_decode(ours, theirs, args)
            for batch in (1, 8):
                r = results["decode"][f"batch{batch}"]
                rows.append(
                    (
                        f"greedy, {args.new_tokens} new tokens, batch {batch}",
                        f"{r['gpt_tokens_per_s']} tok/s",
                        f"{r['hf_tokens_per_s']} tok/s",
                        f"{r['ratio_vs_hf']}x",
                        ">= 1.5x",
                    )
                )
            r = results["decode"]["bandwidth"]
            rows.append(
                (
                    "batch 1 vs the bandwidth limit",
                    f"{r['gpt_fraction_of_limit']:.0%} of it",
                    f"{r['limit_tokens_per_s']} tok/s "
                    f"({r['read_gb_per_s']} GB/s, {r['weight_mb']} MB)",
                    f"hf {r['hf_fraction_of_limit']:.0%}",
                    "",
                )
            )
        if "train" in parts:
            results["train"] = bench_train(ours, theirs, args)
            r = results["train"]
            rows.append(
                (
                    f"train step fwd+bwd, {args.precision}, 4 x 256",
                    f"{r['gpt_tokens_per_s']} tok/s",
                    f"{r['hf_tokens_per_s']} tok/s",
                    f"{r['ratio']}x",
                    ">= 1.2x",
                )
            )
    results["load_avg_end"] = os.getloadavg()[0]
    print()
    widths = [max(len(r[i]) for r in rows + [_HEADER]) for i in range(5)]
    for r in [_HEADER, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    save("llama_smollm2_135m", results)


_HEADER = ("measure", "gptcore", "transformers / limit", "ratio", "target")


def bench_decode(ours: GPT, theirs, args) -> dict:
    n, out = args.new_tokens, {}
    torch.manual_seed(0)
    for batch in (1, 8):
        prompts = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len))
        got: dict[str, list] = {}

        def run_ours(prompts=prompts, got=got):
            got["ours"] = generate(ours, prompts.tolist(), n)
            assert all(len(o) == n for o in got["ours"])

        def run_theirs(prompts=prompts, got=got):
            with torch.inference_mode():
                ids = theirs.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
            got["theirs"] = ids[:, args.prompt_len :].tolist()

        run_ours()  # warm-up (packs the weights), then the baseline's
        run_theirs()
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(run_ours, warmup=0, iters=1))
            t_theirs.append(timed(run_theirs, warmup=0, iters=1))
        print(
            f"batch {batch} seconds per run: gptcore {[round(t, 2) for t in t_ours]}, "
            f"transformers {[round(t, 2) for t in t_theirs]}",
            flush=True,
        )
        same = sum(a == b for a, b in zip(got["ours"], got["theirs"], strict=True))
        out[f"batch{batch}"] = {
            "gpt_tokens_per_s": round(batch * n / min(t_ours), 1),
            "hf_tokens_per_s": round(batch * n / min(t_theirs), 1),
            "ratio_vs_hf": round(min(t_theirs) / min(t_ours), 2),
            "rows_with_identical_tokens": f"{same}/{batch}",
        }
    out["bandwidth"] = bandwidth_limit(
        ours, out["batch1"]["gpt_tokens_per_s"], out["batch1"]["hf_tokens_per_s"]
    )
    out["target"] = 1.5
    return out


def bandwidth_limit(model: GPT, gpt_tps: float, hf_tps: float) -> dict:
    """What batch-1 decoding could reach if it did nothing but stream the weights at the measured
    rate."""
    # Every matrix is read once per token; the embedding only one row, but tied it is also the head,
    # read whole. (The KV cache, < 5 MB at these lengths, is left out.)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        weight_bytes -= model.wte.weight.numel() * model.wte.weight.element_size()
    read, copy = stream_rates()
    limit = read / weight_bytes
    return {
        "weight_mb": round(weight_bytes / 1e6),
        "read_gb_per_s": round(read / 1e9, 1),
        "copy_gb_per_s": round(copy / 1e9, 1),
        "limit_tokens_per_s": round(limit, 1),
        "gpt_fraction_of_limit": round(gpt_tps / limit, 3),
        "hf_fraction_of_limit": round(hf_tps / limit, 3),
        "gpt_effective_gb_per_s": round(gpt_tps * weight_bytes / 1e9, 1),
        "hf_effective_gb_per_s": round(hf_tps * weight_bytes / 1e9, 1),
    }


def stream_rates() -> tuple[float, float]:
    """Bytes/s of reading a 1 GiB fp32 tensor (`sum`) and of copying it (read + write), medians."""
    x = torch.ones(
        1 << 28
    )  # touched once before timing: a first touch is page faults, not bandwidth
    y = torch.zeros_like(x)
    read = (1 << 30) / timed(lambda: x.sum(), warmup=2, iters=7)
    copy = 2 * (1 << 30) / timed(lambda: y.copy_(x), warmup=2, iters=7)
    return read, copy


def bench_train(ours: GPT, theirs, args) -> dict:
    batch, seq = 4, 256
    ours.train()
    theirs.train()
    torch.manual_seed(0)
    idx = torch.randint(0, ours.config.vocab_size, (batch, seq))
    targets = torch.randint(0, ours.config.vocab_size, (batch, seq))

    bf16 = args.precision == "bf16-autocast"

    def step_ours():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = ours(
                idx, targets, return_logits=False
            )  # the fused chunked loss, as training runs
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_theirs():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = theirs(
                input_ids=idx, labels=targets
            ).loss  # shifted inside: same tokens, same work
        loss.backward()
        theirs.zero_grad(set_to_none=True)

    timed(step_ours, warmup=2, iters=0)
    timed(step_theirs, warmup=2, iters=0)
    t_ours, t_theirs = [], []
    for _ in range(args.train_iters):  # alternate single steps: the machine's other load hits both
        t_ours.append(timed(step_ours, warmup=0, iters=1))
        t_theirs.append(timed(step_theirs, warmup=0, iters=1))
    print(
        f"train step seconds: gptcore {[round(t, 2) for t in t_ours]}, "
        f"transformers {[round(t, 2) for t in t_theirs]}",
        flush=True,
    )
    ours.eval()
    theirs.eval()
    med = lambda ts: sorted(ts)[len(ts) // 2]  # noqa: E731
    tokens = batch * seq
    return {
        "batch": batch,
        "seq": seq,
        "precision": args.precision,
        "optimizer_step": False,
        "gpt_tokens_per_s": round(tokens / med(t_ours)),
        "hf_tokens_per_s": round(tokens / med(t_theirs)),
        "ratio": round(med(t_theirs) / med(t_ours), 3),
        "target": 1.2,
    }


def has_fast_bf16() -> bool:
    """Whether this CPU (the bench runs on the CPU) has native bf16 matmuls: AVX512-BF16 or
    AMX-BF16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def bench_import(gguf: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        import_model(SOURCE, Path(d) / "in-process")
        in_process = time.perf_counter() - t0
        shutil.rmtree(Path(d) / "in-process")
        cmd = [sys.executable, "-m", "flows.cli", "import", SOURCE, "--out", str(Path(d) / "cli")]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        cli = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"gptflow import failed: {done.stderr.strip().splitlines()[-1:]}")
    print(f"import: in process {in_process:.1f} s, gptflow import {cli:.1f} s", flush=True)
    return {
        "file_mb": round(gguf.stat().st_size / 1e6),
        "in_process_s": round(in_process, 2),
        "cli_s": round(cli, 2),
        "target_s": 10,
    }


if __name__ == "__main__":
    main()
