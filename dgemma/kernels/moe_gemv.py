"""Routed experts for a few tokens (autoregressive decoding) as two Triton matrix-vector kernels, with no grouping.

At one token a layer's 8 assignments touch 8 of the 128 experts. The grouped kernels (`fused_moe.py`) first group
the assignments by expert (one more launch on the critical path of every layer), then launch a program per expert
and output tile, of which 120 experts' programs find no rows and exit, and the 8 busy ones multiply 16-row tiles
holding one real row: 88 programs streaming 95 MB, fewer than an H100 has SMs. Here each program takes one
assignment (token, expert) and one output tile straight from the router's [N, K] ids, and multiplies by a sum of
products in float32 instead of `tl.dot`; the grid has as many programs per assignment as there are output tiles.

- `gate_up` kernel, grid (assignment, I-tile): gelu_tanh(x W_gate^T) * (x W_up^T) for one row: [N*K, I].
- `down` kernel, grid (assignment, H-tile): that row times W_down^T, written token-major (token * K + k), the
  layout `fused_moe_triton(combine=False)` returns, so the combine and the layer's output kernel read it as before.

Rounding is the grouped kernels' (gate and up rounded to the activation dtype before the gelu product; float32
sums rounded once); only the order of the float32 sums differs. FP8 weights (`scales=`) widen in registers and
scale the float32 sums, as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.gated_gelu import gelu_tanh as _gelu_tanh

# Output columns per program (one row): I = 704 gives 44 gate/up tiles and H = 2816 gives 88 down tiles per
# assignment, 352 and 704 programs at one token: more than two per SM of an H100. BLOCK_K: the reduction chunk.
GATE_UP_TILE = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4)
DOWN_TILE = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, scale_ptr, experts_ptr, out_ptr, H, I, K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)  # assignment: token a // K, its (a % K)-th expert
    e = tl.load(experts_ptr + a).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < I
    w_gate = w_ptr + e * 2 * I * H + offs_n[:, None].to(tl.int64) * H + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    w_up = w_gate + I * H
    x_row = x_ptr + (a // K) * H + offs_k
    dtype = out_ptr.dtype.element_ty
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + offs_k) < H
        x = tl.load(x_row + k0, mask=k_mask, other=0.0).to(tl.float32)
        w_mask = n_mask[:, None] & k_mask[None, :]
        acc_g += tl.load(w_gate + k0, mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
        acc_u += tl.load(w_up + k0, mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
    gate = tl.sum(acc_g, 1)  # [BLOCK_N]
    up = tl.sum(acc_u, 1)
    if SCALED:  # FP8 weights: one scale per output row of gate and of up
        gate = gate * tl.load(scale_ptr + e * 2 * I + offs_n, mask=n_mask, other=0.0)
        up = up * tl.load(scale_ptr + e * 2 * I + I + offs_n, mask=n_mask, other=0.0)
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    h = (_gelu_tanh(gate).to(dtype).to(tl.float32) * up).to(dtype)
    tl.store(out_ptr + a * I + offs_n, h, mask=n_mask)


@triton.jit
def _down_kernel(h_ptr, w_ptr, scale_ptr, experts_ptr, out_ptr, H, I, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    e = tl.load(experts_ptr + a).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns, within H
    offs_k = tl.arange(0, BLOCK_K)  # within I
    n_mask = offs_n < H
    w_rows = w_ptr + e * H * I + offs_n[:, None].to(tl.int64) * I + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    h_row = h_ptr + a * I + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_mask = (k0 + offs_k) < I
        h = tl.load(h_row + k0, mask=k_mask, other=0.0).to(tl.float32)
        acc += tl.load(w_rows + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32) * h[None, :]
    y = tl.sum(acc, 1)
    if SCALED:
        y = y * tl.load(scale_ptr + e * H + offs_n, mask=n_mask, other=0.0)
    tl.store(out_ptr + a * H + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def moe_gemv_rows(
    x: torch.Tensor,  # [N, H] expert input
    experts: torch.Tensor,  # [N, K] expert ids
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    gate_up_scale: torch.Tensor,  # FP8 weights: float32 [E, 2I] (unread unless `scaled`)
    down_scale: torch.Tensor,  # float32 [E, H]
    scaled: bool,
) -> torch.Tensor:
    """Each token's K expert outputs, unsummed and token-major: [N * K, H] in x's dtype (shapes checked by the
    caller, `fused_moe_triton`)."""
    n_tokens, hidden = x.shape
    k = experts.shape[1]
    inter = gate_up.shape[1] // 2
    assignments = n_tokens * k
    ids = experts.reshape(-1).contiguous()  # [N*K] token-major
    hidden_act = torch.empty((assignments, inter), dtype=x.dtype, device=x.device)  # [N*K, I]
    t1, t2 = GATE_UP_TILE, DOWN_TILE
    _gate_up_kernel[(assignments, triton.cdiv(inter, t1["BLOCK_N"]))](
        x, gate_up, gate_up_scale, ids, hidden_act, hidden, inter, K=k, SCALED=scaled, **t1)
    out = torch.empty((assignments, hidden), dtype=x.dtype, device=x.device)  # [N*K, H]
    _down_kernel[(assignments, triton.cdiv(hidden, t2["BLOCK_N"]))](
        hidden_act, down, down_scale, ids, out, hidden, inter, SCALED=scaled, **t2)
    return out
