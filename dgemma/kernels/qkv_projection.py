"""A few decoded tokens' q/k/v projection with the head norms as per-head tails: one launch for what is otherwise
the projection and three norm kernels (two of them on the side stream, joined before attention).

The projection is `dgemma.kernels.gemv`'s (BLOCK_N output rows a program, so a head of D rows is D / BLOCK_N
programs). Each head has a counter (`dgemma.kernels.last_program`): the last of its programs to finish normalises
the head for every token as `dgemma.kernels.norm_rope` does, computing the rotation's angles as
`qkv_norm_rope_triton` does (so no cos/sin tables): queries normalised and rotated into a new tensor, keys
normalised and rotated into the cache, values normalised into the cache (on full layers the values are the raw
keys, k-as-v, so a key head's tail writes both). The same roundings as the three kernels: the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.gemv import gemv_launch, gemv_rows
from dgemma.kernels.last_program import last_program
from dgemma.kernels.norm_rope import check_cache_write, norm_rope_row, rope_angles
from dgemma.kernels.tanh import INTERPRETED


@triton.jit
def _qkv_projection_kernel(x_ptr, w_ptr, raw_ptr, counters_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, q_out_ptr,
                           keys_ptr, values_ptr, rows_ptr, slots_ptr, N, K, stride_x, HQ, HKV, tokens,
                           cache_row_stride, eps, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr, PRELOAD: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                           K_AS_V: tl.constexpr, LIBDEVICE: tl.constexpr):
    gemv_rows(x_ptr, w_ptr, raw_ptr, N, K, stride_x, N, M, BLOCK_N, BLOCK_K, PDL, PRELOAD)  # raw [M, N]
    head = (tl.program_id(0) * BLOCK_N) // D  # [0, HQ) queries, [HQ, HQ + HKV) keys, then values (none: K_AS_V)
    if last_program(counters_ptr + head, D // BLOCK_N):
        for m in tl.static_range(M):
            c, s = rope_angles(inv_freq_ptr, pos_ptr + m, q_out_ptr.dtype.element_ty, HALF, LIBDEVICE)
            src = raw_ptr + m * N + head * D
            if head < HQ:
                norm_rope_row(src, q_out_ptr + (m * HQ + head) * D, qw_ptr, c, c, s, s, eps, D, HALF, True, True)
            else:
                cache_row = tl.load(rows_ptr + m // tokens).to(tl.int64)
                slot = tl.load(slots_ptr + m).to(tl.int64)
                if head < HQ + HKV:
                    at = cache_row * cache_row_stride + (slot * HKV + head - HQ) * D
                    norm_rope_row(src, keys_ptr + at, kw_ptr, c, c, s, s, eps, D, HALF, True, True)
                    if K_AS_V:
                        norm_rope_row(src, values_ptr + at, kw_ptr, c, c, s, s, eps, D, HALF, False, False)
                else:
                    at = cache_row * cache_row_stride + (slot * HKV + head - HQ - HKV) * D
                    norm_rope_row(src, values_ptr + at, kw_ptr, c, c, s, s, eps, D, HALF, False, False)


def qkv_projection_triton(
    x: torch.Tensor,  # [B, T, H] a few tokens (`dgemma.kernels.gemv`'s rows)
    packed: torch.Tensor,  # [(Hq + Hkv (+ Hkv)) * D, H] the packed q/k(/v) projection; no v rows: k-as-v
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    positions: torch.Tensor,  # [B, T]
    inv_freq: torch.Tensor,  # [D / 2] float32
    eps: float,
    heads: tuple[int, int],  # (Hq, Hkv)
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],  # keys, values, rows [B], slots [B, T]
    counters: torch.Tensor,  # [Hq + 2 Hkv] int32, zero: this call site's
) -> torch.Tensor:
    """The queries normalised and rotated, [B, T, Hq, D]; the keys and values normalised (the keys rotated) into the
    cache at cache[rows[b], slots[b, t]]: `norm_rope_triton` over the three parts of `gemv_triton(x, packed)`."""
    keys, values, rows, slots = cache
    b, t, _ = x.shape
    hq, hkv = heads
    d = keys.shape[-1]
    k_as_v = packed.shape[0] == (hq + hkv) * d
    if (not k_as_v and packed.shape[0] != (hq + 2 * hkv) * d) or d & (d - 1) or d < 2:
        raise ValueError(f"qkv_projection: packed {tuple(packed.shape)} is not ({hq} + {hkv} (+ {hkv})) heads of {d}")
    check_cache_write("qkv_projection", cache, b, t, hkv, d, x.dtype, f"x {tuple(x.shape)} {x.dtype}")
    if (q_weight.shape != (d,) or k_weight.shape != (d,) or positions.shape != (b, t)
            or inv_freq.shape != (d // 2,) or inv_freq.dtype != torch.float32):
        raise ValueError(f"qkv_projection: norm weights {tuple(q_weight.shape)} {tuple(k_weight.shape)}, positions "
                         f"{tuple(positions.shape)}, inv_freq {tuple(inv_freq.shape)} {inv_freq.dtype} do not fit")
    if counters.shape != (hq + 2 * hkv,) or counters.dtype != torch.int32:
        raise ValueError(f"qkv_projection: counters must be int32 [{hq + 2 * hkv}], got {tuple(counters.shape)} "
                         f"{counters.dtype}")
    flat, raw, grid, options = gemv_launch(x, packed)  # [B * T, H], [B * T, N]
    if d % options["BLOCK_N"]:
        raise ValueError(f"qkv_projection: head_dim {d} is not a multiple of the product's {options['BLOCK_N']} rows")
    q = torch.empty((b, t, hq, d), dtype=x.dtype, device=x.device)
    _qkv_projection_kernel[grid](flat, packed, raw, counters, q_weight, k_weight, positions.contiguous(), inv_freq,
                                 q, keys, values, rows, slots.contiguous(), packed.shape[0], flat.shape[1],
                                 flat.stride(0), hq, hkv, t, keys.stride(0), eps, D=d, HALF=d // 2, K_AS_V=k_as_v,
                                 LIBDEVICE=not INTERPRETED, **options)
    return q
