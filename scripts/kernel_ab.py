"""A/B of the fused kernels (MoE experts, q/k norm + RoPE, mask-free decoder attention on sliding layers) on the
full-size model, in one process: `model.set_kernel_devices` switches all of them.

    python scripts/kernel_ab.py [--preset 26b-a4b] [--batches 1,2,8] [--prefix 1024]

Builds random weights on the GPU once, then for kernels on and off: the logits of one decoder forward (difference
between the two, relative to the logits' scale), the whole graphed denoising step per batch size, the 1024-token
prefill and one autoregressive token. Prints a table; the "off" rows are the baseline of the same run.
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import (copy_bandwidth_gbps, decoder_step_ms, encoded_prefix, prefill_ms, timed_ms,
                                  weight_bytes)
from dgemma.checkpoint.random_init import build_random_model
from dgemma.model.attention import AttentionBatch


@torch.no_grad()
def one_forward(model, prefix: int, batch: int) -> torch.Tensor:
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = encoded_prefix(model, batch, prefix, prefix + cfg.canvas_length, generator=gen)
    rows = list(range(batch))
    canvas = torch.randint(0, cfg.vocab_size, (batch, cfg.canvas_length), device="cuda", generator=gen)
    attn = AttentionBatch.for_decoder(rows, [prefix] * batch, cfg.canvas_length, cfg.sliding_window, cache)
    return model.decode(canvas, attn, cache).float()  # [B, C, V]


@torch.no_grad()
def ar_token_ms(model, prefix: int) -> float:
    cfg = model.config
    cache = encoded_prefix(model, 1, prefix, prefix + 8)
    token = torch.randint(3, cfg.vocab_size, (1, 1), device="cuda")

    def step():
        attn = AttentionBatch.for_encoder([0], [prefix], [1], cfg.sliding_window, cache)
        model.logits(model.encode(token, attn, cache)[:, 0]).argmax(-1).tolist()

    return timed_ms(step, model.device, repeats=10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--prefix", type=int, default=1024)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = build_random_model(args.preset, "bfloat16", "cuda")
    floor = weight_bytes(model) / (copy_bandwidth_gbps(model.device) * 1e9) * 1e3
    print(f"device {torch.cuda.get_device_name()}, floor {floor:.2f} ms per batch-1 step", flush=True)
    logits = {}
    rows = []
    for on in (False, True):
        model.set_kernel_devices(("cuda",) if on else ())
        logits[on] = one_forward(model, args.prefix, 2)
        row = {"kernels": "on" if on else "off"}
        for b in batches:
            row[f"step b{b} ms"] = decoder_step_ms(model, b, args.prefix)
        row["prefill 1024 ms"] = prefill_ms(model, 1024)
        row["AR token ms (eager)"] = ar_token_ms(model, args.prefix)
        rows.append(row)
        print(row, flush=True)
    diff = (logits[True] - logits[False]).abs().max().item()
    scale = logits[False].abs().max().item()
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
    print(f"logits on vs off: max |diff| {diff:.4g} (max |logit| {scale:.4g}, {diff / scale:.2%}), "
          f"argmax agreement {agree:.2%}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.2f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
