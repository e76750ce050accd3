"""The side stream (`dgemma.model.side_stream`), switched off and on in one process on the same random weights
(docs/benchmarks.md, issue 4): one stream; the dense MLP on the side stream; the dense MLP and the attention's key
and value norms on it; and both at a higher priority than the main stream's (its kernels take SMs first when both
branches wait).

    python scripts/side_stream_ab.py [--preset 26b-a4b] [--rounds 2] [--batches 1,8] [--concurrency 1,8]

Prints, per variant and round: the graphed denoising step at each batch size (as `dgemma bench`), the 1024-token
prefill, AR tok/s (1024-token prompt, 128 tokens) and engine throughput (vLLM's protocol, 2 x concurrency requests).
The first variant of each round is the baseline. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import ar_decode, decoder_step_ms, prefill_ms, run_concurrency
from dgemma.checkpoint.random_init import build_random_model

# name, side stream priority (None: one stream), K/V norms on the side stream too
VARIANTS = (("one stream", None, False), ("side: MLP", 0, False), ("side: MLP, K/V", 0, True),
            ("side: MLP, K/V, high priority", -1, True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8", help="denoising step batch sizes")
    p.add_argument("--concurrency", default="1,8", help="engine concurrency levels ('' skips)")
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()
    print(torch.cuda.get_device_name(), flush=True)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    for r in range(args.rounds):
        for name, priority, kv in VARIANTS:
            model.set_side_stream(priority is not None, priority or 0, attention=kv)
            steps = ", ".join(f"b{b} {decoder_step_ms(model, int(b), 1024):.2f}" for b in args.batches.split(","))
            prefill = prefill_ms(model, 1024)
            ar = ar_decode(model, 1024, 128)
            runs = [run_concurrency(model, c, 2 * c, 1024, 1024, 16) for c in levels]
            engine = ", ".join(f"c{c} {res.output_tok_s:.1f} (decode {res.decode_tok_s:.1f})"
                               for c, res in zip(levels, runs))
            print(f"round {r}, {name:30s}: step ms {steps} | prefill 1024 {prefill:.1f} ms | AR "
                  f"{ar.tokens_per_s:.1f} tok/s ({ar.decode_ms / len(ar.token_ids):.2f} ms) | tok/s {engine}",
                  flush=True)


if __name__ == "__main__":
    main()
