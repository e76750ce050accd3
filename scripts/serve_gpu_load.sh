#!/usr/bin/env bash
# Serve the full-size random model on a GPU and load-test it with 1, 4 and 16 concurrent clients.
#
#     bash scripts/serve_gpu_load.sh [CHECKPOINT_DIR]     # default: writes /tmp/dg26b (51 GB) if missing
#
# Adaptive stopping is off (random weights are never confident) and every request generates exactly
# --max-tokens tokens with 16 denoising steps per canvas, so the work per request is fixed.
set -euo pipefail
CKPT="${1:-/tmp/dg26b}"
PY="${PYTHON:-python3}"
[ -f "$CKPT/config.json" ] || "$PY" -m dgemma init-random --preset 26b-a4b --out "$CKPT" --device cuda
"$PY" -m dgemma serve "$CKPT" --port 8123 --max-num-seqs 16 --max-model-len 2048 --max-denoising-steps 16 \
    --no-adaptive-stopping --disable-uvicorn-access-log > /tmp/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
    curl -sf http://127.0.0.1:8123/health >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { tail -20 /tmp/serve.log; exit 1; }
    sleep 2
done
"$PY" scripts/load_test.py --url http://127.0.0.1:8123 --clients 1 4 16 --requests 2 --max-tokens 512 \
    --ignore-eos --warmup 1
tail -3 /tmp/serve.log
