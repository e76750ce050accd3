"""The decoder's dense GEMMs at one canvas (256 rows) against their weight-read floor: cuBLAS (F.linear) and the
engine's Triton GEMM (`dgemma.kernels.gemm`: the programs that share a weight tile launched side by side, so it is
read from HBM once), at its own tile and the best of a small sweep, each timed inside a CUDA graph (no launch cost)
over 8 copies of the weight (so nothing stays in L2).

    python scripts/dense_gemm_sweep.py [ROWS]   # default 256 (needs a CUDA GPU; H100 and H200 bandwidths built in)

Prints one line per 26b-a4b weight shape, then `TILES=...`: for each output width the sweep's tile with the least
time summed over that width's shapes, as a literal of `dgemma.kernels.gemm.TILES` that a `flags_ab.py` variant
takes (`dgemma.kernels.gemm.TILES=...`). The ninth session's plain Triton GEMM (programs of one weight tile a wave
apart) lost to cuBLAS on every shape and is no longer timed. The whole-step A/B of the engine's kernel:
`python scripts/flags_ab.py --rounds 2 --batches 1,2 --variant "default:" --variant
"gemm:dgemma.model.layers.GEMM_MAX_ROWS=512"`.
"""

import itertools
import sys

import torch
import torch.nn.functional as F

from dgemma.kernels.gemm import gemm_triton

print(torch.cuda.get_device_name(), flush=True)


def gbench(fn, L):
    """us per call: a CUDA graph of L calls (one per weight copy, so nothing stays in L2), no launch overhead."""
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for j in range(L): fn(j)
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(L): fn(j)
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20): g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / 20 / L * 1e3


def sweep(call, L):
    """{(rows, columns, K, warps, stages): us} over a small sweep of tiles; call(j, *tile) runs one."""
    times = {}
    for tile in itertools.product((64, 128, 256), (32, 64, 128), (64, 128), (4, 8), (4,)):
        try:
            times[tile] = gbench(lambda j: call(j, *tile), L)
        except Exception:  # out of shared memory etc.
            continue
    return times


bw = 3.0e12 if "H100" in torch.cuda.get_device_name() else 4.3e12  # measured copy bandwidths (docs/benchmarks.md)
shapes = {"qkv sliding": (8192, 2816), "qkv full": (9216, 2816), "o sliding": (2816, 4096), "o full": (2816, 8192),
          "mlp gate_up": (4224, 2816), "mlp down": (2816, 2112), "router": (128, 2816)}
M = int(sys.argv[1]) if len(sys.argv) > 1 else 256
by_width = {}  # N -> [{tile: us} of each shape of that width]
for name, (N, K) in shapes.items():
    L = 8
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(L)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    tc = gbench(lambda j: F.linear(x, ws[j]), L)
    floor = N * K * 2 / bw * 1e6
    own = gbench(lambda j: gemm_triton(x, ws[j]), L)
    times = sweep(lambda j, bm, bn, bk, w_, s: gemm_triton(x, ws[j], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                           num_warps=w_, num_stages=s), L)
    best = min((t, tile) for tile, t in times.items())
    by_width.setdefault(N, []).append(times)
    ref = F.linear(x, ws[0]).float()
    err = ((gemm_triton(x, ws[0]).float() - ref).norm() / ref.norm()).item()
    ws.clear()
    torch.cuda.empty_cache()
    print(f"M={M} {name:12s} N={N} K={K}: floor {floor:.1f} us, cuBLAS {tc:.1f} us, gemm_triton {own:.1f} us "
          f"(err {err:.1e}), best {best[0]:.1f} us {best[1]}", flush=True)



def least_total(runs):
    """The tile that ran every shape of a width in the least total time."""
    common = set.intersection(*(set(times) for times in runs))
    return min(common, key=lambda tile: sum(times[tile] for times in runs))


keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
widths = sorted(by_width)
tiles = tuple((n if n != widths[-1] else 1 << 62, dict(zip(keys, least_total(by_width[n])))) for n in widths)
print("TILES=" + repr(tiles).replace(" ", ""), flush=True)
