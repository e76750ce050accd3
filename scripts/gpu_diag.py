"""Where the GPU time of a denoising step goes, per component, at a few batch sizes (device time via events).

    python scripts/gpu_diag.py [--batches 1,8,32]
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import encoded_prefix
from dgemma.checkpoint.random_init import build_random_model
from dgemma.kernels.fused_sampler import fused_sample
from dgemma.model.attention import AttentionBatch


def gpu_ms(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def busy_ms(fn):
    """Sum of kernel times (no launch gaps) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
    return total, [(e.key[:50], round(e.self_device_time_total / 1e3, 2), e.count) for e in top]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prefix", type=int, default=1024)
    args = p.parse_args()
    model = build_random_model("26b-a4b", "bfloat16", "cuda")
    cfg = model.config
    for b in [int(x) for x in args.batches.split(",")]:
        cache = encoded_prefix(model, b, args.prefix, args.prefix + 2 * cfg.canvas_length)
        rows = list(range(b))
        with torch.no_grad():
            canvas = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), device="cuda")
            soft = torch.zeros(b, cfg.canvas_length, cfg.hidden_size, dtype=model.dtype, device="cuda")
            attn = AttentionBatch.for_decoder(rows, [args.prefix] * b, cfg.canvas_length, cfg.sliding_window, cache)
            hidden = model.decode_hidden(canvas, attn, cache, soft)
            E = model.embed_tokens.weight
            logits = hidden @ E.T
            temp = torch.full((b,), 0.6, device="cuda")
            seeds = torch.arange(b, device="cuda")
            greedy = torch.zeros(b, dtype=torch.int32, device="cuda")
            res = {
                "decode_hidden (eager, wall)": gpu_ms(lambda: model.decode_hidden(canvas, attn, cache, soft)),
                "lm_head": gpu_ms(lambda: hidden @ E.T),
                "fused_sample": gpu_ms(lambda: fused_sample(logits, temp, seeds, greedy, 30.0)),
                "fused_sample no probs": gpu_ms(lambda: fused_sample(logits, temp, seeds, greedy, 30.0, write_probs=False)),
                "soft matmul": gpu_ms(lambda: logits @ E),
            }
            total, top = busy_ms(lambda: model.decode_hidden(canvas, attn, cache, soft))
            res["decode_hidden kernel busy"] = total
            print(f"== batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()))
            print("   top kernels:", top)


if __name__ == "__main__":
    main()
