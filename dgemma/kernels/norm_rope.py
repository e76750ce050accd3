"""RMSNorm (with weight) followed by half-split RoPE, as one Triton kernel for the attention queries and keys
(and the weightless norm alone for the values).

The eager form is the norm kernel plus ~6 elementwise kernels for the rotation (slice, negate, cat, two
products, sum) per tensor; at batch 1 the step spends more time launching them than computing. Math: the
normalised value is rounded to the activation dtype (as the eager norm returns it), then rotated in float32
and rounded once: within bf16 rounding of `apply_rope(rms_norm(x, w), cos, sin)`.

`qkv_norm_rope_triton` runs a layer's three (queries, keys, values) as one launch that also computes the rotation's
angles (`dgemma.model.attention.FUSED_QKV_NORM` says where, and what it gained with programmatic dependent launch
and without).

Measured (scripts/moe_kernel_sweep.py, H200, 256 tokens, eager timings include launch gaps): 8.2 us vs 155 us for
16 heads of 256; 8.6 vs 132 us for 16 heads of 512. `dgemma.model.layers.norm_rope` decides when it runs.

The Triton interpreter (TRITON_INTERPRET=1) rounds float32 -> bfloat16 by truncation, not to nearest: on a CPU
its bfloat16 results are up to twice as far off as on a GPU; float16 and float32 match.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dgemma.kernels.launch import pdl_options, wait_for_inputs
from dgemma.kernels.tanh import INTERPRETED


@triton.jit
def _norm_rope_row(src, dst, w_ptr, c_lo, c_hi, s_lo, s_hi, eps, D: tl.constexpr, HALF: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr):
    # One head of one token: D values at src -> normalised (and rotated by cos c, sin s, float32 [HALF] per half)
    # at dst.
    lo = tl.arange(0, HALF)
    x_lo = tl.load(src + lo).to(tl.float32)
    x_hi = tl.load(src + HALF + lo).to(tl.float32)
    inv = 1.0 / tl.sqrt((tl.sum(x_lo * x_lo, 0) + tl.sum(x_hi * x_hi, 0)) / D + eps)
    dtype = dst.dtype.element_ty
    y_lo = x_lo * inv
    y_hi = x_hi * inv
    if HAS_WEIGHT:
        y_lo = y_lo * tl.load(w_ptr + lo).to(tl.float32)
        y_hi = y_hi * tl.load(w_ptr + HALF + lo).to(tl.float32)
    if ROPE:
        y_lo = y_lo.to(dtype).to(tl.float32)
        y_hi = y_hi.to(dtype).to(tl.float32)
        y_lo, y_hi = y_lo * c_lo - y_hi * s_lo, y_hi * c_hi + y_lo * s_hi
    tl.store(dst + lo, y_lo.to(dtype))
    tl.store(dst + HALF + lo, y_hi.to(dtype))


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows_ptr, slots_ptr, heads, token_stride, tokens,
                      cache_row_stride, eps, D: tl.constexpr, HALF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      ROPE: tl.constexpr, TO_CACHE: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)  # one (token, head) row of D values
    token = row // heads
    head = row - token * heads
    src = x_ptr + token * token_stride + head * D  # a token's heads are contiguous
    if TO_CACHE:  # straight into the KV cache: [cache rows, slots, heads, D], at the token's row and slot
        cache_row = tl.load(rows_ptr + token // tokens)
        dst = out_ptr + cache_row * cache_row_stride + (tl.load(slots_ptr + token) * heads + head) * D
    else:
        dst = out_ptr + row * D
    lo = tl.arange(0, HALF)
    c_lo = tl.zeros((HALF,), dtype=tl.float32)  # unused without ROPE
    c_hi, s_lo, s_hi = c_lo, c_lo, c_lo
    if ROPE:
        c_lo = tl.load(cos_ptr + token * D + lo).to(tl.float32)
        c_hi = tl.load(cos_ptr + token * D + HALF + lo).to(tl.float32)
        s_lo = tl.load(sin_ptr + token * D + lo).to(tl.float32)
        s_hi = tl.load(sin_ptr + token * D + HALF + lo).to(tl.float32)
    _norm_rope_row(src, dst, w_ptr, c_lo, c_hi, s_lo, s_hi, eps, D, HALF, HAS_WEIGHT, ROPE)


@triton.jit
def rope_angles(inv_freq_ptr, pos_ptr, dtype: tl.constexpr, HALF: tl.constexpr, LIBDEVICE: tl.constexpr):
    """cos, sin [HALF] float32 of the position at pos_ptr, as `rope_cos_sin` computes its tables: the angle
    position * inv_freq in float32, its cos and sin (the CUDA math library's, which torch calls; LIBDEVICE off under
    the interpreter) rounded to the activation dtype. Both halves of a head rotate by the same angles."""
    angle = tl.load(inv_freq_ptr + tl.arange(0, HALF)) * tl.load(pos_ptr).to(tl.float32)  # [HALF]
    if LIBDEVICE:
        c, s = libdevice.cos(angle), libdevice.sin(angle)
    else:
        c, s = tl.cos(angle), tl.sin(angle)
    return c.to(dtype).to(tl.float32), s.to(dtype).to(tl.float32)


@triton.jit
def _qkv_norm_rope_kernel(q_ptr, k_ptr, v_ptr, q_stride, k_stride, v_stride, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr,
                          q_out_ptr, keys_ptr, values_ptr, rows_ptr, slots_ptr, HQ, HKV, tokens, cache_row_stride,
                          eps, D: tl.constexpr, HALF: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # [0, HQ): a query head; [HQ, HQ + HKV): a key head; then a value head
    c, s = rope_angles(inv_freq_ptr, pos_ptr + token, q_out_ptr.dtype.element_ty, HALF, LIBDEVICE)
    if head < HQ:
        _norm_rope_row(q_ptr + token * q_stride + head * D, q_out_ptr + (token * HQ + head) * D, qw_ptr, c, c, s, s,
                        eps, D, HALF, True, True)
    else:
        cache_row = tl.load(rows_ptr + token // tokens)
        slot = tl.load(slots_ptr + token)
        if head < HQ + HKV:
            kv = head - HQ
            at = cache_row * cache_row_stride + (slot * HKV + kv) * D
            _norm_rope_row(k_ptr + token * k_stride + kv * D, keys_ptr + at, kw_ptr, c, c, s, s, eps, D, HALF, True,
                            True)
        else:
            kv = head - HQ - HKV
            at = cache_row * cache_row_stride + (slot * HKV + kv) * D
            _norm_rope_row(v_ptr + token * v_stride + kv * D, values_ptr + at, kw_ptr, c, c, s, s, eps, D, HALF,
                            False, False)


def _heads_in_place(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] as the kernels read it: itself where each token's heads are contiguous and tokens evenly
    spaced (a view of a packed projection), else a contiguous copy."""
    b, t, _, d = x.shape
    evenly_spaced = x.stride(3) == 1 and x.stride(2) == d and (b == 1 or x.stride(0) == t * x.stride(1))
    return x if evenly_spaced else x.contiguous()


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, eps: float,
                     into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """x: [B, T, heads, D]; weight: [D] or None; cos, sin: [B, T, D], or both None for the norm alone (the values)
    -> a new contiguous [B, T, heads, D]; or, with `into` = (cache [rows, slots, heads, D] in x's dtype, rows [B],
    slots [B, T]), written straight to cache[rows[b], slots[b, t]] (the K/V cache write, without an index kernel),
    returning None.

    x may be a view of a wider projection output (the q, k and v of one packed GEMM): each token's heads must be
    contiguous, tokens evenly spaced; it is read in place."""
    if x.dim() != 4:
        raise ValueError(f"norm_rope expects x [B, T, heads, D], got {tuple(x.shape)}")
    b, t, heads, d = x.shape
    if d % 2 or d & (d - 1):
        raise ValueError(f"norm_rope needs a power-of-two head_dim, got {d}")
    if weight is not None and (weight.shape != (d,) or weight.device != x.device):
        raise ValueError(f"norm_rope weight must be [{d}] on {x.device}, got {tuple(weight.shape)}")
    rope = cos is not None
    if rope != (sin is not None):
        raise ValueError("norm_rope takes cos and sin together, or neither")
    if rope:
        if cos.shape != (b, t, d) or sin.shape != (b, t, d):
            raise ValueError(f"norm_rope cos/sin must be [{b}, {t}, {d}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        if cos.dtype != x.dtype or sin.dtype != x.dtype:
            raise ValueError(f"norm_rope cos/sin must be {x.dtype}, got {cos.dtype}, {sin.dtype}")
        if not (cos.device == x.device and sin.device == x.device):
            raise ValueError("norm_rope tensors must all be on one device (CUDA, or CPU under TRITON_INTERPRET=1)")
        cos, sin = cos.contiguous(), sin.contiguous()
    x = _heads_in_place(x)
    if into is None:
        out = torch.empty((b, t, heads, d), dtype=x.dtype, device=x.device)
        rows = slots = x  # unused
    else:
        out, rows, slots = into
        if (out.dim() != 4 or out.shape[2:] != (heads, d) or out.dtype != x.dtype or not out.is_contiguous()
                or rows.shape != (b,) or slots.shape != (b, t)):
            raise ValueError(f"norm_rope: cache {tuple(out.shape)} {out.dtype}, rows {tuple(rows.shape)} and slots "
                             f"{tuple(slots.shape)} do not fit x {tuple(x.shape)} {x.dtype}")
        slots = slots.contiguous()
    _norm_rope_kernel[(b * t * heads,)](x, weight if weight is not None else x, cos if rope else x,
                                        sin if rope else x, out, rows, slots, heads, x.stride(1), t,
                                        out.stride(0), eps, D=d, HALF=d // 2, HAS_WEIGHT=weight is not None,
                                        ROPE=rope, TO_CACHE=into is not None, num_warps=2 if d <= 256 else 4,
                                        **pdl_options(x.device, b * t))
    return out if into is None else None


def qkv_norm_rope_triton(q_raw: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor, q_weight: torch.Tensor,
                         k_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, eps: float,
                         cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """An attention layer's three norms as one launch: the queries normalised and rotated into a new [B, T, Hq, D];
    the keys normalised and rotated, the values normalised (no weight), both written straight into the cache.

    q_raw [B, T, Hq, D], k_raw and v_raw [B, T, Hkv, D] (views of one packed projection, read in place; v_raw may be
    k_raw: k-as-v); positions [B, T] and inv_freq [D / 2] float32 (the rotation: `rope_cos_sin`'s tables, computed
    in the kernel); cache = (keys, values [rows, slots, Hkv, D] in q_raw's dtype, rows [B], slots [B, T]). The same
    rows as `norm_rope_triton` three times: one kernel instead of three (two of them on a side stream), so a decoded
    token's attention waits on one short kernel, and no cos/sin tables (~14 small kernels a forward)."""
    keys, values, rows, slots = cache
    b, t, hq, d = q_raw.shape
    hkv = k_raw.shape[2]
    if (k_raw.shape != (b, t, hkv, d) or v_raw.shape != k_raw.shape or q_weight.shape != (d,)
            or k_weight.shape != (d,) or positions.shape != (b, t) or inv_freq.shape != (d // 2,)
            or inv_freq.dtype != torch.float32):
        raise ValueError(f"qkv_norm_rope: q {tuple(q_raw.shape)}, k {tuple(k_raw.shape)}, v {tuple(v_raw.shape)}, "
                         f"weights {tuple(q_weight.shape)} {tuple(k_weight.shape)}, positions {tuple(positions.shape)}"
                         f", inv_freq {tuple(inv_freq.shape)} {inv_freq.dtype} do not fit")
    if d % 2 or d & (d - 1):
        raise ValueError(f"qkv_norm_rope needs a power-of-two head_dim, got {d}")
    if (keys.shape[2:] != (hkv, d) or values.shape != keys.shape or keys.dtype != q_raw.dtype
            or values.dtype != q_raw.dtype or not (keys.is_contiguous() and values.is_contiguous())
            or rows.shape != (b,) or slots.shape != (b, t)):
        raise ValueError(f"qkv_norm_rope: cache {tuple(keys.shape)} {keys.dtype}, rows {tuple(rows.shape)} and slots "
                         f"{tuple(slots.shape)} do not fit q {tuple(q_raw.shape)} {q_raw.dtype}")
    q_raw, k_raw, v_raw = (_heads_in_place(x) for x in (q_raw, k_raw, v_raw))
    q = torch.empty((b, t, hq, d), dtype=q_raw.dtype, device=q_raw.device)
    _qkv_norm_rope_kernel[(b * t, hq + 2 * hkv)](
        q_raw, k_raw, v_raw, q_raw.stride(1), k_raw.stride(1), v_raw.stride(1), q_weight, k_weight,
        positions.contiguous(), inv_freq, q, keys, values, rows, slots.contiguous(), hq, hkv, t, keys.stride(0), eps,
        D=d, HALF=d // 2, LIBDEVICE=not INTERPRETED, num_warps=2 if d <= 256 else 4, **pdl_options(q_raw.device, b * t))
    return q
