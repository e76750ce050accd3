#!/usr/bin/env bash
# The A/B of the levers on an AR token's kernel chain against the defaults, then their GPU tests, in one call:
#
#     bash scripts/ar_chain_ab.sh [OUT_DIR]      # needs a Hopper GPU; a few minutes on an H100
#
# Each variant sets module constants (scripts/flags_ab.py) on the same random 26b-a4b weights in one process, three
# rounds, AR tokens only (1024-token prompt, 384 greedy tokens). A variant is worth taking where all three of its
# rounds beat all three of the default's; then its GPU tests must pass.
#   fused_off       the head norms as three kernels over cos/sin tables (attention.FUSED_QKV_NORM off; on by default)
#   grouped         a decoded token's experts grouped by expert, a program per expert (fused_moe.DIRECT_MAX_ASSIGNMENTS
#                   0; by default a program per assignment, no grouping)
#   old_dec_tiles   flash decoding's key tiles before 2026-12-07 (cache_attention.DECODE_TILE with 64 keys,
#                   DECODE_TILE_FULL with 32 keys and 4 warps): 16 key slices on sliding layers, not 32
set -uo pipefail
OUT="${1:-/tmp/ar_chain_ab}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
F=dgemma.model.attention.FUSED_QKV_NORM=False
D=dgemma.kernels.fused_moe.DIRECT_MAX_ASSIGNMENTS=0
DS="dgemma.kernels.cache_attention.DECODE_TILE={'block_m': 16, 'block_n': 64, 'block_d': 256, 'block_dv': 256, "\
"'num_warps': 4, 'num_stages': 2}"
DF="dgemma.kernels.cache_attention.DECODE_TILE_FULL={'block_m': 16, 'block_n': 32, 'block_d': 512, 'block_dv': 512, "\
"'num_warps': 4, 'num_stages': 2}"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 "$PY" scripts/flags_ab.py --rounds 3 --batches "" --ar-tokens 384 \
    --variant "default:" --variant "fused_off:$F" --variant "grouped:$D" --variant "old_dec_tiles:$DS,$DF" \
    2>&1 | tee "$OUT/ab.txt"
# The one-launch head norms (bit-identical to three kernels; the kernel counts of the fused model), the experts
# with a program per assignment, and a decoded token's split attention.
timeout 200 "$PY" -m pytest -q -x tests/test_gpu.py \
    -k "one_launch or fused_kernels or per_assignment or decoded" 2>&1 | tail -6 | tee "$OUT/tests.txt"
# The AR loop's graphed steps (GraphedEncoder.run_next: bounds advanced on the device) against eager decoding.
timeout 100 "$PY" -m pytest -q -x tests/test_autoregressive.py -k cuda 2>&1 | tail -4 | tee -a "$OUT/tests.txt"
