"""The routed experts of a few decoded tokens as matrix-vector products: two Triton kernels without tensor cores.

A decoded token sends its row to K = 8 experts: each assignment is one row times one expert's weights, pure weight
streaming (8 x 11.9 MB a layer for 26b-a4b in bf16). The tiled kernels of `fused_moe` pad that row to the 16 rows
`tl.dot` needs and give a program a 64- or 128-column tile of an expert: 88 programs stream the gate/up weights
of one token's experts, each 720 KB, on a GPU of 132 SMs. Here, as in `dgemma.kernels.gemv`, a program takes
BLOCK_N whole output rows of one assignment's expert, a few KB to a few tens of KB, so thousands of programs spread
the read over every SM:

- `gate_up`, grid (assignment, I / BLOCK_N): gelu_tanh(x @ gate^T) * (x @ up^T) for the assignment's token,
  rounded as `fused_moe` rounds it: [N*K, I] token-major.
- `down`, grid (assignment, H / BLOCK_N): that row times the expert's down projection: [N*K, H] token-major, the
  rows `fused_moe_triton(..., combine=False)` returns (the layer's output kernel sums them).

The expert ids are the routing kernel's output, so no weight can be read before the wait for it (unlike the dense
products' PRELOAD). FP8 weights (`scales=`) are widened in registers and their float32 sums scaled per output row,
as in `fused_moe`. Sums are float32 over K in another order than `tl.dot`'s: results agree with the tiled kernels
within bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.gated_gelu import gelu_tanh
from dgemma.kernels.launch import pdl_options, wait_for_inputs

# Output rows a program and K per load. gate/up: two [4, 1024] tiles a load (three loads over H = 2816); down: one
# [8, 1024] tile over I = 704 (one masked load).
GATE_UP_TILE = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4)
DOWN_TILE = dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)


@triton.jit
def _row_products(x_ptr, w_rows, n_ok, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # [BLOCK_N] float32: the weight rows at w_rows [BLOCK_N, 1] times the vector at x_ptr, both K long.
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + k) < K
        x = tl.load(x_ptr + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + k0 + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BK]
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    return acc


@triton.jit
def _gate_up_rows_kernel(x_ptr, w_ptr, scale_ptr, experts_ptr, out_ptr, H, I, K_ROUTE, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SCALED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    a = tl.program_id(0).to(tl.int64)  # the assignment, token-major (token * K_ROUTE + k)
    e = tl.load(experts_ptr + a).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of gate (and of up, I further)
    n_ok = n < I
    x_row = x_ptr + (a // K_ROUTE) * H
    gate_rows = w_ptr + e * 2 * I * H + n[:, None].to(tl.int64) * H  # [BLOCK_N, 1]
    acc_g = _row_products(x_row, gate_rows, n_ok, H, BLOCK_N, BLOCK_K)
    acc_u = _row_products(x_row, gate_rows + I * H, n_ok, H, BLOCK_N, BLOCK_K)
    if SCALED:  # FP8 weights: one scale per output row of gate and of up
        acc_g = acc_g * tl.load(scale_ptr + e * 2 * I + n, mask=n_ok, other=0.0)
        acc_u = acc_u * tl.load(scale_ptr + e * 2 * I + I + n, mask=n_ok, other=0.0)
    dtype = out_ptr.dtype.element_ty
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    tl.store(out_ptr + a * I + n, (gelu_tanh(gate).to(dtype).to(tl.float32) * up).to(dtype), mask=n_ok)


@triton.jit
def _down_rows_kernel(h_ptr, w_ptr, scale_ptr, experts_ptr, out_ptr, H, I, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SCALED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    a = tl.program_id(0).to(tl.int64)
    e = tl.load(experts_ptr + a).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns, within H
    n_ok = n < H
    acc = _row_products(h_ptr + a * I, w_ptr + e * H * I + n[:, None].to(tl.int64) * I, n_ok, I, BLOCK_N, BLOCK_K)
    if SCALED:
        acc = acc * tl.load(scale_ptr + e * H + n, mask=n_ok, other=0.0)
    tl.store(out_ptr + a * H + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _tile(tile: dict, k: int) -> dict:
    return dict(tile, BLOCK_K=min(tile["BLOCK_K"], triton.next_power_of_2(k)))


def expert_rows_gemv(
    x: torch.Tensor,  # [N, H] the experts' input
    experts: torch.Tensor,  # [N, K] expert ids
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    gate_up_scale: torch.Tensor,  # [E, 2I] float32 (read only if `scaled`)
    down_scale: torch.Tensor,  # [E, H] float32
    scaled: bool,
) -> torch.Tensor:
    """Each token's K expert outputs, unsummed: [N * K, H] token-major, as `fused_moe._grouped_rows` returns them
    (shapes are checked by `fused_moe.fused_moe_triton`, the one caller)."""
    (n_tokens, hidden), k = x.shape, experts.shape[1]
    inter = gate_up.shape[1] // 2
    assignments = n_tokens * k
    flat_experts = experts.reshape(-1).contiguous()  # [N*K] token-major
    act = torch.empty((assignments, inter), dtype=x.dtype, device=x.device)
    t1 = _tile(GATE_UP_TILE, hidden)
    _gate_up_rows_kernel[(assignments, triton.cdiv(inter, t1["BLOCK_N"]))](
        x, gate_up, gate_up_scale, flat_experts, act, hidden, inter, k, SCALED=scaled, **t1,
        **pdl_options(x.device, n_tokens))
    out = torch.empty((assignments, hidden), dtype=x.dtype, device=x.device)
    t2 = _tile(DOWN_TILE, inter)
    _down_rows_kernel[(assignments, triton.cdiv(hidden, t2["BLOCK_N"]))](
        act, down, down_scale, flat_experts, out, hidden, inter, SCALED=scaled, **t2,
        **pdl_options(x.device, n_tokens))
    return out
