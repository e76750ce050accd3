#!/usr/bin/env bash
# The A/B of an AR token's launch knobs (tiles, programs, splits) against the defaults, in one call:
#
#     [ROUNDS=3] bash scripts/ar_knobs_ab.sh [OUT_DIR]      # needs a Hopper GPU; ~3 minutes on an H100
#
# Every variant is a module constant (scripts/flags_ab.py) on the same random 26b-a4b weights in one process, three
# rounds of AR tokens only (1024-token prompt, 384 greedy tokens). None changes a kernel's code; each compiles for
# sm_90 without spills (`python scripts/kernel_spills.py` and its `report`, 2026-12-07). A variant is worth taking
# where all three of its rounds beat all three of the default's; then `pytest tests/test_gpu.py -k "few_row or
# per_assignment or decoded"` and `tests/test_autoregressive.py -k cuda` must pass with it.
#   du_n64 / du_n32_w8 / du_k64 / du_w8 / du_n16_k256   a decoded token's experts' gate/up tile
#               (moe_tiles.DIRECT_GATE_UP_TILE; in use: 16x32x128, 4 warps, 176 programs for 132 SMs):
#               64 columns (88 programs; the canvas's tile, in use before 2026-12-08), 32 columns with 8 warps,
#               64 columns with K 64, 64 columns with 8 warps, 16 columns and K 256 (352 programs)
#   dd_n64 / dd_n256_w8   its down tile (moe_tiles.DIRECT_DOWN_TILE; in use 16x128x64, 176 programs): 64 columns
#               (352 programs), 256 columns with 8 warps (88)
#   gemv_n2 / gemv_n8_k2048 / gemv_n8_w8 / gemv_w8 / gemv_k2048   the few-row products (gemv.BLOCK_N output rows a
#               program, MAX_BLOCK_K, NUM_WARPS; in use 4 rows, K 4096, 4 warps)
#   dec_p132 / dec_s32 / dec_s16 / dec_more   flash decoding's key slices (cache_attention.DECODE_PROGRAMS,
#               MAX_SPLITS; in use 264 and 64: 32 slices on sliding layers, 8 KV heads over a ring of at least
#               1024 slots, and 64 on full layers, 2 KV heads over the whole prefix): 16 on sliding layers; 32 on
#               full layers; 16 on both; dec_more: 64 on sliding layers too (16-key tiles, 528 programs aimed at):
#               the smaller decoding tiles of 2026-12-07 most likely won by doubling those slices
# Measured (one H100, ROUNDS=2, 2026-12-08; docs/benchmarks.md, twenty-second session): 32 gate/up columns (then
# "du_n32", now the default) won by ~1 tok/s in every round, 8 warps with them tied it; every other knob tied or
# lost (up to -15 tok/s).
set -uo pipefail
OUT="${1:-/tmp/ar_knobs_ab}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
T=dgemma.kernels.moe_tiles
G=dgemma.kernels.gemv
A=dgemma.kernels.cache_attention
tile() { echo "{'BLOCK_N': $1, 'BLOCK_K': $2, 'num_warps': $3, 'num_stages': $4}"; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 400 "$PY" scripts/flags_ab.py --rounds "${ROUNDS:-3}" --batches "" --ar-tokens 384 --variant "default:" \
    --variant "du_n64:$T.DIRECT_GATE_UP_TILE=$(tile 64 128 4 4)" \
    --variant "du_n32_w8:$T.DIRECT_GATE_UP_TILE=$(tile 32 128 8 4)" \
    --variant "du_k64:$T.DIRECT_GATE_UP_TILE=$(tile 64 64 4 4)" \
    --variant "du_w8:$T.DIRECT_GATE_UP_TILE=$(tile 64 128 8 4)" \
    --variant "du_n16_k256:$T.DIRECT_GATE_UP_TILE=$(tile 16 256 4 3)" \
    --variant "dd_n64:$T.DIRECT_DOWN_TILE=$(tile 64 64 4 4)" \
    --variant "dd_n256_w8:$T.DIRECT_DOWN_TILE=$(tile 256 64 8 4)" \
    --variant "gemv_n2:$G.BLOCK_N=2" --variant "gemv_n8_k2048:$G.BLOCK_N=8,$G.MAX_BLOCK_K=2048" \
    --variant "gemv_n8_w8:$G.BLOCK_N=8,$G.NUM_WARPS=8" --variant "gemv_w8:$G.NUM_WARPS=8" \
    --variant "gemv_k2048:$G.MAX_BLOCK_K=2048" \
    --variant "dec_p132:$A.DECODE_PROGRAMS=132" --variant "dec_s32:$A.MAX_SPLITS=32" \
    --variant "dec_s16:$A.MAX_SPLITS=16" \
    --variant "dec_more:$A.DECODE_TILE={'block_m': 16, 'block_n': 16, 'block_d': 256, 'block_dv': 256, \
'num_warps': 4, 'num_stages': 2},$A.DECODE_PROGRAMS=528" 2>&1 | tee "$OUT/ab.txt"
