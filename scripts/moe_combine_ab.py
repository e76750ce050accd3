"""A/B of the MoE combine (each token's weighted sum over its K expert rows): the Triton kernel against the
batched matmul it replaced, in one process on the same random full-size weights.

    python scripts/moe_combine_ab.py [--preset 26b-a4b] [--skip-engine]

Prints the kernel alone at 256 / 1024 / 2048 tokens, the graphed denoising step at batch 1 and 8 and the
1024-token prefill for both (two alternating rounds), then the engine's output throughput at 1 and 8 concurrent
requests (`dgemma bench`'s protocol: random 1024-token prompts, 1024 output tokens, 16 steps, EOS ignored).
"""

from __future__ import annotations

import argparse

import torch

import dgemma.kernels.fused_moe as fused_moe
from dgemma.bench.measure import copy_bandwidth_gbps, decoder_step_ms, prefill_ms, run_concurrency, weight_bytes
from dgemma.checkpoint.random_init import build_random_model


def bmm_combine(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The replaced path: [N, 1, K] x [N, K, H] batched matmul, weights rounded to the rows' dtype."""
    n, k = weights.shape
    return torch.bmm(weights.to(rows.dtype)[:, None, :], rows.view(n, k, -1))[:, 0]


VARIANTS = {"bmm": bmm_combine, "triton": fused_moe.combine_triton}


def kernel_us(fn, rows: torch.Tensor, weights: torch.Tensor, repeats: int = 200) -> float:
    for _ in range(10):
        fn(rows, weights)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(rows, weights)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--skip-engine", action="store_true")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.pack_projections()
    cfg = model.config
    k, hidden = cfg.top_k_experts, cfg.hidden_size
    for n in (256, 1024, 2048):
        rows = torch.randn(n * k, hidden, device="cuda").to(torch.bfloat16)  # [N*K, H]
        weights = torch.rand(n, k, device="cuda")  # [N, K]
        times = {name: kernel_us(fn, rows, weights) for name, fn in VARIANTS.items()}
        print(f"combine, {n} tokens: " + ", ".join(f"{name} {t:.1f} us" for name, t in times.items()), flush=True)
    floor = weight_bytes(model) / (copy_bandwidth_gbps(model.device) * 1e9) * 1e3
    print(f"per-step floor {floor:.2f} ms", flush=True)
    for round_ in range(2):
        for name, fn in VARIANTS.items():
            fused_moe.combine_triton = fn  # looked up at each call, so newly captured graphs take it
            steps = {b: decoder_step_ms(model, b, 1024, repeats=20) for b in (1, 8)}
            print(f"round {round_} {name:6s}: step b1 {steps[1]:.2f} ms ({steps[1] / floor:.3f}x floor), "
                  f"b8 {steps[8]:.2f} ms, prefill 1024 {prefill_ms(model, 1024):.2f} ms", flush=True)
    if args.skip_engine:
        return
    run_concurrency(model, 1, 1, 1024, 64, 16)  # warm-up
    for name, fn in VARIANTS.items():
        fused_moe.combine_triton = fn
        for concurrency, requests in ((1, 4), (8, 16)):
            r = run_concurrency(model, concurrency, requests, 1024, 1024, 16)
            print(f"{name:6s} c{concurrency}: {r.output_tok_s:.1f} tok/s, decode {r.decode_tok_s:.1f} tok/s, "
                  f"TTFC p50 {r.ttfc_ms_p50:.0f} ms, latency p50 {r.latency_ms_p50:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
