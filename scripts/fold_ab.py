"""Work folded into each layer's output kernel, switched off and on in one process on the same random weights
(docs/benchmarks.md, issue 4): the MoE's combine (`dgemma.model.diffusion_gemma.FOLD_MOE_COMBINE`) and the next
norm of the residual stream (`FOLD_NEXT_NORM`: the next layer's input norm, the final norm after the last layer).
The arithmetic is the same (tests/test_kernel_wiring.py, tests/test_gpu.py); each saves one kernel a layer.

    python scripts/fold_ab.py [--preset 26b-a4b] [--rounds 2] [--batches 1,8]   # needs a CUDA GPU

Prints, per round, the graphed denoising step at each batch size (as `dgemma bench`) and AR tok/s (1024-token
prompt, 128 tokens, greedy) with no fold (the baseline, first), each fold alone, and both.
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import ar_decode, decoder_step_ms
from dgemma.checkpoint.random_init import build_random_model
from dgemma.model import diffusion_gemma


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8", help="denoising step batch sizes")
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()
    print(torch.cuda.get_device_name(), flush=True)
    defaults = diffusion_gemma.FOLD_MOE_COMBINE, diffusion_gemma.FOLD_NEXT_NORM
    for r in range(args.rounds):
        for combine, norm in ((False, False), (True, False), (False, True), (True, True)):
            diffusion_gemma.FOLD_MOE_COMBINE, diffusion_gemma.FOLD_NEXT_NORM = combine, norm
            steps = ", ".join(f"b{b} {decoder_step_ms(model, int(b), 1024):.2f}" for b in args.batches.split(","))
            ar = ar_decode(model, 1024, 128)
            name = " + ".join(n for n, on in (("combine", combine), ("next norm", norm)) if on) or "no fold"
            print(f"round {r}, {name:20s}: step ms {steps} | AR "
                  f"{ar.tokens_per_s:.1f} tok/s ({ar.decode_ms / len(ar.token_ids):.2f} ms/token)", flush=True)
    diffusion_gemma.FOLD_MOE_COMBINE, diffusion_gemma.FOLD_NEXT_NORM = defaults


if __name__ == "__main__":
    main()
