"""Autoregressive decoding's dense matrix products (1-8 rows) against their weight-read floor: cuBLAS (F.linear)
and a Triton GEMV that gives each program a few output rows and, where there are too few of them to fill the card,
a slice of K (partial sums added in float32). Each timed inside a CUDA graph over 8 copies of the weight (so nothing
stays in L2), as scripts/dense_gemm_sweep.py does for a canvas.

    python scripts/gemv_sweep.py [ROWS ...]   # default 1 2 4 8 (needs a CUDA GPU for timings)
    TRITON_INTERPRET=1 python scripts/gemv_sweep.py --check   # correctness only, on a CPU

Prints one line per 26b-a4b weight shape and row count: floor (bytes / copy bandwidth), cuBLAS, the best GEMV tile
and its error against F.linear. Question it answers: is a GEMV worth wiring into the AR path (issue 4: AR at 5.29
ms/token against a ~2.5 ms floor, where cuBLAS's small-M kernels were the largest item in the profile)?
"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def gemv(x, w, y, N, K, K_PER_SPLIT, M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    # SPLIT: y [M, N] (float32, zeroed) += x [M, K] @ w [N, K]^T over this program's K slice; else y = x @ w^T,
    # stored in y's dtype (no zeroing, no atomics, no cast afterwards)
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * K_PER_SPLIT
    rn = pid_n * BN + tl.arange(0, BN)  # [BN]
    rk = tl.arange(0, BK)  # [BK]
    for m in tl.static_range(M):
        acc = tl.zeros((BN,), tl.float32)
        for k0 in range(k_start, k_start + K_PER_SPLIT, BK):
            kk = k0 + rk
            a = tl.load(x + m * K + kk, mask=kk < K, other=0.0).to(tl.float32)  # [BK]
            b = tl.load(w + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += tl.sum(b.to(tl.float32) * a[None, :], axis=1)  # [BN]
        if SPLIT:
            tl.atomic_add(y + m * N + rn, acc, mask=rn < N)
        else:
            tl.store(y + m * N + rn, acc.to(y.dtype.element_ty), mask=rn < N)


def triton_gemv(x: torch.Tensor, w: torch.Tensor, cfg: dict) -> torch.Tensor:
    """x [M, K] bf16, w [N, K] bf16 -> [M, N] in x's dtype, as F.linear returns it. A K split sums float32 partials
    into a zeroed buffer and casts at the end: two more kernels, timed with it, since a real call site pays them."""
    m, k = x.shape
    n = w.shape[0]
    split = cfg["split"] > 1
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split else x.new_empty(m, n)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg["split"]), cfg["BK"]) * cfg["BK"]
    grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(k, k_per_split))
    gemv[grid](x, w, y, n, k, k_per_split, M=m, BN=cfg["BN"], BK=cfg["BK"], SPLIT=split, num_warps=cfg["w"])
    return y.to(x.dtype) if split else y


def gbench(fn, copies: int) -> float:
    """Microseconds per call: a CUDA graph of `copies` calls, one per weight copy, no launch overhead."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for j in range(copies):
            fn(j)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(copies):
            fn(j)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 20 / copies * 1e3


SHAPES = {"qkv sliding": (8192, 2816), "qkv full": (9216, 2816), "o sliding": (2816, 4096), "o full": (2816, 8192),
          "mlp gate_up": (4224, 2816), "mlp down": (2816, 2112), "router": (128, 2816), "lm head": (262144, 2816)}
TILES = [dict(BN=bn, BK=bk, w=w_, split=split)
         for bn, bk, w_, split in itertools.product((8, 16, 32), (256, 512), (4, 8), (1, 2, 4, 8))]


def check() -> None:
    """Every tile against F.linear on small shapes (runs under TRITON_INTERPRET=1 on a CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for (n, k), m in itertools.product(((40, 300), (128, 512), (33, 1030)), (1, 3)):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        for cfg in TILES[::7]:  # every BN, BK, warp count and split appears
            err = ((triton_gemv(x, w, cfg).float() - ref).norm() / ref.norm()).item()
            assert err < 8e-3, (n, k, m, cfg, err)  # one bf16 rounding of the output (2^-9 relative)
    print("gemv matches F.linear on every checked shape and tile")


def sweep(rows: list[int]) -> None:
    print(torch.cuda.get_device_name(), flush=True)
    bw = 3.0e12 if "H100" in torch.cuda.get_device_name() else 4.3e12  # measured copy bandwidths (docs/benchmarks.md)
    for name, (n, k) in SHAPES.items():
        copies = 8 if n < 100000 else 1
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_cublas = gbench(lambda j: F.linear(x, ws[j]), copies)
            best = (float("inf"), None)
            for cfg in TILES:
                try:
                    t = gbench(lambda j: triton_gemv(x, ws[j], cfg), copies)
                except Exception:  # a tile the compiler refuses
                    continue
                best = min(best, (t, cfg), key=lambda item: item[0])
            ref = F.linear(x, ws[0]).float()
            err = ((triton_gemv(x, ws[0], best[1]).float() - ref).norm() / ref.norm()).item()
            floor = n * k * 2 / bw * 1e6
            print(f"M={m} {name:12s} N={n} K={k}: floor {floor:.1f} us, cuBLAS {t_cublas:.1f} us, "
                  f"gemv {best[0]:.1f} us {best[1]} err {err:.1e}", flush=True)
        ws.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if "--check" in sys.argv:
        check()
    else:
        sweep([int(a) for a in sys.argv[1:]] or [1, 2, 4, 8])
