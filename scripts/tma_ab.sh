#!/usr/bin/env bash
# The fused MoE's TMA loads (`moe_tiles.TMA_GATE_UP_FROM`, `TMA_DOWN_FROM`), and the dense MLP's activation inside its
# down product (`layers.GELU_IN_GEMV`), both prepared on a CPU and off, measured in one call:
#
#     [ROUNDS=2] [SIZES=256,2048] bash scripts/tma_ab.sh [OUT_DIR]   # needs a Hopper GPU; at most 9.5 minutes
#
# 1. Correctness first: the TMA rows against the pointer loads' at the released shapes, every tile bucket, bf16 and
#    FP8; the gated down product bit-identical to the two kernels.
# 2. The experts alone (`scripts/moe_kernel_sweep.py --tma`): the tiles in use with TMA off / on in each kernel, then
#    a few TMA tiles per kernel, at a batch-1 canvas and 8 canvases (256 and 2048 tokens; SIZES).
# 3. The whole step and AR (`scripts/flags_ab.py`, one process, variants interleaved round by round):
#    tma_down / tma_both     TMA from every load on, in the down product / in both products
#    tma_busy                both, only for busier experts (more than 32 assignments each: 4 canvases and up)
#    gelu_in_gemv            an AR token's dense MLP activation inside the down product (30 launches a token fewer)
# A variant is worth taking where every round beats every round of the default at the batch it serves; then the GPU
# tests of the products it changes must pass with it on.
set -uo pipefail
OUT="${1:-/tmp/tma_ab}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T=dgemma.kernels.moe_tiles
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 "$PY" -m pytest -q -x tests/test_gpu.py -k "tma_loads or activation_in_the_down" 2>&1 | tail -3
timeout 140 "$PY" scripts/moe_kernel_sweep.py --tma --sizes "${SIZES:-256,2048}" 2>&1 | tee "$OUT/sweep.txt"
timeout 330 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-2}" --batches 1,8 --ar-tokens 128 --variant "default:" \
    --variant "tma_down:$T.TMA_DOWN_FROM=0" \
    --variant "tma_both:$T.TMA_DOWN_FROM=0,$T.TMA_GATE_UP_FROM=0" \
    --variant "tma_busy:$T.TMA_DOWN_FROM=33,$T.TMA_GATE_UP_FROM=33" \
    --variant "gelu_in_gemv:dgemma.model.layers.GELU_IN_GEMV=True" 2>&1 | tee "$OUT/flags.txt"
