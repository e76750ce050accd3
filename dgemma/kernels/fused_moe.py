"""Routed experts for small token counts as two Triton kernels that stream each expert's weights once.

At a batch-1 denoising step each expert gets ~16 of the 2048 token-expert assignments, so the expert GEMMs are
pure weight streaming (45.7 GB a step). torch._grouped_mm reaches ~69% of copy bandwidth there and needs a
gathered copy of the inputs, a separate gelu*up pass and an un-permuting gather. Here:

- `gate_up` kernel, grid (split, expert, I-tile): gathers the expert's tokens by index, computes the gate and up tiles
  with one pass over x, and writes gelu_tanh(gate) * up: [N*K, I] in expert-sorted order.
- `down` kernel, grid (split, expert, H-tile): multiplies by down_proj and scatters each row straight to its
  token-major slot (token * K + k), so the weighted sum over K needs no gather.
- With at most `DIRECT_MAX_ASSIGNMENTS` assignments (decoded tokens) the second grid axis is the assignment, not
  the expert: each program takes one token-major row and the expert the routing chose for it, with no grouping.
- Both grids have a first axis of M_SPLITS programs (1 by default) that share an expert's tile and take its
  passes of BLOCK_M rows in turn: an expert just over one tile's rows is then read by two programs launched side by
  side (the second read can come from L2) instead of twice by one program in sequence. For tile sweeps.
- With a tile's `TMA` (Hopper and later; a decoded token's down tile has it), the weight tiles, and the
  down product's rows (consecutive in the grouped order), are boxes of tensor descriptors built on the host: the
  tensor-memory accelerator copies them to shared memory, and the threads do no address arithmetic for them. Boxes
  may reach past a product's rows or columns; what they bring there is computed and never stored, so the stored rows
  are the pointer loads' rows. Where a view is not 16-byte aligned the kernels load with pointers.
- `combine` kernel, grid (token, H-tile): the weighted sum of a token's K rows in float32, one read of [N*K, H].
  It replaced a batched matmul of [N, 1, K] x [N, K, H], whose N products of one row each ran at a seventh of
  copy bandwidth (26 us a layer at a batch-1 step on an H200, 0.8 ms of the step).

Group bounds stay on the device (no host sync): the kernels are CUDA-graph capturable. Rounding follows the
eager path (gate and up rounded to the activation dtype before the gelu product) up to one rounding of the
product: results agree with torch._grouped_mm within bf16 tolerance, not bit for bit.

Measured (scripts/moe_kernel_sweep.py, H200, one layer's 26b-a4b experts, bf16, 2026-11-27): 256 tokens 505 us
(3.01 TB/s) vs 661 us for experts_grouped; 512 tokens 507 vs 681 us. With the small-load tiles it lost from 1024
tokens on (841 vs 815 us); 128-row tiles for busier experts (`moe_tiles.py`) win there too: 1024 tokens 691 vs
821 us, 2048 tokens 970 vs 1117 us. `dgemma.model.moe.use_fused_moe` routes inference calls of up to 512
assignments per expert (batches of up to 32 canvases) here.

FP8 weights (`dgemma.model.fp8`, `scales=`): each weight tile is loaded in one byte per weight, widened to the
activations' dtype in registers (exact: every e4m3 number is a bf16 and an fp16 number), and the float32 sums are
multiplied by the output rows' scales before the usual rounding. At a batch-1 step this reads half the bytes: one
layer's experts at 256 tokens 358 us against 570 us in bf16 (H100). With busier experts the widening is what costs,
so those tiles set SWAP_AB: the kernels compute the transposed product, weights [BLOCK_N, BLOCK_K] times
activations [BLOCK_K, BLOCK_M], with the widened weights as the first operand, which Hopper's MMA can take from
registers (1024 tokens 631 us, against 699 us unswapped and 697 us in bf16; moe_tiles.py).

The Triton interpreter (TRITON_INTERPRET=1) runs these kernels on a CPU in float16 and float32 only: it
multiplies bfloat16 tiles as their raw 16-bit integers in `tl.dot`, so bfloat16 is checked on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dgemma.kernels.gated_gelu import gelu_tanh as _gelu_tanh
from dgemma.kernels.launch import hopper_or_later, launch, pdl_options, wait_for_inputs
from dgemma.kernels.moe_tiles import tiles_for
from dgemma.kernels.routing import group_by_expert_triton


@triton.jit
def _load_rows(a_ptrs, r_mask, k_mask, EVEN_K: tl.constexpr):
    # A [BLOCK_M, BLOCK_K] slice of the pass's activation rows (zeros past the group and past K).
    if EVEN_K:
        a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
    return a


@triton.jit
def _load_weights(w_ptrs, w_n_mask, k_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr):
    # A weight tile's slice: [BLOCK_K, BLOCK_N], or with SWAP_AB [BLOCK_N, BLOCK_K] (zeros past N and past K).
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=w_n_mask, other=0.0)
    elif SWAP_AB:
        w = tl.load(w_ptrs, mask=w_n_mask & k_mask[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=w_n_mask & k_mask[:, None], other=0.0)
    return w


@triton.jit
def _weight_tile(w_ptrs, w_desc, w_row, k0, w_n_mask, k_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 SWAP_AB: tl.constexpr, TMA: tl.constexpr):
    # The weight slice at K offset k0, as `_load_weights` gives it. With TMA, the [BLOCK_N, BLOCK_K] box of the
    # flattened weights whose first row is w_row: the tensor-memory accelerator copies it to shared memory without
    # the threads' address arithmetic, zeros past the tensor's edge. Rows past the product's N are another part's
    # (up for gate, the next expert): their columns are computed and never stored.
    if TMA:
        w = w_desc.load([w_row, k0])
        if not SWAP_AB:
            w = tl.trans(w)
    else:
        w = _load_weights(w_ptrs + k0, w_n_mask, k_mask, EVEN_N, EVEN_K, SWAP_AB)
    return w


@triton.jit
def _program_rows(pid, ends_ptr, experts_ptr, DIRECT: tl.constexpr):
    # (expert, first row, one past the last row) of the program's rows: expert pid's group in the sorted order, or
    # with DIRECT assignment pid alone (token-major), whose expert the routing chose.
    if DIRECT:
        e = tl.load(experts_ptr + pid)
        start = pid
        end = pid + 1
    else:
        e = pid
        end = tl.load(ends_ptr + pid)
        start = tl.load(ends_ptr + pid - 1, mask=pid > 0, other=0)
    return e, start, end


@triton.jit
def _gate_up_pass(m0, end, x_ptr, token_ptr, w_gate, w_up, w_desc, w_row, w_n_mask, scale_ptr, e, offs_n, n_mask,
                  offs_k, out_ptr, H, I, K_ROUTE, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr, SWAP_AB: tl.constexpr,
                  DIRECT: tl.constexpr, TMA: tl.constexpr):
    # Rows [m0, m0 + BLOCK_M) of expert e's group (those below `end`) times one gate and one up tile.
    rows = m0 + tl.arange(0, BLOCK_M)
    r_mask = rows < end
    if DIRECT:  # rows are token-major assignments (token * K_ROUTE + k): no grouping
        tokens = (rows // K_ROUTE).to(tl.int64)
    else:
        tokens = tl.load(token_ptr + rows, mask=r_mask, other=0).to(tl.int64)
    a_ptrs = x_ptr + tokens[:, None] * H + offs_k[None, :]
    dtype = out_ptr.dtype.element_ty
    if SWAP_AB:  # accumulate the transposed product, [BLOCK_N, BLOCK_M]
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + offs_k) < H
        a = _load_rows(a_ptrs + k0, r_mask, k_mask, EVEN_K)
        wg = _weight_tile(w_gate, w_desc, w_row, k0, w_n_mask, k_mask, EVEN_N, EVEN_K, SWAP_AB, TMA)
        wu = _weight_tile(w_up, w_desc, w_row + I, k0, w_n_mask, k_mask, EVEN_N, EVEN_K, SWAP_AB, TMA)
        if SCALED:  # widen float8 to the activations' dtype: exact (e4m3 values are bf16 and fp16 values)
            wg = wg.to(dtype)
            wu = wu.to(dtype)
        if SWAP_AB:  # the widened weights as the first operand, which Hopper's MMA may read from registers
            acc_g = tl.dot(wg, tl.trans(a), acc_g)
            acc_u = tl.dot(wu, tl.trans(a), acc_u)
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
    if SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    if SCALED:  # FP8 weights: one scale per output row of gate and of up, applied to the float32 sums
        acc_g = acc_g * tl.load(scale_ptr + e * 2 * I + offs_n, mask=n_mask, other=0.0)[None, :]
        acc_u = acc_u * tl.load(scale_ptr + e * 2 * I + I + offs_n, mask=n_mask, other=0.0)[None, :]
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    h = (_gelu_tanh(gate).to(dtype).to(tl.float32) * up).to(dtype)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * I + offs_n[None, :], h, mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, scale_ptr, token_ptr, ends_ptr, experts_ptr, out_ptr, H, I, K_ROUTE, w_desc,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_K: tl.constexpr, M_SPLITS: tl.constexpr, SCALED: tl.constexpr, SWAP_AB: tl.constexpr,
                    TAIL_M: tl.constexpr, DIRECT: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    split = tl.program_id(0)
    pid_n = tl.program_id(2)
    e, start, end = _program_rows(tl.program_id(1), ends_ptr, experts_ptr, DIRECT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < I
    # Tiles of gate (rows [0, I)) and up (rows [I, 2I)) of expert e: [BLOCK_K, BLOCK_N] (transposed by indexing),
    # or with SWAP_AB [BLOCK_N, BLOCK_K] as stored, the first operand of the product.
    w_base = w_ptr + e.to(tl.int64) * 2 * I * H
    if SWAP_AB:
        w_gate = w_base + offs_n[:, None].to(tl.int64) * H + offs_k[None, :]
        w_n_mask = n_mask[:, None]
    else:
        w_gate = w_base + offs_n[None, :].to(tl.int64) * H + offs_k[:, None]
        w_n_mask = n_mask[None, :]
    w_up = w_gate + I * H
    w_row = (e * 2 * I + pid_n * BLOCK_N).to(tl.int32)  # the gate tile's first row in the TMA view [E * 2I, H]
    for m0 in range(start + split * BLOCK_M, end, BLOCK_M * M_SPLITS):
        if TAIL_M > 0:
            if end - m0 <= TAIL_M:  # the group's last few rows: a shorter product wastes less
                _gate_up_pass(m0, end, x_ptr, token_ptr, w_gate, w_up, w_desc, w_row, w_n_mask, scale_ptr, e, offs_n,
                              n_mask, offs_k, out_ptr, H, I, K_ROUTE, TAIL_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                              SCALED, SWAP_AB, DIRECT, TMA)
            else:
                _gate_up_pass(m0, end, x_ptr, token_ptr, w_gate, w_up, w_desc, w_row, w_n_mask, scale_ptr, e, offs_n,
                              n_mask, offs_k, out_ptr, H, I, K_ROUTE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K,
                              SCALED, SWAP_AB, DIRECT, TMA)
        else:
            _gate_up_pass(m0, end, x_ptr, token_ptr, w_gate, w_up, w_desc, w_row, w_n_mask, scale_ptr, e, offs_n,
                          n_mask, offs_k, out_ptr, H, I, K_ROUTE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, SCALED,
                          SWAP_AB, DIRECT, TMA)


@triton.jit
def _down_pass(m0, end, h_ptr, a_desc, w_ptrs, w_desc, w_row, w_n_mask, scale_ptr, e, dest_ptr, offs_n, n_mask,
               offs_k, out_ptr, H, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr, SWAP_AB: tl.constexpr,
               DIRECT: tl.constexpr, TMA: tl.constexpr):
    # Rows [m0, m0 + BLOCK_M) of expert e's group times one down tile, scattered to their token-major slots.
    rows = m0 + tl.arange(0, BLOCK_M)
    r_mask = rows < end
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * I + offs_k[None, :]
    dtype = h_ptr.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_mask = (k0 + offs_k) < I
        if TMA:  # the pass's rows are consecutive: one box. Rows past the group are the next group's (or zeros),
            a = a_desc.load([m0, k0])  # whose products are not stored
        else:
            a = _load_rows(a_ptrs + k0, r_mask, k_mask, EVEN_K)
        w = _weight_tile(w_ptrs, w_desc, w_row, k0, w_n_mask, k_mask, EVEN_N, EVEN_K, SWAP_AB, TMA)
        if SCALED:
            w = w.to(dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, w, acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + e * H + offs_n, mask=n_mask, other=0.0)[None, :]
    if DIRECT:  # rows already token-major
        dest = rows.to(tl.int64)
    else:
        dest = tl.load(dest_ptr + rows, mask=r_mask, other=0).to(tl.int64)
    tl.store(out_ptr + dest[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, scale_ptr, dest_ptr, ends_ptr, experts_ptr, out_ptr, H, I, w_desc, a_desc, a_tail_desc,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, M_SPLITS: tl.constexpr, SCALED: tl.constexpr, SWAP_AB: tl.constexpr,
                 TAIL_M: tl.constexpr, DIRECT: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    split = tl.program_id(0)
    pid_n = tl.program_id(2)
    e, start, end = _program_rows(tl.program_id(1), ends_ptr, experts_ptr, DIRECT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns, within H
    offs_k = tl.arange(0, BLOCK_K)  # within I
    n_mask = offs_n < H
    w_base = w_ptr + e.to(tl.int64) * H * I
    if SWAP_AB:
        w_ptrs = w_base + offs_n[:, None].to(tl.int64) * I + offs_k[None, :]  # [BN, BK]
        w_n_mask = n_mask[:, None]
    else:
        w_ptrs = w_base + offs_n[None, :].to(tl.int64) * I + offs_k[:, None]  # [BK, BN]
        w_n_mask = n_mask[None, :]
    w_row = (e * H + pid_n * BLOCK_N).to(tl.int32)  # the tile's first row in the TMA view [E * H, I]
    for m0 in range(start + split * BLOCK_M, end, BLOCK_M * M_SPLITS):
        if TAIL_M > 0:
            if end - m0 <= TAIL_M:  # the tail's rows come in boxes of their own height
                _down_pass(m0, end, h_ptr, a_tail_desc, w_ptrs, w_desc, w_row, w_n_mask, scale_ptr, e, dest_ptr,
                           offs_n, n_mask, offs_k, out_ptr, H, I, TAIL_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, SCALED,
                           SWAP_AB, DIRECT, TMA)
            else:
                _down_pass(m0, end, h_ptr, a_desc, w_ptrs, w_desc, w_row, w_n_mask, scale_ptr, e, dest_ptr, offs_n,
                           n_mask, offs_k, out_ptr, H, I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, SCALED, SWAP_AB,
                           DIRECT, TMA)
        else:
            _down_pass(m0, end, h_ptr, a_desc, w_ptrs, w_desc, w_row, w_n_mask, scale_ptr, e, dest_ptr, offs_n,
                       n_mask, offs_k, out_ptr, H, I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, SCALED, SWAP_AB,
                       DIRECT, TMA)


@triton.jit
def weighted_rows_sum(rows_ptr, w_ptr, token, cols, mask, H, dtype: tl.constexpr, K: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Columns `cols` of sum_k w[token, k] * rows[token * K + k] in float32 ([BLOCK]): the combine's arithmetic,
    shared with the layer's output kernel that folds it in (`dgemma.kernels.residual_norms`)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(K):
        # The weight rounds to the activation dtype first, as the batched matmul the combine replaced read it.
        w = tl.load(w_ptr + token * K + k).to(dtype).to(tl.float32)
        acc += w * tl.load(rows_ptr + (token * K + k) * H + cols, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _combine_kernel(rows_ptr, w_ptr, y_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    dtype = y_ptr.dtype.element_ty
    acc = weighted_rows_sum(rows_ptr, w_ptr, n, cols, mask, H, dtype, K, BLOCK_H)
    tl.store(y_ptr + n * H + cols, acc.to(dtype), mask=mask)


def combine_triton(
    rows: torch.Tensor,  # [N*K, H] expert outputs, token-major (token * K + k)
    weights: torch.Tensor,  # [N, K] routing weights (float32)
) -> torch.Tensor:
    """sum_k weights[n, k] * rows[n * K + k] with float32 accumulation: [N, H] in rows' dtype."""
    n_tokens, k = weights.shape
    if rows.dim() != 2 or rows.shape[0] != n_tokens * k or not rows.is_contiguous():
        raise ValueError(f"combine needs contiguous rows [{n_tokens} * {k}, H], got {tuple(rows.shape)}")
    hidden = rows.shape[1]
    y = torch.empty((n_tokens, hidden), dtype=rows.dtype, device=rows.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(n_tokens, triton.cdiv(hidden, block_h))](rows, weights.contiguous(), y, hidden, K=k,
                                                              BLOCK_H=block_h, **pdl_options(rows.device, n_tokens))
    return y


TILE_BLOCKS = ("BLOCK_K", "BLOCK_N", "BLOCK_M")  # what `launch` may halve where a tile does not fit the GPU

# Calls of at most this many token-expert assignments (8 per decoded token) run one program per assignment, whose
# expert the routing chose, instead of one per expert over the grouped assignments: no grouping kernel, and 8
# programs a tile instead of 128 of which 120 find no rows. One H100 (`scripts/flags_ab.py`, three rounds in one
# process, 2026-12-07): an AR token 286.9 / 287.1 / 287.4 -> 290.6 / 290.3 / 290.2 tok/s. (The nineteenth session's
# two rounds, 276.1 and 261.3, were too far apart to decide.) A canvas has 2048 assignments: its steps are unchanged.
DIRECT_MAX_ASSIGNMENTS = 32


def _block_m(assignments: int, num_experts: int) -> int:
    """Rows per tile: about twice the mean tokens per expert, so most experts take one pass over their weights."""
    return max(16, min(64, triton.next_power_of_2(max(1, 2 * assignments // num_experts))))


def _fit(tile: dict, n: int, k: int) -> dict:
    """Shrink the tile to tiny test shapes (tl.dot needs every dimension >= 16)."""
    out = dict(tile)
    out["BLOCK_N"] = max(16, min(out["BLOCK_N"], triton.next_power_of_2(n)))
    out["BLOCK_K"] = max(16, min(out["BLOCK_K"], triton.next_power_of_2(k)))
    return out


def _with_tail(tile: dict) -> dict:
    """A tail pass only where it is shorter than the tile's passes (and at least the 16 rows tl.dot needs)."""
    tail = tile["TAIL_M"]
    return dict(tile, TAIL_M=tail if 16 <= tail < tile["BLOCK_M"] else 0)


def _grouped_rows(
    x: torch.Tensor,  # [N, H]
    experts: torch.Tensor,  # [N, K]
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    gate_up_scale: torch.Tensor,  # [E, 2I] float32 (read only if `scaled`)
    down_scale: torch.Tensor,  # [E, H] float32
    scaled: bool,
    tile_gate_up: dict | None,
    tile_down: dict | None,
) -> torch.Tensor:
    """Each token's K expert outputs, unsummed: [N * K, H] token-major (shapes checked by `fused_moe_triton`)."""
    hidden, num_experts, inter = x.shape[1], gate_up.shape[0], gate_up.shape[1] // 2
    assignments, k = experts.numel(), experts.shape[1]
    direct = assignments <= DIRECT_MAX_ASSIGNMENTS
    flat_experts = experts.reshape(-1).contiguous()  # [N*K] token-major
    if direct:  # one program per assignment, rows token-major: no grouping kernel
        order = token_of = ends = flat_experts  # unread
        programs, block_m = assignments, 16
    else:
        order, token_of, ends = group_by_expert_triton(experts, num_experts)  # ends: [E] group ends, on the device
        programs, block_m = num_experts, _block_m(assignments, num_experts)

    hidden_act = torch.empty((assignments, inter), dtype=x.dtype, device=x.device)  # expert-sorted (direct: by token)
    default_gate_up, default_down = tiles_for(assignments, num_experts, fp8=gate_up.element_size() == 1,
                                              direct=direct)
    # A tile may fix its rows per pass and programs per expert (tile sweeps); otherwise they follow the load.
    w1, w2 = gate_up.view(-1, hidden), down.view(-1, inter)  # the TMA views: [E * 2I, H], [E * H, I]
    t1 = _with_tail({"BLOCK_M": block_m, "M_SPLITS": 1, "SWAP_AB": False, "TAIL_M": 0, "TMA": False,
                     **_fit(tile_gate_up or default_gate_up, inter, hidden)})
    t1["TMA"] = t1["TMA"] and _tma_readable(w1)
    launch(_gate_up_kernel, lambda t: (t["M_SPLITS"], programs, triton.cdiv(inter, t["BLOCK_N"])), t1, TILE_BLOCKS,
           x, gate_up, gate_up_scale, token_of, ends, flat_experts, hidden_act, hidden, inter, k,
           per_tile=lambda t: {"w_desc": _box(w1, t["BLOCK_N"], t["BLOCK_K"], t["TMA"])},
           SCALED=scaled, DIRECT=direct, EVEN_N=inter % t1["BLOCK_N"] == 0, EVEN_K=hidden % t1["BLOCK_K"] == 0,
           **pdl_options(x.device, len(x)))
    out = torch.empty((assignments, hidden), dtype=x.dtype, device=x.device)  # token-major
    t2 = _with_tail({"BLOCK_M": block_m, "M_SPLITS": 1, "SWAP_AB": False, "TAIL_M": 0, "TMA": False,
                     **_fit(tile_down or default_down, hidden, inter)})
    t2["TMA"] = t2["TMA"] and _tma_readable(w2, hidden_act)

    def down_boxes(t: dict) -> dict:  # the down tile's descriptors: its weights, its rows, its tail's rows
        return {"w_desc": _box(w2, t["BLOCK_N"], t["BLOCK_K"], t["TMA"]),
                "a_desc": _box(hidden_act, t["BLOCK_M"], t["BLOCK_K"], t["TMA"]),
                "a_tail_desc": _box(hidden_act, t["TAIL_M"], t["BLOCK_K"], t["TMA"] and t["TAIL_M"] > 0)}

    launch(_down_kernel, lambda t: (t["M_SPLITS"], programs, triton.cdiv(hidden, t["BLOCK_N"])), t2, TILE_BLOCKS,
           hidden_act, down, down_scale, order, ends, flat_experts, out, hidden, inter, per_tile=down_boxes,
           SCALED=scaled, DIRECT=direct, EVEN_N=hidden % t2["BLOCK_N"] == 0, EVEN_K=inter % t2["BLOCK_K"] == 0,
           **pdl_options(x.device, len(x)))
    return out


def _tma_readable(*views: torch.Tensor) -> bool:
    """Whether the tensor-memory accelerator can read these row-major 2-D views: a Hopper GPU (or the interpreter,
    on a CPU), 16-byte aligned starts and rows. Where it cannot, the kernels load with pointers: the same products."""
    return all((v.device.type != "cuda" or hopper_or_later(v.device)) and v.numel() > 0 and v.data_ptr() % 16 == 0
               and v.stride(0) * v.element_size() % 16 == 0 for v in views)


def _box(view: torch.Tensor, rows: int, cols: int, on: bool) -> TensorDescriptor | None:
    """A descriptor that reads `view` [R, C] in boxes of [rows, cols] (zeros past its edges); None where `on` is
    false (the kernel then loads with pointers, or takes no tail pass)."""
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, cols]) if on else None


def fused_moe_triton(
    x: torch.Tensor,  # [N, H] expert input
    weights: torch.Tensor,  # [N, K] routing weights (float32)
    experts: torch.Tensor,  # [N, K] expert ids
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    tile_gate_up: dict | None = None,
    tile_down: dict | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # FP8 weights: per-row scales [E, 2I] and [E, H]
    combine: bool = True,
) -> torch.Tensor:
    """Same result as `dgemma.model.moe.experts_grouped` (within bf16 rounding): [N, H] in x's dtype. With
    `scales`, gate_up and down are `dgemma.model.fp8` weights (float8 e4m3, or any float dtype) times those scales.
    Without `combine`, each token's K expert rows unsummed, token-major: [N * K, H] (a caller that sums them itself,
    as `dgemma.kernels.residual_norms.layer_output_triton` can)."""
    n_tokens, hidden = x.shape
    num_experts, two_i, h2 = gate_up.shape
    inter = two_i // 2
    if h2 != hidden or down.shape != (num_experts, hidden, inter) or two_i % 2:
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}")
    if weights.shape != experts.shape or experts.shape[0] != n_tokens:
        raise ValueError(f"fused_moe routing must be [{n_tokens}, K], got {tuple(weights.shape)}, "
                         f"{tuple(experts.shape)}")
    if scales is None and not (x.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"fused_moe needs one dtype, got x {x.dtype}, gate_up {gate_up.dtype}, down {down.dtype}")
    if scales is not None and (scales[0].shape != (num_experts, two_i) or scales[1].shape != (num_experts, hidden)
                               or gate_up.dtype != down.dtype):
        raise ValueError(f"fused_moe FP8 scales must be [{num_experts}, {two_i}] and [{num_experts}, {hidden}] for "
                         f"weights of one dtype, got {[tuple(s.shape) for s in scales]}, {gate_up.dtype}, {down.dtype}")
    if not (x.is_contiguous() and gate_up.is_contiguous() and down.is_contiguous()):
        raise ValueError("fused_moe needs contiguous x, gate_up and down")
    scaled = scales is not None
    gate_up_scale, down_scale = (s.float().contiguous() for s in scales) if scaled else (gate_up, down)  # unread
    out = _grouped_rows(x, experts, gate_up, down, gate_up_scale, down_scale, scaled, tile_gate_up, tile_down)
    if not combine:
        return out
    return combine_triton(out, weights)  # deterministic, float32 accumulation (as `combine` on CUDA)
