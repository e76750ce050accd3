#!/usr/bin/env bash
# The fused MoE's TMA loads against pointer loads, in three parts, each one device call of at most ~8 minutes (run
# them back to back while the machine is warm):
#
#     bash scripts/tma_ab.sh kernels [SIZES]   # GPU tests, then the experts alone with TMA
#     bash scripts/tma_ab.sh steps             # the denoising step at batch 1 and 8
#     bash scripts/tma_ab.sh ar                # AR tok/s
#
# kernels: the TMA rows against the pointer loads' (released shapes, every tile bucket, bf16 and FP8), the direct path,
#     queued steps' tokens unchanged; then `scripts/moe_kernel_sweep.py --tma` (the tiles in use with TMA off / on in
#     each kernel, a few TMA tiles per kernel, some with the weights as the first operand) at a batch-1 canvas and 8
#     canvases (SIZES: 256,2048 tokens).
# steps and ar: `scripts/flags_ab.py`, one process, the variants interleaved round by round (ROUNDS, default 2 / 3):
#     tma_down / tma_both     TMA from every load on (`moe_tiles.TMA_*_FROM`), in the down product / in both
#     tma_busy                both, only for busier experts (more than 32 assignments each: 4 canvases and up)
#     tma_swap_down           a batch-1 canvas's down product with TMA and the weights as the first operand
#     pointer_down            a decoded token's down product as before 2026-12-08 (pointer loads, activations first)
# Measured on one H100 (2026-12-08, docs/benchmarks.md, twenty-third session): the steps tied every variant; AR took
# 291.2 -> 295.0 tok/s from a decoded token's down product with TMA and the weights first, now the default
# (`moe_tiles.DIRECT_DOWN_TILE`). Two levers of the same A/B lost and are deleted: a decoded token's down weights sent
# to L2 by its gate/up programs (285.3 tok/s) and the dense MLP's activation inside its down product (290.5).
set -uo pipefail
PART="${1:?usage: bash scripts/tma_ab.sh kernels|steps|ar}"
PY="${PYTHON:-python3}"
T=dgemma.kernels.moe_tiles
# The light loads' down tile with the weights as the first operand: wgmma fed by TMA, no ldmatrix, no cp.async.
SWAPPED_DOWN="{'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 4, 'num_stages': 4, 'SWAP_AB': True}"
# A decoded token's down tile before 2026-12-08 (pointer loads, activations first).
POINTER_DOWN="{'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 4, 'num_stages': 4}"
TMA_VARIANTS=(--variant "default:" --variant "tma_down:$T.TMA_DOWN_FROM=0"
              --variant "tma_both:$T.TMA_DOWN_FROM=0,$T.TMA_GATE_UP_FROM=0")
nvidia-smi --query-gpu=name --format=csv,noheader
case "$PART" in
  kernels)
    tests="tma_loads or queued or per_assignment"
    timeout 200 "$PY" -m pytest -q -x tests/test_gpu.py -k "$tests" 2>&1 | tail -3
    timeout 280 "$PY" scripts/moe_kernel_sweep.py --tma --sizes "${2:-256,2048}" ;;
  steps)
    timeout 480 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-2}" --batches 1,8 --ar-tokens 8 "${TMA_VARIANTS[@]}" \
        --variant "tma_busy:$T.TMA_DOWN_FROM=33,$T.TMA_GATE_UP_FROM=33" \
        --variant "tma_swap_down:$T.TMA_DOWN_FROM=0,$T.DOWN_TILE=$SWAPPED_DOWN" ;;
  ar)
    timeout 480 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-3}" --batches "" --ar-tokens 384 "${TMA_VARIANTS[@]}" \
        --variant "pointer_down:$T.DIRECT_DOWN_TILE=$POINTER_DOWN" ;;
  *) echo "unknown part $PART: kernels, steps or ar" >&2; exit 2 ;;
esac
