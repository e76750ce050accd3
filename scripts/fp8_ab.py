"""The full-size model with bf16 experts, then with FP8 experts (`dgemma.model.fp8`), in one process on the same
random weights.

    python scripts/fp8_ab.py [--preset 26b-a4b] [--batches 1,8] [--concurrency 1,8] [--skip-engine]

For each variant: weight bytes and the per-step floor at the measured copy bandwidth, one layer's experts alone at
256 and 2048 tokens, the graphed denoising step at each of --batches, the 1024-token prefill, and the engine's
output and decode throughput at each --concurrency (`dgemma bench`'s protocol: random 1024-token prompts, 1024
output tokens, 16 steps, EOS ignored, 2 x concurrency requests, at least 4). Then how far FP8's decoder logits are
from bf16's for one prompt and canvas (relative L2 error, argmax agreement), and the same for the bf16 model
against itself with the experts rounded through bf16 -> float32 (zero: the comparison's own floor).

bf16 runs first; quantizing in place then frees the bf16 experts (both copies and the engine's caches would not fit
in 80 GB), so the two variants are not interleaved. `dgemma bench --quantization fp8` measures the FP8 model alone.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

import dgemma.kernels.moe_tiles as moe_tiles
from dgemma.bench.measure import (
    copy_bandwidth_gbps,
    decoder_step_ms,
    encoded_prefix,
    prefill_ms,
    run_concurrency,
    weight_bytes,
)
from dgemma.checkpoint.random_init import build_random_model, preset
from dgemma.model.attention import AttentionBatch


@torch.no_grad()
def fixed_logits(model, prefix: int) -> torch.Tensor:
    """Decoder logits [C, V] float32 for one random prompt (encoded by this model) and one random canvas."""
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(123)
    cache = encoded_prefix(model, 1, prefix, prefix + cfg.canvas_length, generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), device="cuda", generator=gen)
    batch = AttentionBatch.for_decoder([0], [prefix], cfg.canvas_length, cfg.sliding_window, cache)
    return model.decode(canvas, batch, cache)[0]


@torch.no_grad()
def experts_us(model, n: int) -> float:
    """Layer 0's routed experts alone on n tokens (random routing, top-K), in microseconds."""
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, cfg.hidden_size, device="cuda", generator=gen).to(model.dtype)
    w, ex = torch.topk(torch.randn(n, cfg.num_experts, device="cuda", generator=gen).softmax(-1), cfg.top_k_experts)
    experts = model.layers[0].experts
    return triton.testing.do_bench(lambda: experts(x, w, ex), warmup=5, rep=50) * 1e3


def measure(model, args) -> dict:
    bw = copy_bandwidth_gbps(torch.device("cuda"))
    wbytes = weight_bytes(model)
    res = {"weights_gb": wbytes / 1e9, "floor_ms": wbytes / (bw * 1e9) * 1e3, "bandwidth_gbps": bw}
    for n in (256, 2048):
        res[f"experts_{n}_us"] = experts_us(model, n)
    for b in args.batches:
        res[f"step_b{b}_ms"] = decoder_step_ms(model, b, 1024)
    res["prefill_1024_ms"] = prefill_ms(model, 1024)
    if not args.skip_engine:
        for c in args.concurrency:
            r = run_concurrency(model, c, max(4, 2 * c), 1024, 1024, 16)
            res[f"c{c}_tok_s"], res[f"c{c}_decode_tok_s"] = r.output_tok_s, r.decode_tok_s
    print({k: round(v, 2) for k, v in res.items()}, flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--fp8-tiles", default=None,
                   help="JSON file from `moe_kernel_sweep.py --fp8 --best-out`: the small-load FP8 tiles to use")
    args = p.parse_args()
    cfg = preset(args.preset)
    if args.fp8_tiles:  # {tokens: {"gate_up": tile or None, "down": tile or None}}, tokens = 256: small loads
        with open(args.fp8_tiles) as f:
            best = {int(n): v for n, v in json.load(f).items()}
        small = best.pop(256, {})
        moe_tiles.FP8_GATE_UP_TILE = small.get("gate_up") or moe_tiles.FP8_GATE_UP_TILE
        moe_tiles.FP8_DOWN_TILE = small.get("down") or moe_tiles.FP8_DOWN_TILE
        large = list(moe_tiles.FP8_LARGE_TILES)
        for n, tiles in best.items():
            i = next(i for i, (limit, _, _) in enumerate(large) if n * cfg.top_k_experts / cfg.num_experts <= limit)
            limit, gate_up, down = large[i]
            large[i] = (limit, tiles.get("gate_up") or gate_up, tiles.get("down") or down)
        moe_tiles.FP8_LARGE_TILES = tuple(large)
    print("FP8 tiles:", moe_tiles.FP8_GATE_UP_TILE, moe_tiles.FP8_DOWN_TILE, moe_tiles.FP8_LARGE_TILES, flush=True)
    args.batches = [int(v) for v in args.batches.split(",")]
    args.concurrency = [int(v) for v in args.concurrency.split(",")]

    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()  # as dgemma.llm.LLM and dgemma bench run it
    print(torch.cuda.get_device_name(), flush=True)
    results = {"bf16": measure(model, args)}
    reference = fixed_logits(model, 1024)
    again = fixed_logits(model, 1024)
    for layer in model.layers:
        layer.experts.quantize_fp8()
    torch.cuda.empty_cache()
    results["fp8"] = measure(model, args)
    quantized = fixed_logits(model, 1024)

    def compare(x):
        return ((x - reference).norm() / reference.norm()).item(), (x.argmax(-1) == reference.argmax(-1)).float().mean().item()

    print(f"\n{'quantity':<28}{'bf16':>12}{'fp8':>12}{'fp8 / bf16':>12}")
    for key in results["bf16"]:
        a, b = results["bf16"][key], results["fp8"][key]
        print(f"{key:<28}{a:>12.2f}{b:>12.2f}{b / a:>12.3f}")
    err, agree = compare(quantized)
    err0, agree0 = compare(again)
    print(f"decoder logits, fp8 vs bf16: relative L2 {err:.4f}, argmax agreement {agree:.4f} "
          f"(bf16 run twice: {err0:.4f}, {agree0:.4f})")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
