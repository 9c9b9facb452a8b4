#!/usr/bin/env bash
# GPU training throughput: GPT-2 124M, bf16, DeepSpeed ZeRO-1 and ZeRO-2 through Ray Train
# (flows.train), on one GPU and on all GPUs of the node. Prints tokens/s and MFU per run (MFU against
# the dense bf16 peak of the device, e.g. 989 TFLOP/s for H100/H200 SXM); target MFU >= 45%.
#
# Not a test and not run in CI: it needs CUDA torch (make venv TORCH="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128") and a GPU node. Usage:
#   bench/gpu_train.sh                      # builds a dataset from the built-in corpus first
#   DATA=/path/to/dataset bench/gpu_train.sh # a dataset from `gptflow preprocess` (ideally with
#                                           # data.tokenizer_path=<GPT-2 vocab.json+merges.txt dir>,
#                                           # so the model has GPT-2's 50257-token vocabulary)
# Knobs (environment): STEPS (default 60), MICRO (micro-batch per GPU, 16), ACCUM (1), STAGES ("1 2"),
# GPUS (default: all visible), WORKDIR (default: a temp dir), PEAK (FLOP/s per GPU; 0 = by device name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPTFLOW=${GPTFLOW:-.venv/bin/gptflow}
STEPS=${STEPS:-60}
MICRO=${MICRO:-16}
ACCUM=${ACCUM:-1}
STAGES=${STAGES:-"1 2"}
PEAK=${PEAK:-0}
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/gptflow-gpu-bench.XXXXXX)}
NGPU_ALL=${GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NGPU_ALL" -lt 1 ]; then
  echo "gpu_train.sh: no CUDA device visible to torch; this benchmark needs a GPU" >&2
  exit 2
fi
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

if [ -z "${DATA:-}" ]; then
  # The built-in corpus with a 32k BPE: 124M-shaped model, vocabulary as large as the corpus allows.
  DATA=$($GPTFLOW preprocess --workdir "$WORKDIR" --no-tracking --set data.vocab_size=32768 | tail -n 1)
fi
echo "dataset: $DATA"

RESULTS="$WORKDIR/gpu_train_results.jsonl"
: > "$RESULTS"
COUNTS="1"
[ "$NGPU_ALL" -gt 1 ] && COUNTS="1 $NGPU_ALL"
for NGPU in $COUNTS; do
  for STAGE in $STAGES; do
    echo "== GPT-2 124M bf16 ZeRO-$STAGE on $NGPU GPU(s), micro-batch $MICRO x accum $ACCUM, $STEPS steps"
    BUNDLE=$($GPTFLOW pretrain --workdir "$WORKDIR/run-z$STAGE-g$NGPU" --no-tracking --data "$DATA" \
      --preset gpt2-124m --steps "$STEPS" --workers "$NGPU" \
      --set pretrain.use_gpu=true --set pretrain.precision=bf16 --set pretrain.zero_stage="$STAGE" \
      --set pretrain.micro_batch_size="$MICRO" --set pretrain.grad_accum="$ACCUM" \
      --set pretrain.cpus_per_worker=2 --set pretrain.lr=6e-4 --set pretrain.warmup_steps=10 \
      --set pretrain.eval_every="$STEPS" --set pretrain.checkpoint_every="$STEPS" --set pretrain.eval_batches=2 \
      --set pretrain.peak_flops_per_device="$PEAK" | tail -n 1)
    $PY - "$BUNDLE" "$STAGE" "$NGPU" "$RESULTS" <<'PYEOF'
import json, sys
from pathlib import Path
bundle, stage, ngpu, results = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = json.loads((Path(bundle) / "train_result.json").read_text())["metrics"]
meta = json.loads((Path(bundle) / "metadata.json").read_text())
row = {"zero_stage": stage, "gpus": ngpu, "params": meta["num_params"], "tokens_per_s": m["tokens_per_s"],
       "tokens_per_s_per_gpu": m["tokens_per_s"] / ngpu, "mfu": m["mfu"], "final_loss": m["loss"],
       "timed_steps": m["timed_steps"], "peak_host_rss_gib": m["peak_rss_bytes_max_rank"] / 2**30,
       "peak_gpu_gib_rank0": m.get("peak_gpu_bytes_rank0", float("nan")) / 2**30}
print(json.dumps(row))
open(results, "a").write(json.dumps(row) + "\n")
PYEOF
  done
done
echo "results: $RESULTS"
$PY - "$RESULTS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| ZeRO | GPUs | params | tokens/s | tokens/s/GPU | MFU | peak GPU mem (rank 0) |\n|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['zero_stage']} | {r['gpus']} | {r['params']/1e6:.0f}M | {r['tokens_per_s']:,.0f} | "
          f"{r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | {r['peak_gpu_gib_rank0']:.1f} GiB |")
PYEOF
