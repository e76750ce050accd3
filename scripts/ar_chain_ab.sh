#!/usr/bin/env bash
# The A/B of the levers on an AR token's kernel chain (all off by default), then their GPU tests, in one call:
#
#     bash scripts/ar_chain_ab.sh [OUT_DIR]      # needs a Hopper GPU; ~5 minutes on an H100
#
# Each variant sets module constants (scripts/flags_ab.py) on the same random 26b-a4b weights in one process, three
# rounds, AR tokens only (1024-token prompt, 384 greedy tokens). A lever is worth turning on where all three of its
# rounds beat all three of the default's; then its GPU tests must pass.
#   fused / fused_nopdl / fused_trig  the one-launch head norms (attention.FUSED_QKV_NORM), with PDL, without it,
#                                     and with the next launch let go only after its wait (launch.TRIGGER_AFTER_WAIT)
#   moe_gemv    a decoded token's experts as matrix-vector products (fused_moe.GEMV_MAX_ASSIGNMENTS)
#   router / oproj / qkv   one-launch tails: routing in the router's product (moe.FUSED_ROUTER), the residual norms
#               in the output projection (diffusion_gemma.FOLD_OUTPUT_PROJECTION), the head norms in the q/k/v
#               projection (attention.FUSED_QKV_PROJECTION)
#   tails, tails_gemv, trig, tails_gemv_trig   their combinations
#   dec_n32 / dec_full_n16_w8 / dec_both   flash decoding's key tile halved on sliding / full layers / both
#               (cache_attention.DECODE_TILE, DECODE_TILE_FULL; 8 warps on full layers): the tiles in use spill ~1 KB
#               and 276 B a thread (ptxas, sm_90), these none; never swept for one token
#   merge       the key slices' merge as the attention kernel's tail (cache_attention.MERGE_TAIL; sliding layers)
#   all         every lever above
set -uo pipefail
OUT="${1:-/tmp/ar_chain_ab}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
G=dgemma.kernels.fused_moe.GEMV_MAX_ASSIGNMENTS=32
R=dgemma.model.moe.FUSED_ROUTER=True
O=dgemma.model.diffusion_gemma.FOLD_OUTPUT_PROJECTION=True
Q=dgemma.model.attention.FUSED_QKV_PROJECTION=True
T=dgemma.kernels.launch.TRIGGER_AFTER_WAIT=True
F=dgemma.model.attention.FUSED_QKV_NORM=True
DS="dgemma.kernels.cache_attention.DECODE_TILE={'block_m': 16, 'block_n': 32, 'block_d': 256, 'block_dv': 256, 'num_warps': 4, 'num_stages': 2}"
DF="dgemma.kernels.cache_attention.DECODE_TILE_FULL={'block_m': 16, 'block_n': 16, 'block_d': 512, 'block_dv': 512, 'num_warps': 8, 'num_stages': 2}"
M=dgemma.kernels.cache_attention.MERGE_TAIL=True
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 400 "$PY" scripts/flags_ab.py --rounds 3 --batches "" --ar-tokens 384 \
    --variant "default:" --variant "fused:$F" --variant "fused_nopdl:$F,dgemma.kernels.norm_rope.QKV_PDL=False" \
    --variant "moe_gemv:$G" --variant "router:$R" --variant "oproj:$O" --variant "qkv:$Q" --variant "tails:$R,$O,$Q" \
    --variant "tails_gemv:$R,$O,$Q,$G" --variant "trig:$T" --variant "fused_trig:$F,$T" \
    --variant "tails_gemv_trig:$R,$O,$Q,$G,$T" --variant "dec_n32:$DS" --variant "dec_full_n16_w8:$DF" \
    --variant "dec_both:$DS,$DF" --variant "merge:$M" --variant "all:$R,$O,$Q,$G,$DS,$DF,$M" 2>&1 | tee "$OUT/ab.txt"
timeout 150 "$PY" -m pytest -q -x tests/test_gpu.py \
    -k "tails or router_with or output_projection_with or matrix_vector" 2>&1 | tail -6 | tee "$OUT/tests.txt"
# The AR loop's graphed steps (GraphedEncoder.run_next: bounds advanced on the device) against eager decoding.
timeout 100 "$PY" -m pytest -q -x tests/test_autoregressive.py -k cuda 2>&1 | tail -4 | tee -a "$OUT/tests.txt"
