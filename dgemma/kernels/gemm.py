"""Products of a canvas's rows by a dense weight as one Triton kernel: y = x @ w^T, for a few hundred rows.

A batch-1 denoising step multiplies 256 rows by every layer's dense weights (q/k/v, o, the dense MLP): ~105 MB a
sliding layer, 35 us of bytes on an H100. cuBLAS ran them at ~60% of bandwidth (profile of the seventeenth session,
docs/benchmarks.md: ~2.2 ms of a 22.4 ms step against ~1.1 ms of bytes). At 256 rows its tiles leave SMs idle: a
128 x 256 tile gives the packed q/k/v product (8192 outputs) 64 programs and the o projection (2816) 22 for 132
SMs. Here a program takes BLOCK_M rows x BLOCK_N outputs, and the programs that share a weight tile are adjacent in
launch order (rows fastest), so each weight tile is read from HBM once and by its other programs from L2. It takes
programmatic dependent launch like the kernels around it (`dgemma.kernels.launch`).

The ninth session's plain Triton GEMM lost to cuBLAS on every shape, e.g. 26.9 against
22.8 us for the packed q/k/v (floor 15.4 us). It launched the programs of one weight tile a whole wave apart
(output columns fastest), so a tile could be read from HBM once per row block. `scripts/dense_gemm_sweep.py` times
this kernel beside cuBLAS.

Float32 sums over K in tiles: results agree with F.linear within bf16 rounding, not bit for bit. Off until
measured (`dgemma.model.layers.GEMM_MAX_ROWS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.gemv import product_operands
from dgemma.kernels.launch import launch, pdl_options, wait_for_inputs

# Tiles by output width (first match on N <= limit). Not yet timed: chosen so that every product of a batch-1
# canvas fills the 132 SMs of an H100 (o and down projections: 4 x 44 = 176 programs; the MLP's gate/up 4 x 66;
# q/k/v 4 x 64). Neither spills on sm_90 (`scripts/kernel_spills.py`: 96 and 60 registers a thread).
TILES = (
    (4096, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    (1 << 62, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)),
)
BLOCKS = ("BLOCK_K", "BLOCK_N", "BLOCK_M")  # what `launch` may halve where a tile does not fit the GPU


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m  # rows fastest: the programs of one weight tile run side by side
    pid_n = tl.program_id(0) // num_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    k = tl.arange(0, BLOCK_K)  # [BK]
    m_ok, n_ok = m < M, n < N
    x_tile = x_ptr + m[:, None].to(tl.int64) * stride_x + k[None, :]  # [BM, BK]
    w_tile = w_ptr + n[None, :].to(tl.int64) * K + k[:, None]  # [BK, BN]: w^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_tile, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_tile, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + k) < K
            x = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    y = y_ptr + m[:, None].to(tl.int64) * stride_y + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm_triton(
    x: torch.Tensor,  # [..., K]
    w: torch.Tensor,  # [N, K]
    **tile,  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages: by default from TILES by N
) -> torch.Tensor:
    """F.linear(x, w) without bias, float32 sums: [..., N] in x's dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16):  # float32 would run on the tensor cores as TF32
        raise ValueError(f"gemm takes bfloat16 or float16 activations, got {x.dtype}")
    flat, y = product_operands("gemm", x, w)
    rows, k = flat.shape
    n = w.shape[0]
    tile = {**next(t for limit, t in TILES if n <= limit), **tile}
    grid = lambda t: (triton.cdiv(rows, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"]),)  # noqa: E731
    launch(_gemm_kernel, grid, tile, BLOCKS, flat, w, y, rows, n, k, flat.stride(0), y.stride(0),
           EVEN_K=k % tile["BLOCK_K"] == 0, **pdl_options(x.device, rows))
    return y.view(*x.shape[:-1], n)
