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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.launch import pdl_options, wait_for_inputs

BLOCK_N = 4  # output rows a program: 2048 programs for q/k/v, 704 for the MLP's down projection
MAX_BLOCK_K = 4096  # K per load: one pass for every layer's K but the full layers' o projection (8192: two)
NUM_WARPS = 4
# Whether a program reads its first chunk of weights (all of K but the full layers' o projection) before waiting for
# the kernel ahead, so the read overlaps that kernel's end. `python scripts/flags_ab.py`, one H100 (2026-12-07,
# one process, two rounds): AR 257.2 / 257.1 -> 270.2 / 269.1 tok/s; the batch-1 step unchanged (canvases do not
# take this kernel).
PRELOAD_WEIGHTS = True


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_x, stride_y, M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr):
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
        x = tl.load(x_ptr + m * stride_x + k, mask=k < K, other=0.0)  # [BK]
        acc = tl.sum(w_first.to(tl.float32) * x.to(tl.float32)[None, :], 1)  # [BLOCK_N]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            # A second row reads these weights again: from L1/L2, since the program just streamed them.
            k_ok = (k0 + k) < K
            w = tl.load(w_rows + k0 + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BK]
            x = tl.load(x_ptr + m * stride_x + k0 + k, mask=k_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        tl.store(y_ptr + m * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv_triton(
    x: torch.Tensor,  # [..., K] a few rows
    w: torch.Tensor,  # [N, K]
) -> torch.Tensor:
    """F.linear(x, w) without bias for a few rows, float32 sums: [..., N] in x's dtype."""
    k = x.shape[-1]
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != k or not w.is_contiguous() or w.dtype != x.dtype:
        raise ValueError(f"gemv needs a contiguous [N, {k}] weight of dtype {x.dtype}, got {tuple(w.shape)} "
                         f"{w.dtype}")
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](flat, w, y, n, k, flat.stride(0), y.stride(0), M=rows, BLOCK_N=BLOCK_N,
                                            BLOCK_K=min(MAX_BLOCK_K, triton.next_power_of_2(k)),
                                            num_warps=NUM_WARPS, PRELOAD=PRELOAD_WEIGHTS, **pdl_options(x.device, rows))
    return y.view(*x.shape[:-1], n)
