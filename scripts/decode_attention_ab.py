"""Autoregressive decoding's attention through `cache_attention` with the key range split (flash decoding), against
the masked paths it replaces, in one process on the same random weights (docs/benchmarks.md, issue 4).

    python scripts/decode_attention_ab.py [preset] [--parts accuracy,token,canvas,ar]   # default 26b-a4b, all
    TRITON_INTERPRET=1 python scripts/decode_attention_ab.py tiny   # the same flow on a CPU, float16, no timings

Prints, in order:
  1. accuracy: one sliding and one full layer's attention for a decoded token (rows at ragged prefixes, bf16),
     masked path against the split kernel;
  2. one layer's attention for one token at a 1152-slot cache (the bench's AR shape), as CUDA-graph replays:
     masked (SDPA on sliding layers, two batched matmuls on full ones) against the kernel at several slice counts;
  3. the same kernel for a batch-1 canvas (256 queries) at several slice counts, beside flash attention
     (`canvas_attention`) on sliding layers: does the split help the denoising step too?
  4. AR tok/s (1024-token prompt, 128 tokens, greedy, graphed), decode path off / on / off / on.
"""

import argparse
import sys
import time
import traceback

import torch

import dgemma.model.attention as attention
from dgemma.bench import measure
from dgemma.bench.measure import random_prompts
from dgemma.checkpoint.random_init import build_random_model
from dgemma.config import FULL, SLIDING
from dgemma.engine.autoregressive import generate_ar
from dgemma.kernels.cache_attention import cache_attention_triton

sys.path.insert(0, "tests")
from kernel_wiring import decode_attention_kernel_off_and_on, rel_err  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter cannot multiply bfloat16 tiles


def graph_us(fn) -> float:
    """Microseconds per call of fn(), 10 calls captured into one CUDA graph (on a CPU: one call, no time)."""
    if DEVICE == "cpu":
        fn()
        return float("nan")
    return measure.graph_us(fn, copies=10, replays=50)


def part(title, fn):
    print(f"== {title}", flush=True)
    try:
        fn()
    except Exception:  # one broken part must not cost the others (one GPU call)
        traceback.print_exc()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset", nargs="?", default="26b-a4b")
    p.add_argument("--parts", default="accuracy,token,canvas,ar")
    args = p.parse_args()
    t0 = time.time()
    model = build_random_model(args.preset, DTYPE, DEVICE)
    if DEVICE == "cpu":
        model.set_kernel_devices(("cpu",))
    model.pack_projections()
    cfg = model.config
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", f"built in {time.time() - t0:.0f} s", flush=True)
    default = attention.CACHE_ATTENTION_DECODE_TOKENS
    layers = {SLIDING: cfg.layer_types.index(SLIDING), FULL: cfg.layer_types.index(FULL)}
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def accuracy():
        attention.CACHE_ATTENTION_DECODE_TOKENS = 1  # the split path, whatever the default
        w = cfg.sliding_window
        for kind, layer in layers.items():
            masked, kernel = decode_attention_kernel_off_and_on(model, layer, [3, 0, 2], [w + 37, 5, 1100])
            print(f"{kind}: relative L2 kernel vs masked {rel_err(kernel, masked):.2e} "
                  f"(4 eps = {4 * torch.finfo(DTYPE).eps:.2e})", flush=True)
        attention.CACHE_ATTENTION_DECODE_TOKENS = default

    def one_token():
        slots = 1152  # a 1024-token prompt and 128 new tokens
        for kind, layer in layers.items():
            spec = cfg.full if kind == FULL else cfg.sliding
            hq, hkv, d = cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim
            keys = torch.randn(1, slots + 1, hkv, d, device=DEVICE, generator=gen).to(DTYPE)
            values = torch.randn(1, slots + 1, hkv, d, device=DEVICE, generator=gen).to(DTYPE)
            q = (torch.randn(1, 1, hq, d, device=DEVICE, generator=gen) * d**-0.5).to(DTYPE)
            rows = torch.zeros(1, dtype=torch.long, device=DEVICE)
            end = torch.full((1, 1), slots, dtype=torch.long, device=DEVICE)
            start = end - cfg.sliding_window if kind == SLIDING else None
            mask = (torch.arange(slots, device=DEVICE) < end[..., None])
            if start is not None:
                mask &= torch.arange(slots, device=DEVICE) >= start[..., None]
            mask = mask[:, None]  # [1, 1, 1, S]
            kk, vv = keys[:, :slots], values[:, :slots]
            if kind == FULL:
                masked = lambda: attention.grouped_attention(q, kk, vv, mask)  # noqa: E731
            else:
                masked = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask, scale=1.0,
                    enable_gqa=True)
            line = [f"{kind} (D {d}, {hkv} KV heads): masked {graph_us(masked):.1f} us"]
            for splits in (1, 4, 8, 16, 32, None):
                t = graph_us(lambda: cache_attention_triton(q, keys, values, rows, start, end, splits=splits))
                line.append(f"split {splits or 'auto'} {t:.1f}")
            print(", ".join(line), flush=True)

    def canvas():
        prefix, c = 1024, cfg.canvas_length
        for kind, layer in layers.items():
            spec = cfg.full if kind == FULL else cfg.sliding
            hq, hkv, d = cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim
            slots = prefix + c + 1
            keys = torch.randn(1, slots, hkv, d, device=DEVICE, generator=gen).to(DTYPE)
            values = torch.randn(1, slots, hkv, d, device=DEVICE, generator=gen).to(DTYPE)
            q = (torch.randn(1, c, hq, d, device=DEVICE, generator=gen) * d**-0.5).to(DTYPE)
            rows = torch.zeros(1, dtype=torch.long, device=DEVICE)
            end = torch.full((1, c), prefix + c, dtype=torch.long, device=DEVICE)
            start = end - c - (cfg.sliding_window - 1) if kind == SLIDING else None
            line = []
            if kind == SLIDING and DEVICE == "cuda":  # flash attention has no CPU kernel
                cu_q = torch.tensor([0, c], dtype=torch.int32, device=DEVICE)
                cu_k = torch.tensor([prefix - (cfg.sliding_window - 1), prefix + c], dtype=torch.int32,
                                    device=DEVICE)
                used = torch.tensor([c + cfg.sliding_window - 1], dtype=torch.int32, device=DEVICE)
                line.append(f"flash {graph_us(lambda: attention.canvas_attention(q, keys, values, cu_q, cu_k, used)):.1f} us")
            for splits in (1, 2, 4, 8):
                t = graph_us(lambda: cache_attention_triton(q, keys, values, rows, start, end, splits=splits))
                line.append(f"split {splits} {t:.1f}")
            print(f"canvas {kind}: " + ", ".join(line), flush=True)

    def ar():
        prompt = random_prompts(1, 1024 if DEVICE == "cuda" else 40, cfg.vocab_size, 0)
        tokens, n = {}, 128 if DEVICE == "cuda" else 3  # interpreted kernels are slow
        for on in (False, True, False, True):
            attention.CACHE_ATTENTION_DECODE_TOKENS = 1 if on else 0
            generate_ar(model, prompt, 2, ignore_eos=True)
            r = generate_ar(model, prompt, n, ignore_eos=True)[0]
            tokens.setdefault(on, r.token_ids)
            print(f"decode path {'on ' if on else 'off'}: AR {r.tokens_per_s:.1f} tok/s "
                  f"({r.decode_ms / len(r.token_ids):.2f} ms/token)", flush=True)
        attention.CACHE_ATTENTION_DECODE_TOKENS = default
        same = sum(a == b for a, b in zip(tokens[False], tokens[True]))
        print(f"greedy tokens equal, off vs on: {same} of {len(tokens[True])} (random weights: near-ties flip under "
              f"bf16 rounding, after which the sequences part)", flush=True)

    parts = {"accuracy": ("accuracy", accuracy), "token": ("one token, one layer (CUDA graph)", one_token),
             "canvas": ("batch-1 canvas, one layer (CUDA graph)", canvas), "ar": ("AR end to end", ar)}
    for name in args.parts.split(","):
        part(*parts[name])


if __name__ == "__main__":
    main()
