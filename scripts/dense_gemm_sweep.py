"""The decoder's dense GEMMs at one canvas (256 rows) against their weight-read floor: cuBLAS (F.linear) and a plain
Triton GEMM over a small tile sweep, each timed inside a CUDA graph (no launch cost) over 8 copies of the weight (so
nothing stays in L2).

    python scripts/dense_gemm_sweep.py [ROWS]   # default 256 (needs a CUDA GPU; H100 and H200 bandwidths built in)

Prints one line per 26b-a4b weight shape: floor (bytes / copy bandwidth), cuBLAS, the best Triton tile.

The kernel here launches the programs of one weight tile a wave apart (output columns fastest). A Triton GEMM that
launched them side by side (rows fastest, so each weight tile is read from HBM once) lost to cuBLAS too, on every
shape and at its best tile of 36, and in the whole step (H100, 2026-12-08, docs/benchmarks.md): it was deleted.
"""

import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

print(torch.cuda.get_device_name(), flush=True)

@triton.jit
def mm(x, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # y [M, N] = x [M, K] @ w [N, K]^T, float32 accumulation
    pid_n = tl.program_id(0); pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM); rn = pid_n * BN + tl.arange(0, BN); rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.)  # [BM, BK]
        b = tl.load(w + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.)  # [BK, BN]
        acc = tl.dot(a, b, acc)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=out_mask)

def tmm(x, w, cfg):
    M, K = x.shape; N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    mm[(triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]))](
        x, w, y, M, N, K, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], num_warps=cfg["w"], num_stages=cfg["s"])
    return y

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

bw = 3.0e12 if "H100" in torch.cuda.get_device_name() else 4.3e12  # measured copy bandwidths (docs/benchmarks.md)
shapes = {"qkv sliding": (8192, 2816), "qkv full": (9216, 2816), "o sliding": (2816, 4096), "o full": (2816, 8192),
          "mlp gate_up": (4224, 2816), "mlp down": (2816, 2112), "router": (128, 2816), "lm head": (262144, 2816)}
M = int(sys.argv[1]) if len(sys.argv) > 1 else 256
for name, (N, K) in shapes.items():
    L = 8 if N < 100000 else 1
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(L)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    tc = gbench(lambda j: F.linear(x, ws[j]), L)
    floor = N * K * 2 / bw * 1e6
    best = (1e9, None)
    for bm, bn, bk, w_, s in itertools.product((64, 128), (32, 64, 128), (64, 128), (4, 8), (4,)):
        cfg = dict(BM=bm, BN=bn, BK=bk, w=w_, s=s)
        try:
            t = gbench(lambda j: tmm(x, ws[j], cfg), L)
        except Exception:  # out of shared memory etc.
            continue
        if t < best[0]:
            best = (t, cfg)
    ref = F.linear(x, ws[0]).float()
    err = ((tmm(x, ws[0], best[1]).float() - ref).norm() / ref.norm()).item()
    ws.clear()
    torch.cuda.empty_cache()
    print(f"M={M} {name:12s} N={N} K={K}: floor {floor:.1f} us, cuBLAS {tc:.1f} us, triton {best[0]:.1f} us "
          f"{best[1]} err {err:.1e}", flush=True)
