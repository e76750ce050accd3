"""Where the engine's graphed denoising step (batch 1, or --batches) and AR token spend their time: kernels grouped
by kind, the kernels' sum against the wall time of the call, and the idle gap between them (the host's share).

    python scripts/profile_graphed.py [--preset 26b-a4b] [--prefix 1024] [--rows 12] [--batches 1,8]

Unlike `profile_step.py` (eager), this profiles what `dgemma bench` times: `GraphedDenoiser.step` with its host
sync, and `GraphedEncoder.run` for one token with the `.tolist()` that `generate_ar` does per token.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.bench.measure import encoded_prefix
from dgemma.checkpoint.random_init import build_random_model
from dgemma.engine.cuda_graphs import GraphedDenoiser, GraphedEncoder
from dgemma.engine.scheduler import SchedulerConfig, max_write_tokens

KINDS = [  # first match wins: (label, substrings of the kernel name)
    ("experts (fused MoE)", ("_gate_up_kernel", "_down_kernel", "moe", "grouped")),
    ("MoE combine / routing", ("combine", "route", "group_by", "topk")),
    ("attention: flash", ("flash",)),
    ("attention: cache_attention", ("cache_attention", "merge_splits")),
    ("norms, RoPE, residual", ("residual", "layer_output", "norm", "rope")),
    ("sampler", ("sample",)),
    ("attention: other (sdpa, bmm, softmax)", ("fmha", "cudnn", "softmax", "attention")),
    ("dense GEMVs (few rows, Triton)", ("gemv",)),
    ("dense GEMMs (cuBLAS)", ("gemm", "sm90", "cutlass", "nvjet", "xmma")),
]


def kind(name: str) -> str:
    low = name.lower()
    for label, keys in KINDS:
        if any(k in low for k in keys):
            return label
    return "other"


def report(title: str, fn, calls: int, rows: int) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / calls * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        by_kind[kind(e.name)] += us / calls
        by_name[e.name] += us / calls
        count[e.name] += 1
    total = sum(by_kind.values())
    print(f"==== {title}: wall {wall_us:.0f} us per call (unprofiled), kernels {total:.0f} us, "
          f"idle {wall_us - total:.0f} us ({len(kernels) / calls:.0f} kernels per call)", flush=True)
    for label, us in by_kind.most_common():
        print(f"  {label:40s} {us:9.1f} us  {100 * us / total:5.1f}%")
    print("  top kernels:")
    for name, us in by_name.most_common(rows):
        print(f"    {us:9.1f} us  x{count[name] // calls:<4d} {name[:90]}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--batches", default="1", help="denoising step batch sizes to profile")
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()  # as the engine runs it
    cfg = model.config
    print(torch.cuda.get_device_name(), flush=True)
    with torch.no_grad():
        for b in (int(v) for v in args.batches.split(",")):
            cache = encoded_prefix(model, b, args.prefix, args.prefix + cfg.canvas_length,
                                   max_write_tokens(cfg.canvas_length, SchedulerConfig.max_prefill_tokens))
            graph = GraphedDenoiser(model, cache, [b])
            for row in range(b):
                graph.start_canvas(row, args.prefix, torch.Generator(device="cuda").manual_seed(row))
            knobs = [(0.6, 0.1, 0.0, 1234 + row, 0, 1) for row in range(b)]

            def step():
                graph.step(list(range(b)), knobs)
                graph.stop[:b].tolist()

            report(f"denoising step, batch {b} (graphed, as dgemma bench times it)", step, args.calls, args.rows)
            del graph, cache
            torch.cuda.empty_cache()

        cache = encoded_prefix(model, 1, args.prefix, args.prefix + 256, args.prefix)
        enc = GraphedEncoder(model, cache, 1, [1], next_token=True)
        token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = [args.prefix]

        def ar_token():
            enc.run([0], token, pos)
            token.copy_(enc.out_token[:1, None])
            token.tolist()
            pos[0] = min(pos[0] + 1, args.prefix + 200)

        report("AR token, batch 1 (graphed, as generate_ar runs it)", ar_token, args.calls * 5, args.rows)


if __name__ == "__main__":
    main()
