#!/usr/bin/env bash
# The one documented command that produces dgemma/assets/dgemma-mini, the model dgemma uses when none is given.
#
#     bash scripts/train_shipped.sh [OUT_DIR] [extra `dgemma train` options]   # default OUT_DIR: dgemma/assets/dgemma-mini
#
# Needs one CUDA GPU (~18 minutes wall time in all: ~2.5 min of setup, a 14-minute training budget, ~1.5 min of
# sweep, evaluation and export) and the package's dependencies; runs from the repository root. It trains a new
# model from scratch on dgemma's generated tasks, exports it (bfloat16 safetensors shards of at most 15 MiB,
# tokenizer, chat template), sweeps the sampler settings on held-out problems and writes the chosen ones into
# generation_config.json, then prints a summary with a 200-problem held-out evaluation. Interrupted runs resume
# from OUT_DIR.train.pt when the same command is run again (delete that file to start over).
#
# The model (preset "mini", see dgemma/train/trainer.py: model_preset):
#   vocabulary      1024-token byte-level BPE trained on rendered training conversations (digits are single tokens)
#   layers          8, hidden 256; full attention on layers 2, 5 and 7 (every third, and the last), a 32-token
#                   sliding window on the other five (shorter than a typical prompt)
#   attention       4 query heads; sliding layers: 2 KV heads of dim 64; full layers: 1 KV head of dim 128,
#                   values = keys (no v_proj), proportional RoPE (25% of the pairs rotate)
#   feed-forward    a dense gated-GELU MLP of width 512 beside a mixture of 8 experts of width 128, top-2 routing
#   self-condition  gated MLP of width 512 (trained two-pass on half of the rows)
#   canvas          32 tokens, so longer answers span several canvases; 2048 positions
#   size            11,995,088 parameters (tied embedding counted once) = 24.0 MB in bfloat16
#
# Training: AdamW (0.9, 0.95, fused; non-finite steps skipped), peak lr 2e-3 after 200 warmup steps, cosine to 10%
# over a 14-minute wall-clock budget (TIME_BUDGET_MIN), weight decay 0.1 on matrices, gradient clipping 1.0; q/k norm
# weights start at head_dim^-1/4 (unit-variance attention logits); a bfloat16 model under autocast with float32
# master weights, fused RMSNorm forward and backward; all 8 experts computed densely (two GEMMs, no host sync);
# forward and backward replayed as one CUDA graph per batch shape (widths padded to multiples of 32); batches of 256
# examples grouped by length, fewer where 256 rows would exceed 49,152 padded tokens (long tool prompts); each
# example's block denoised from 2 independent corruptions (--noise-samples 2) against one encoder pass; 2M examples
# generated up front by up to 16 processes (the mixture below; examples over 512 tokens dropped); encoder AR loss
# weight 1.0; noise t ~ U(0.001, 1); self-conditioning trained two-pass on half of the rows. The mixture up-weights
# the families with the strictest bar (multiplication most) and multi-canvas answers. These settings were the best
# of the recipes run side by side (docs/benchmarks.md).
# Measured (GPU 0 of a 4 x NVIDIA H200 host, three recipes at once, 2026-11-27, fifth run, 14-minute budget):
# 14,374 steps at 17.1 steps/s, ~17.7 minutes in all; 81.5% exact on 200 held-out problems (GPU), 78.8% on 500 on
# the CPU (`dgemma eval --n 500 --threads 2`), tool calls 100%, 5.42 tokens per forward: below the quality bar on
# the arithmetic, sorting and string families, so nothing is shipped yet (docs/benchmarks.md). Batch 128 tied it.
# On one NVIDIA H100 80GB the same step runs at 16.0 steps/s (1000 steps, 2026-11-27): ~13,400 steps in 14 minutes.
# Every batch shape is captured while the corpus is generated. --compile (1.6x per step) is not used: on the GPU its
# per-shape warm-up still takes about a minute (docs/benchmarks.md, sixth session).
# Options after OUT_DIR are passed on to `dgemma train` (e.g. --batch-size 1024 --max-batch-tokens 98304).
set -euo pipefail

OUT="${1:-dgemma/assets/dgemma-mini}"
PYTHON="${PYTHON:-python}"
MIXTURE='{"mul": 3.0, "add": 1.5, "sub": 1.5, "sort": 2.0, "string_ops": 1.5, "reverse": 1.5, "tool_call": 1.5, "long": 1.5}'

exec "$PYTHON" -m dgemma train \
    --out "$OUT" \
    --preset mini \
    --device cuda \
    --time-budget-min "${TIME_BUDGET_MIN:-14}" \
    --batch-size 256 \
    --max-batch-tokens 49152 \
    --noise-samples 2 \
    --max-length 512 \
    --lr 2e-3 \
    --warmup-steps 200 \
    --train-examples 2000000 \
    --family-weights "$MIXTURE" \
    --eval-every 1000 \
    --max-shard-mb 15 \
    --sweep \
    --final-eval 200 \
    "${@:2}"
