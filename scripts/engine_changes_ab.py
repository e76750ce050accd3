"""The fifteenth session's engine changes, each switched off and on in one process on the same random weights
(docs/benchmarks.md, issue 4):
  * the fused sampler with the vocabulary split over up to 16 programs per position, against one program each;
  * the dense MLP's gelu(gate) * up as one kernel (`dgemma.kernels.gated_gelu`), against the two eager ops;
  * autoregressive decoding that queues the next token's forward before reading the current token, against a loop
    that waits for each token first (emulated by synchronising before each read).

    python scripts/engine_changes_ab.py [--preset 26b-a4b] [--rounds 2] [--batches 1,8]   # needs a CUDA GPU

Prints the graphed denoising step at batch 1 and 8 for each sampler x activation variant, then AR tok/s (1024-token
prompt, 128 tokens, greedy) for each loop x activation variant; the first variant of each block is the baseline.
"""

from __future__ import annotations

import argparse
import functools

import torch

import dgemma.kernels.fused_sampler as fused_sampler
import dgemma.model.layers as layers
from dgemma.bench.measure import ar_decode, decoder_step_ms
from dgemma.checkpoint.random_init import build_random_model
from dgemma.engine import autoregressive

SPLIT_SAMPLE = fused_sampler.fused_sample
GELU_KERNEL = layers.use_gelu_mul_kernel
OVERLAP_START = autoregressive._HostTokens.start


def switch(split_sampler: bool, gelu_kernel: bool, overlap: bool) -> None:
    fused_sampler.fused_sample = SPLIT_SAMPLE if split_sampler else functools.partial(SPLIT_SAMPLE, splits=1)
    layers.use_gelu_mul_kernel = GELU_KERNEL if gelu_kernel else (lambda *args: False)

    def synchronous_start(self, tokens):
        torch.cuda.synchronize()  # the token is read before the next forward is queued
        OVERLAP_START(self, tokens)

    autoregressive._HostTokens.start = OVERLAP_START if overlap else synchronous_start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8", help="denoising step batch sizes")
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.pack_projections()
    print(torch.cuda.get_device_name(), flush=True)
    for r in range(args.rounds):
        for split, gelu in ((False, False), (True, False), (False, True), (True, True)):
            switch(split, gelu, True)
            steps = ", ".join(f"b{b} {decoder_step_ms(model, int(b), 1024):.2f} ms" for b in args.batches.split(","))
            print(f"round {r}: sampler {'split' if split else 'one program per position'}, MLP activation "
                  f"{'kernel' if gelu else 'eager'}: step {steps}", flush=True)
    for r in range(args.rounds):
        for overlap, gelu in ((False, False), (True, False), (False, True), (True, True)):
            switch(True, gelu, overlap)
            res = ar_decode(model, 1024, 128)
            print(f"round {r}: AR loop {'overlapped' if overlap else 'synchronous'}, MLP activation "
                  f"{'kernel' if gelu else 'eager'}: {res.tokens_per_s:.1f} tok/s "
                  f"({res.decode_ms / len(res.token_ids):.2f} ms/token)", flush=True)
    switch(True, True, True)


if __name__ == "__main__":
    main()
