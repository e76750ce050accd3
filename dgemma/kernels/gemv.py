"""Products of a few rows by a weight matrix (autoregressive decoding) as one Triton kernel: y = x @ w^T.

At one token per forward every dense product of a layer streams a weight matrix for one row of activations: a
matrix-vector product bound by memory. cuBLAS runs each within a few microseconds of its bytes' floor, but a token
chains ~150 of them with small kernels between, and each pays its launch and its ramp after the one before has
drained. This kernel gives each program BLOCK_N whole output rows (their weights read in one pass over K, in
chunks of at most BLOCK_K) and is launched with programmatic dependent launch (`dgemma.kernels.launch`), so its
programs are scheduled while the kernel before it finishes.

`scripts/pdl_probe.py` on one H100 (2026-12-07), one layer's chain q/k/v -> o -> norm -> MLP gate/up -> down
(105 MB of weights, floor 35.0 us), 8 layers of weights in turn in a CUDA graph: cuBLAS 51.0 us a layer, this
kernel 45.4 us, with PDL 41.5 us. Whole model, AR tokens at batch 1 (`scripts/flags_ab.py`, one process each):
cuBLAS 236.7 -> this kernel 241.8 tok/s, with PDL 256.8; reading the first weights before the wait
(`PRELOAD_WEIGHTS`) 257.2 -> 269.7 tok/s.

Float32 sums over K in a different order than cuBLAS's: results agree with F.linear within bf16 rounding, not bit
for bit.

`gated=True` takes the dense MLP's packed [gate | up] rows and multiplies gelu_tanh(gate) * up, computed as each
program loads it and rounded as `dgemma.kernels.gated_gelu` rounds it, so the MLP's down projection needs no
activation kernel before it: bit-identical to `gelu_mul_triton` followed by this kernel. Unlike the last-program
tails that lost in 2026-12-07's A/B, nothing waits for other programs: each program recomputes the activation of
the whole row (2112 values at the released shapes), which costs arithmetic, not a barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.gated_gelu import gelu_tanh
from dgemma.kernels.launch import pdl_options, wait_for_inputs
from dgemma.kernels.tanh import INTERPRETED

BLOCK_N = 4  # output rows a program: 2048 programs for q/k/v, 704 for the MLP's down projection
MAX_BLOCK_K = 4096  # K per load: one pass for every layer's K but the full layers' o projection (8192: two)
NUM_WARPS = 4
# Whether a program reads its first chunk of weights (all of K but the full layers' o projection) before waiting for
# the kernel ahead, so the read overlaps that kernel's end. `python scripts/flags_ab.py`, one H100 (2026-12-07,
# one process, two rounds): AR 257.2 / 257.1 -> 270.2 / 269.1 tok/s; the batch-1 step unchanged (canvases do not
# take this kernel).
PRELOAD_WEIGHTS = True


@triton.jit
def _load_input(row_ptr, k, k_ok, K, GATED: tl.constexpr, LIBDEVICE: tl.constexpr):
    # [BK] of one row's input at columns k; GATED: gelu_tanh(gate) * up from the row's [gate | up] (2K wide),
    # rounded to the activation dtype after the GELU and after the product, as `_gelu_mul_kernel` rounds.
    if GATED:
        gate = tl.load(row_ptr + k, mask=k_ok, other=0.0)
        up = tl.load(row_ptr + K + k, mask=k_ok, other=0.0)
        dtype = gate.dtype
        x = (gelu_tanh(gate.to(tl.float32), LIBDEVICE).to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)
    else:
        x = tl.load(row_ptr + k, mask=k_ok, other=0.0)
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_x, stride_y, M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr, GATED: tl.constexpr,
                 LIBDEVICE: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * K  # [BLOCK_N, 1]
    first_mask = n_ok[:, None] & (k < K)[None, :]
    # No kernel of a forward writes weights, and a forward never starts with this kernel (the embedding or a norm
    # comes first), so the weights may be read before the previous kernel's writes are visible.
    if PRELOAD:
        w_first = tl.load(w_rows + k[None, :], mask=first_mask, other=0.0)  # [BLOCK_N, BK]
    wait_for_inputs(PDL)
    if not PRELOAD:
        w_first = tl.load(w_rows + k[None, :], mask=first_mask, other=0.0)
    for m in tl.static_range(M):
        x = _load_input(x_ptr + m * stride_x, k, k < K, K, GATED, LIBDEVICE)  # [BK]
        acc = tl.sum(w_first.to(tl.float32) * x.to(tl.float32)[None, :], 1)  # [BLOCK_N]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            # A second row reads these weights again: from L1/L2, since the program just streamed them.
            k_ok = (k0 + k) < K
            w = tl.load(w_rows + k0 + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BK]
            x = _load_input(x_ptr + m * stride_x, k0 + k, k_ok, K, GATED, LIBDEVICE)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        tl.store(y_ptr + m * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv_triton(
    x: torch.Tensor,  # [..., K] a few rows; gated: [..., 2K], gate then up
    w: torch.Tensor,  # [N, K]
    gated: bool = False,
) -> torch.Tensor:
    """F.linear(x, w) without bias for a few rows, float32 sums: [..., N] in x's dtype. `gated`: of
    gelu_tanh(gate) * up, the halves of x (see the module's docstring)."""
    width = x.shape[-1]
    if gated and width % 2:
        raise ValueError(f"gemv of a gated input needs [..., 2K] rows (gate then up), got {tuple(x.shape)}")
    k = width // 2 if gated else width
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != k or not w.is_contiguous() or w.dtype != x.dtype:
        raise ValueError(f"gemv needs a contiguous [N, {k}] weight of dtype {x.dtype}, got {tuple(w.shape)} "
                         f"{w.dtype}")
    flat = x.reshape(-1, width)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](flat, w, y, n, k, flat.stride(0), y.stride(0), M=rows, BLOCK_N=BLOCK_N,
                                            BLOCK_K=min(MAX_BLOCK_K, triton.next_power_of_2(k)),
                                            num_warps=NUM_WARPS, PRELOAD=PRELOAD_WEIGHTS, GATED=gated,
                                            LIBDEVICE=not INTERPRETED, **pdl_options(x.device, rows))
    return y.view(*x.shape[:-1], n)
