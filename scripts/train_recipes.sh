#!/usr/bin/env bash
# Train several recipes side by side, one per GPU of a multi-GPU host, in the background (each in its own process
# session, so they outlive the shell that started them). Each recipe is `scripts/train_shipped.sh` with extra options;
# its log is OUT_ROOT/NAME.log and its checkpoint OUT_ROOT/NAME.
#
#     bash scripts/train_recipes.sh OUT_ROOT "NAME:OPTIONS" ["NAME:OPTIONS" ...]
#     bash scripts/train_recipes.sh /tmp/runs "b2048:--batch-size 2048 --lr 3e-3" "b1024:--batch-size 1024"
#
# Recipe i runs on GPU FIRST_GPU + i (CUDA_VISIBLE_DEVICES; FIRST_GPU defaults to 0, so two trees can share a host);
# give at most as many recipes as GPUs. Environment: TIME_BUDGET_MIN and PYTHON are passed on to train_shipped.sh.
# Progress: `tail -f OUT_ROOT/*.log`; a run is finished when its log ends with the summary ("== dgemma train: done =="
# and the held-out table). This is how the recipes compared in docs/benchmarks.md (issue 5) were run: several recipes
# in the wall time of one.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_ROOT NAME:OPTIONS [NAME:OPTIONS ...]" >&2
    exit 2
fi
root=$1; shift
if ! command -v nvidia-smi > /dev/null; then
    echo "$0 needs NVIDIA GPUs: nvidia-smi was not found" >&2
    exit 2
fi
gpus=$(nvidia-smi -L | wc -l)
first=${FIRST_GPU:-0}
case $first in
    ''|*[!0-9]*) echo "FIRST_GPU must be a GPU index (0, 1, ...), got '$first'" >&2; exit 2 ;;
esac
if [ $((first + $#)) -gt "$gpus" ]; then
    echo "$# recipes from GPU $first but $gpus GPUs: give at most one recipe per GPU" >&2
    exit 2
fi
for recipe in "$@"; do  # check every recipe before starting any
    name=${recipe%%:*}
    if [ -z "$name" ] || [ "$name" = "$recipe" ]; then
        echo "recipe '$recipe' is not NAME:OPTIONS" >&2
        exit 2
    fi
done
mkdir -p "$root"
gpu=$first
for recipe in "$@"; do
    name=${recipe%%:*}
    options=${recipe#*:}
    # shellcheck disable=SC2086  # OPTIONS is a list of words
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=$gpu \
        setsid nohup bash scripts/train_shipped.sh "$root/$name" --keep-state $options \
        > "$root/$name.log" 2>&1 < /dev/null &
    echo "GPU $gpu: $name ($options) -> $root/$name.log"
    gpu=$((gpu + 1))
done
