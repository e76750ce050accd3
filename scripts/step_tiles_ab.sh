#!/usr/bin/env bash
# The A/B of spill-free tiles for the denoising step's kernels (`python scripts/kernel_spills.py` lists what each
# tile in use spills on sm_90), at batch 1 and 8, in one call:
#
#     bash scripts/step_tiles_ab.sh [OUT_DIR]     # needs a Hopper GPU; ~4 minutes on an H100
#
# Each variant sets a tile table (scripts/flags_ab.py) on the same random 26b-a4b weights in one process, two rounds
# of the graphed step at batch 1 and 8 (1024-token prefix) and AR tok/s. A tile is worth taking where both its rounds
# beat both of the default's at the batch it serves; the tiles change no result beyond the order of float32 sums
# (`pytest tests/test_gpu.py -k "fused_moe or attention"` checks them against eager).
#   gu_w8 / gu_k64 / gu_swap_k64 / gu_swap_w8   the experts' gate/up tile for a canvas or a decoded token
#                    (moe_tiles.GATE_UP_TILE): 8 warps, half the K slice, and each with the weights as the first
#                    operand (SWAP_AB) (the tile in use spills ~1 KB a thread; these 128 B, 64 B, none, none)
#   down_n128 / down_m64   the experts' down tile from 4 canvases on (moe_tiles.LARGE_TILES): 128 output columns,
#                    or 64 rows (the tile in use spills ~1.7 KB a thread; these ~0.2 and ~0.3 KB)
#   gu_n128_k32      the experts' gate/up from 4 canvases on with 128 output columns (half the re-reads of the
#                    gathered rows from L2) and K 32 (16 B of spills, where 128 columns with K 64 spill ~0.6 KB)
#   full_dv128 / full_m64   a canvas's full-layer attention at batches (cache_attention.FULL_TILE): 128 value
#                    columns a program, or 64 rows (the tile in use spills ~4.5 KB a thread; these ~0.5 and ~1.2 KB)
# The spill figures above came from a compile without the 16-byte alignment a launch gives pointers and sizes;
# with it (`scripts/kernel_spills.py` since 2026-12-07) none of the tiles in use spills.
# Measured on one H100 on 2026-12-07 (docs/benchmarks.md, twenty-first session): none kept. At batch 8 the tiles in
# use won by 2-9%, spills included; at batch 1 two rounds of one variant differed more than the variants did.
set -uo pipefail
OUT="${1:-/tmp/step_tiles_ab}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T=dgemma.kernels.moe_tiles
A=dgemma.kernels.cache_attention
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 "$PY" scripts/flags_ab.py --rounds 2 --batches 1,8 --ar-tokens 128 --variant "default:" \
    --variant "gu_w8:$T.GATE_UP_TILE={'BLOCK_N': 64, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 4}" \
    --variant "gu_k64:$T.GATE_UP_TILE={'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 4, 'num_stages': 4}" \
    --variant "gu_swap_k64:$T.GATE_UP_TILE={'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 4, 'num_stages': 4, 'SWAP_AB': True}" \
    --variant "gu_swap_w8:$T.GATE_UP_TILE={'BLOCK_N': 64, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 4, 'SWAP_AB': True}" \
    --variant "down_n128:$T.LARGE_TILES=((64, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4}, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4}), (128, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 2}, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 2}), (256, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 3}, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 3}), (512, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 5}, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 5}))" \
    --variant "down_m64:$T.LARGE_TILES=((64, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4}, {'BLOCK_M': 64, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4}), (128, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 2}, {'BLOCK_M': 64, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 2}), (256, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 3}, {'BLOCK_M': 64, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 3}), (512, {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 3, 'M_SPLITS': 5}, {'BLOCK_M': 64, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 5}))" \
    --variant "gu_n128_k32:$T.LARGE_TILES=((64, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 4}, {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4}), (128, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 2}, {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 2}), (256, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 3}, {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 3}), (512, {'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 5}, {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 4, 'M_SPLITS': 5}))" \
    --variant "full_dv128:$A.FULL_TILE={'block_m': 128, 'block_n': 32, 'block_d': 512, 'block_dv': 128, 'num_warps': 8, 'num_stages': 2}" \
    --variant "full_m64:$A.FULL_TILE={'block_m': 64, 'block_n': 32, 'block_d': 512, 'block_dv': 256, 'num_warps': 8, 'num_stages': 2}" \
    2>&1 | tee "$OUT/ab.txt"
