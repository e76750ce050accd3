"""Tile sweep of `cache_attention` (dgemma/kernels/cache_attention.py) on the 26b-a4b shapes, against the path it
replaces and the one it competes with. Needs a GPU:

    python scripts/cache_attention_sweep.py [--quick] [--model-ab]
    python scripts/cache_attention_sweep.py --full [--model-ab]   # full layers at the bench's short caches
    python scripts/cache_attention_sweep.py --full-dv   # full layers: all 512 output columns in one program

Cases: a canvas (256 queries) on a sliding layer whose cache is a ring of W - 1 + 2048 slots (prefix 4096), batch
1 and 8: the kernel vs SDPA with a mask over the whole ring (what the model ran before) and vs flash attention over
the same keys in the full layout (`canvas_attention`, what a short context gets); and a canvas on a full layer
(head_dim 512) vs the two batched matmuls (`grouped_attention`). Prints each baseline and the best tiles; with
--model-ab, the whole model's denoising step over a ring with the masked path, the default tiles and the best ones.
"""

from __future__ import annotations

import ast
import itertools
import sys

import torch
import torch.nn.functional as F
import triton.testing

from dgemma.kernels.cache_attention import FULL_TILE, FULL_TILE_FEW_ROWS, cache_attention_triton
from dgemma.model.attention import canvas_attention, grouped_attention

DEV, DT = "cuda", torch.bfloat16
W, C, P = 1024, 256, 4096  # sliding window, canvas, prefix
RING = W - 1 + 2048
HEADS_SLIDING, HEADS_FULL = (16, 8, 256), (16, 2, 512)  # query heads, KV heads, head_dim


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=30) * 1e3  # us


def sweep(name: str, run, configs, baselines: dict[str, float]) -> dict[str, float]:
    """Time every tile config; print the baselines and the best three; return {config as text: us}."""
    results = []
    for cfg in configs:
        try:
            results.append((bench(lambda cfg=cfg: run(cfg)), cfg))
        except Exception as exc:  # noqa: BLE001 (out of shared memory, too many registers: skip the tile)
            print(f"  {cfg} failed: {type(exc).__name__}", flush=True)
    results.sort(key=lambda r: r[0])
    base = ", ".join(f"{k} {v:.1f} us" for k, v in baselines.items())
    print(f"{name}: {base}", flush=True)
    for t, cfg in results[:3]:
        print(f"  cache_attention {t:.1f} us with {cfg}", flush=True)
    return {repr(cfg): t for t, cfg in results}


def sliding_case(b: int, configs) -> dict[str, float]:
    hq, hkv, d = HEADS_SLIDING
    q = torch.randn(b, C, hq, d, device=DEV, dtype=DT) * d**-0.5
    full_k = torch.randn(b, P + C + 1, hkv, d, device=DEV, dtype=DT)
    full_v = torch.randn_like(full_k)
    ring_k, ring_v = torch.zeros(b, RING + 1, hkv, d, device=DEV, dtype=DT), torch.zeros(b, RING + 1, hkv, d,
                                                                                          device=DEV, dtype=DT)
    held = torch.arange(P + C)
    ring_k[:, held[-RING:] % RING], ring_v[:, held[-RING:] % RING] = full_k[:, held[-RING:]], full_v[:, held[-RING:]]
    rows = torch.arange(b, device=DEV)
    start = torch.full((b, C), P - (W - 1), device=DEV)
    end = torch.full((b, C), P + C, device=DEV)
    slot_pos = torch.arange(RING, device=DEV)
    last = P + C - 1
    slot_pos = last - torch.remainder(last - slot_pos, RING)  # the position each ring slot holds
    mask = ((slot_pos >= P - (W - 1)) & (slot_pos < P + C))[None, None, None, :].expand(b, 1, C, RING)
    sdpa = lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), ring_k[:, :RING].transpose(1, 2), ring_v[:, :RING].transpose(1, 2), attn_mask=mask,
        scale=1.0, enable_gqa=True)
    s0 = rows.to(torch.int32) * (P + C + 1) + (P - (W - 1))
    cu_k = torch.cat([s0, s0[-1:] + (W - 1 + C)]).to(torch.int32)
    cu_q = torch.arange(0, (b + 1) * C, C, dtype=torch.int32, device=DEV)
    used = torch.full((b,), W - 1 + C, dtype=torch.int32, device=DEV)
    flash = lambda: canvas_attention(q, full_k, full_v, cu_q, cu_k, used)
    ref = cache_attention_triton(q, ring_k, ring_v, rows, start, end, RING).float()
    want = flash().float()
    assert (ref - want).norm() / want.norm() < 2e-2, "cache_attention disagrees with flash attention"
    return sweep(f"sliding ring, batch {b}", lambda cfg: cache_attention_triton(q, ring_k, ring_v, rows, start, end, RING,
                                                                           **cfg),
          configs, {"masked SDPA over the ring (before)": bench(sdpa), "flash, full layout": bench(flash)})


def full_case(b: int, configs, prefix: int = P) -> dict[str, float]:
    hq, hkv, d = HEADS_FULL
    q = torch.randn(b, C, hq, d, device=DEV, dtype=DT) * d**-0.5
    keys = torch.randn(b, prefix + C + 1, hkv, d, device=DEV, dtype=DT)
    values = torch.randn_like(keys)
    rows = torch.arange(b, device=DEV)
    end = torch.full((b, C), prefix + C, device=DEV)
    mask = (torch.arange(prefix + C + 1, device=DEV) < prefix + C)[None, None, None, :].expand(b, 1, C, prefix + C + 1)
    eager = lambda: grouped_attention(q, keys, values, mask)
    want = eager().float()
    for cfg in configs[:1] + [c for c in configs if c["block_d"] == d][:1]:  # both score paths, checked once
        got = cache_attention_triton(q, keys, values, rows, None, end, None, **cfg).float()
        assert (got - want).norm() / want.norm() < 2e-2, f"cache_attention disagrees with the matmuls ({cfg})"
    return sweep(f"full layer, batch {b}, {prefix}-token prefix",
                 lambda cfg: cache_attention_triton(q, keys, values, rows, None, end, None, **cfg),
                 configs, {"two batched matmuls": bench(eager)})


def full_model_ab(tile: dict) -> None:
    """Denoising steps (batch 1 and 8) and a 1024-token prefill at a 1024-token prefix (the bench's shapes) with
    full layers on the two matmuls (what short caches ran before the seventh session) and on the kernel with the
    default and the best tiles."""
    import functools

    import dgemma.kernels.cache_attention as kernel
    import dgemma.model.attention as attention
    from dgemma.bench.measure import decoder_step_ms, prefill_ms
    from dgemma.checkpoint.random_init import build_random_model

    model = build_random_model("26b-a4b", "bfloat16", DEV)
    model.pack_projections()
    default_use, default_fn = attention.use_cache_attention, kernel.cache_attention_triton
    no_full = lambda q, batch, kind, *rest: kind != attention.FULL and default_use(q, batch, kind, *rest)
    for name, use, fn in (("matmuls", no_full, default_fn), ("kernel, default tiles", default_use, default_fn),
                          ("kernel, best tiles", default_use, functools.partial(default_fn, **tile))):
        attention.use_cache_attention, kernel.cache_attention_triton = use, fn
        steps = {b: decoder_step_ms(model, b, 1024) for b in (1, 8)}
        print(f"full layers on {name}: step b1 {steps[1]:.2f} ms, b8 {steps[8]:.2f} ms, prefill 1024 "
              f"{prefill_ms(model, 1024):.2f} ms", flush=True)
    attention.use_cache_attention, kernel.cache_attention_triton = default_use, default_fn


def model_ab(tile: dict) -> None:
    """The denoising step over a ring (4096-token prefix, 2048-token encoder chunks) with the masked path, the
    kernel's default tiles and `tile`: the model-level effect of the sweep."""
    import functools

    import dgemma.kernels.cache_attention as kernel
    import dgemma.model.attention as attention
    from dgemma.bench.measure import decoder_step_ms
    from dgemma.checkpoint.random_init import build_random_model

    model = build_random_model("26b-a4b", "bfloat16", DEV)
    model.pack_projections()
    default_min, default_fn = attention.CACHE_ATTENTION_MIN_TOKENS, kernel.cache_attention_triton
    for name, min_tokens, fn in (("masked SDPA", 1 << 30, default_fn), ("cache_attention, default tiles",
                                 default_min, default_fn),
                                 ("cache_attention, best tiles", default_min, functools.partial(default_fn, **tile))):
        attention.CACHE_ATTENTION_MIN_TOKENS, kernel.cache_attention_triton = min_tokens, fn
        steps = {b: decoder_step_ms(model, b, P, chunk=2048) for b in (1, 8)}
        print(f"step over a ring ({P}-token prefix): b1 {steps[1]:.2f} ms, b8 {steps[8]:.2f} ms with {name}",
              flush=True)
    attention.CACHE_ATTENTION_MIN_TOKENS, kernel.cache_attention_triton = default_min, default_fn


def main() -> None:
    quick = "--quick" in sys.argv
    print(torch.cuda.get_device_name(), flush=True)
    if "--full-dv" in sys.argv:
        # One program for all 512 output columns computes each score once; two programs of 256 compute it twice.
        wide = [dict(block_m=bm, block_n=bn, block_d=512, block_dv=512, num_warps=nw, num_stages=ns)
                for bm, bn, nw, ns in ((64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 1),
                                       (64, 16, 8, 3), (32, 32, 4, 2))]
        for b in (1, 8):
            for prefix in (1024, 2048):
                times = full_case(b, wide + [FULL_TILE_FEW_ROWS, FULL_TILE], prefix)
                for cfg, t in sorted(times.items(), key=lambda kv: kv[1]):
                    print(f"    {t:.1f} us {cfg}", flush=True)
        return
    if "--full" in sys.argv:  # full layers at the bench's short caches: whole-head-dim scores vs chunks
        full = [dict(block_m=bm, block_n=bn, block_d=bd, block_dv=dv, num_warps=nw, num_stages=ns)
                for bm, bn, bd, dv, nw, ns in itertools.product((64, 128), (32, 64), (128, 512), (128, 256), (4, 8),
                                                                 (2, 3))]
        runs = {(b, p): full_case(b, full, p) for b in (1, 8) for p in (1024, 2048)}
        best = min((k for k in runs[1, 1024] if all(k in r for r in runs.values())),
                   key=lambda k: sum(r[k] for r in runs.values()))
        print(f"best over batch 1 and 8, prefix 1024 and 2048: {best} ("
              + " + ".join(f"{r[best]:.1f}" for r in runs.values()) + " us)", flush=True)
        # A long cache, where the kernel ran before with the earlier default tile: the defaults now vs it.
        earlier = dict(block_m=64, block_n=64, block_d=128, block_dv=128, num_warps=4, num_stages=2)
        for b in (1, 8):
            full_case(b, [earlier, FULL_TILE_FEW_ROWS, FULL_TILE], 4096)
        if "--model-ab" in sys.argv:
            full_model_ab(ast.literal_eval(best))
        return
    sliding = [dict(block_m=bm, block_n=bn, block_d=bd, num_warps=nw, num_stages=ns)
               for bm, bn, bd, nw, ns in itertools.product((32, 64, 128), (32, 64), (64, 128), (4, 8), (2,))]
    full = [dict(block_m=bm, block_n=bn, block_d=128, block_dv=dv, num_warps=nw, num_stages=2)
            for bm, bn, dv, nw in itertools.product((32, 64), (32, 64), (128, 256), (4, 8))]
    if quick:
        sliding, full = sliding[:4], full[:2]
    b1, b8 = sliding_case(1, sliding), sliding_case(8, sliding)
    best = min((k for k in b1 if k in b8), key=lambda k: b1[k] + b8[k])
    print(f"best for batch 1 + batch 8: {best} ({b1[best]:.1f} + {b8[best]:.1f} us)", flush=True)
    full_case(1, full)
    if "--model-ab" in sys.argv:
        model_ab(ast.literal_eval(best))  # a dict literal printed by this script


if __name__ == "__main__":
    main()
