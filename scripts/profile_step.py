"""Profile one denoising step and one AR token of a model on the GPU: top kernels by device time.

    python scripts/profile_step.py [--preset 26b-a4b] [--batch 1] [--prefix 1024]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.bench.measure import encoded_prefix
from dgemma.checkpoint.random_init import build_random_model
from dgemma.model.attention import AttentionBatch
from dgemma.sampling.entropy_bound import EntropyBoundSampler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()  # as the engine runs it (dgemma.llm.LLM, dgemma bench)
    cfg, b = model.config, args.batch
    cache = encoded_prefix(model, b, args.prefix, args.prefix + cfg.canvas_length + 8)
    rows = list(range(b))
    with torch.no_grad():
        canvas = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), device="cuda")
        soft = torch.zeros(b, cfg.canvas_length, cfg.hidden_size, dtype=model.dtype, device="cuda")
        sampler = EntropyBoundSampler()
        gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(b)]

        def step():
            attn = AttentionBatch.for_decoder(rows, [args.prefix] * b, cfg.canvas_length, cfg.sliding_window, cache)
            logits = model.decode(canvas, attn, cache, soft)
            r = sampler.step(logits, torch.full((b,), 0.6, device="cuda"), [False] * b, torch.full((b,), 0.1, device="cuda"),
                             gens, soft_embedding=model.soft_embedding)
            r.mean_entropy.tolist()

        def ar():
            attn = AttentionBatch.for_encoder(rows, [args.prefix] * b, [1] * b, cfg.sliding_window, cache)
            h = model.encode(canvas[:, :1], attn, cache)
            model.logits(h[:, 0]).argmax(-1).tolist()

        for name, fn in (("denoising step", step), ("AR token", ar)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"==== {name}, batch {b}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
