"""Queued denoising steps (`dgemma.engine.denoisers.must_read`) against reading every step's results, in one process
on the same random weights: the bench's concurrency protocol (random 1024-token prompts, 1024 tokens, 16 fixed
steps a canvas), whose steps before a canvas's last need nothing from the device.

    python scripts/queued_steps_ab.py [--preset 26b-a4b] [--rounds 2] [--concurrency 1,8]   # needs a CUDA GPU

Prints output and decode tok/s per variant and round; "every step read" is the engine before 2026-12-08, emulated by
making every step's results needed (the stop flags, which are false, are then read after each step).
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import run_concurrency
from dgemma.checkpoint.random_init import build_random_model
from dgemma.engine import denoisers

QUEUED = denoisers.must_read


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (eager steps, which read only what they need)")
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16" if args.device == "cuda" else "float32", args.device)
    model.prepare_inference()
    print(torch.cuda.get_device_name() if args.device == "cuda" else args.device, flush=True)
    try:
        for r in range(args.rounds):
            for label, rule in (("every step read", lambda requests: True), ("queued steps", QUEUED)):
                denoisers.must_read = rule
                for c in (int(v) for v in args.concurrency.split(",")):
                    res = run_concurrency(model, c, max(4, 2 * c), 1024, 1024, 16)
                    print(f"round {r}, {label:15s}, concurrency {c}: output {res.output_tok_s:.1f} tok/s, decode "
                          f"{res.decode_tok_s:.1f} tok/s, latency p50 {res.latency_ms_p50:.0f} ms", flush=True)
    finally:
        denoisers.must_read = QUEUED


if __name__ == "__main__":
    main()
