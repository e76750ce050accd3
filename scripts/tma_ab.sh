#!/usr/bin/env bash
# The levers prepared on a CPU and off, measured: the fused MoE's TMA loads (`moe_tiles.TMA_GATE_UP_FROM`,
# `TMA_DOWN_FROM`), a decoded token's down weights sent to L2 early (`fused_moe.PREFETCH_DOWN`), and the dense MLP's
# activation inside its down product (`layers.GELU_IN_GEMV`). Three parts, each one device call of at most ~8 minutes
# (run them back to back while the machine is warm):
#
#     bash scripts/tma_ab.sh kernels [SIZES]   # GPU tests of all three, then the experts alone with TMA
#     bash scripts/tma_ab.sh steps             # the denoising step at batch 1 and 8, TMA variants
#     bash scripts/tma_ab.sh ar                # AR tok/s, every lever that a decoded token takes
#
# kernels: the TMA rows against the pointer loads' (released shapes, every tile bucket, bf16 and FP8), the prefetch's
#     rows bit-identical, the gated down product bit-identical to its two kernels, queued steps' tokens unchanged;
#     then `scripts/moe_kernel_sweep.py --tma` (the tiles in use with TMA off / on in each kernel, a few TMA tiles per
#     kernel, some with the weights as the first operand) at a batch-1 canvas and 8 canvases (SIZES: 256,2048 tokens).
# steps and ar: `scripts/flags_ab.py`, one process, the variants interleaved round by round (ROUNDS, default 2 / 3):
#     tma_down / tma_both     TMA from every load on, in the down product / in both products
#     tma_busy                both, only for busier experts (more than 32 assignments each: 4 canvases and up)
#     tma_swap_down           the light loads' down product (a decoded token's in `ar`, a batch-1 canvas's in `steps`)
#                             with TMA and the weights as the first operand: wgmma fed by TMA
#     prefetch_down           a decoded token's gate/up programs send its down weights to L2
#     gelu_in_gemv            an AR token's dense MLP activation inside the down product (30 launches a token fewer)
# A variant is worth taking where every round beats every round of the default at the batch it serves; then the GPU
# tests of the products it changes must pass with it on.
set -uo pipefail
PART="${1:?usage: bash scripts/tma_ab.sh kernels|steps|ar}"
PY="${PYTHON:-python3}"
T=dgemma.kernels.moe_tiles
F=dgemma.kernels.fused_moe
# The light loads' down tile with the weights as the first operand: wgmma fed by TMA, no ldmatrix, no cp.async.
SWAPPED_DOWN="{'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 4, 'num_stages': 4, 'SWAP_AB': True}"
TMA_VARIANTS=(--variant "default:" --variant "tma_down:$T.TMA_DOWN_FROM=0"
              --variant "tma_both:$T.TMA_DOWN_FROM=0,$T.TMA_GATE_UP_FROM=0")
nvidia-smi --query-gpu=name --format=csv,noheader
case "$PART" in
  kernels)
    tests="tma_loads or prefetched or activation_in_the_down or queued"
    timeout 200 "$PY" -m pytest -q -x tests/test_gpu.py -k "$tests" 2>&1 | tail -3
    timeout 280 "$PY" scripts/moe_kernel_sweep.py --tma --sizes "${2:-256,2048}" ;;
  steps)
    timeout 480 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-2}" --batches 1,8 --ar-tokens 8 "${TMA_VARIANTS[@]}" \
        --variant "tma_busy:$T.TMA_DOWN_FROM=33,$T.TMA_GATE_UP_FROM=33" \
        --variant "tma_swap_down:$T.TMA_DOWN_FROM=0,$T.DOWN_TILE=$SWAPPED_DOWN" ;;
  ar)
    timeout 480 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-3}" --batches "" --ar-tokens 384 "${TMA_VARIANTS[@]}" \
        --variant "tma_swap_down:$T.TMA_DOWN_FROM=0,$T.DIRECT_DOWN_TILE=$SWAPPED_DOWN" \
        --variant "prefetch_down:$F.PREFETCH_DOWN=True" \
        --variant "gelu_in_gemv:dgemma.model.layers.GELU_IN_GEMV=True" \
        --variant "prefetch_and_gelu:$F.PREFETCH_DOWN=True,dgemma.model.layers.GELU_IN_GEMV=True" ;;
  *) echo "unknown part $PART: kernels, steps or ar" >&2; exit 2 ;;
esac
