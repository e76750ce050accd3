"""Do programmatic dependent launches (PDL) hide the per-call cost of an AR token's matrix-vector products?

An AR token's dense products are ~150 cuBLAS calls, each 3-5 us above its weight-read floor (docs/benchmarks.md,
sixteenth session): the ramp at the start of a call and its last wave. With PDL a kernel's programs may start while
the previous kernel finishes: they read their weights (which no kernel writes) before `griddepcontrol.wait`, and only
the input vector after it. This times one layer's chain of products, 8 layers of weights in turn inside a CUDA graph:

    q/k/v (8192 x 2816) -> o (2816 x 4096) -> add + RMS norm -> MLP gate/up (4224 x 2816) -> down (2816 x 2112)

with cuBLAS (F.linear), a Triton GEMV without PDL, with PDL, and with PDL reading its weights before the wait.

    python scripts/pdl_probe.py       # needs a Hopper GPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from dgemma.bench.measure import graph_us

H, QKV, O_IN, GU, D_IN, LAYERS = 2816, 8192, 4096, 4224, 2112, 8


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
          EARLY: tl.constexpr):
    # y[rows] = w[rows, :K] @ x[:K]; with EARLY the weights are read before waiting for the previous kernel
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + k[None, :]
    if EARLY:
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
    if PDL:
        gdc_wait()
    if not EARLY:
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
    x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], 1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _add_norm(a_ptr, b_ptr, w_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # out = rms_norm(a + b) * w over one row of N
    if PDL:
        gdc_launch_dependents()
    c = tl.arange(0, BLOCK)
    ok = c < N
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    s = tl.load(a_ptr + c, mask=ok, other=0.0).to(tl.float32) + tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(s * s, 0) / N + 1e-6)
    tl.store(out_ptr + c, (s * r * w).to(out_ptr.dtype.element_ty), mask=ok)


def gemv(x, w, y, block_n, warps, pdl, early):
    n, k = w.shape
    _gemv[(n // block_n,)](x, w, y, k, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), PDL=pdl, EARLY=early,
                           num_warps=warps, launch_pdl=pdl)


def add_norm(a, b, w, out, pdl):
    _add_norm[(1,)](a, b, w, out, a.numel(), BLOCK=triton.next_power_of_2(a.numel()), PDL=pdl, num_warps=8,
                    launch_pdl=pdl)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt) * 0.02  # noqa: E731
    layers = [dict(qkv=mk(QKV, H), o=mk(H, O_IN), gu=mk(GU, H), d=mk(H, D_IN), nw=1 + mk(H)) for _ in range(LAYERS)]
    nbytes = sum(v.numel() * 2 for k, v in layers[0].items() if k != "nw")
    x0 = torch.randn(H, device=dev, dtype=dt)
    bufs = dict(x=x0.clone(), y1=torch.empty(QKV, device=dev, dtype=dt), y2=torch.empty(H, device=dev, dtype=dt),
                x2=torch.empty(H, device=dev, dtype=dt), y3=torch.empty(GU, device=dev, dtype=dt))

    def chain(variant):
        b = bufs
        b["x"].copy_(x0)
        for L in layers:
            if variant[0] == "cublas":
                torch.matmul(L["qkv"], b["x"], out=b["y1"])
                torch.matmul(L["o"], b["y1"][:O_IN], out=b["y2"])
                add_norm(b["y2"], b["x"], L["nw"], b["x2"], False)
                torch.matmul(L["gu"], b["x2"], out=b["y3"])
                torch.matmul(L["d"], b["y3"][:D_IN], out=b["x"])
            else:
                _, bn, warps, pdl, early = variant
                gemv(b["x"], L["qkv"], b["y1"], bn, warps, pdl, early)
                gemv(b["y1"], L["o"], b["y2"], bn, warps, pdl, early)
                add_norm(b["y2"], b["x"], L["nw"], b["x2"], pdl)
                gemv(b["x2"], L["gu"], b["y3"], bn, warps, pdl, early)
                gemv(b["y3"], L["d"], b["x"], bn, warps, pdl, early)
        return b["x"].clone()

    def timed(variant):
        out = chain(variant)  # compiles, and gives the result to compare
        us = graph_us(lambda: chain(variant), replays=50) / LAYERS  # a graph of the chain over all 8 layers
        return us, out, bufs["x"].clone()  # the last replay's result

    print(torch.cuda.get_device_name(), f"floor {nbytes / 3.0e6:.1f} us a layer at 3.0 TB/s ({nbytes / 1e6:.1f} MB)")
    base_t, base_out, _ = timed(("cublas",))
    print(f"cuBLAS F.linear chain: {base_t:.1f} us a layer", flush=True)
    for bn, warps in ((4, 4), (4, 8), (8, 8), (2, 4)):
        for pdl, early in ((False, False), (True, False), (True, True)):
            try:
                t, out, replayed = timed(("triton", bn, warps, pdl, early))
            except Exception as exc:
                print(f"BLOCK_N {bn} warps {warps} pdl {pdl} early {early}: failed {type(exc).__name__}: {exc}")
                continue
            err = ((out.float() - base_out.float()).norm() / base_out.float().norm()).item()
            same = torch.equal(out, replayed)
            print(f"BLOCK_N {bn} warps {warps} pdl {pdl!s:5} early {early!s:5}: {t:.1f} us a layer, rel err vs "
                  f"cuBLAS {err:.1e}, graph replay equal to eager {same}", flush=True)


if __name__ == "__main__":
    main()
