"""RMSNorm (with weight) followed by half-split RoPE, as one Triton kernel for the attention queries and keys.

The eager form is the norm kernel plus ~6 elementwise kernels for the rotation (slice, negate, cat, two
products, sum) per tensor; at batch 1 the step spends more time launching them than computing. Math: the
normalised value is rounded to the activation dtype (as the eager norm returns it), then rotated in float32
and rounded once: within bf16 rounding of `apply_rope(rms_norm(x, w), cos, sin)`.

Measured (scripts/moe_kernel_sweep.py, H200, 256 tokens, eager timings include launch gaps): 8.2 us vs 155 us for
16 heads of 256; 8.6 vs 132 us for 16 heads of 512. `dgemma.model.layers.norm_rope` decides when it runs.

The Triton interpreter (TRITON_INTERPRET=1) rounds float32 -> bfloat16 by truncation, not to nearest: on a CPU
its bfloat16 results are up to twice as far off as on a GPU; float16 and float32 match.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, eps, D: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (token, head) row of D values
    token = row // heads
    lo = tl.arange(0, HALF)
    x_lo = tl.load(x_ptr + row * D + lo).to(tl.float32)
    x_hi = tl.load(x_ptr + row * D + HALF + lo).to(tl.float32)
    inv = 1.0 / tl.sqrt((tl.sum(x_lo * x_lo, 0) + tl.sum(x_hi * x_hi, 0)) / D + eps)
    dtype = out_ptr.dtype.element_ty
    y_lo = (x_lo * inv * tl.load(w_ptr + lo).to(tl.float32)).to(dtype).to(tl.float32)
    y_hi = (x_hi * inv * tl.load(w_ptr + HALF + lo).to(tl.float32)).to(dtype).to(tl.float32)
    c_lo = tl.load(cos_ptr + token * D + lo).to(tl.float32)
    c_hi = tl.load(cos_ptr + token * D + HALF + lo).to(tl.float32)
    s_lo = tl.load(sin_ptr + token * D + lo).to(tl.float32)
    s_hi = tl.load(sin_ptr + token * D + HALF + lo).to(tl.float32)
    tl.store(out_ptr + row * D + lo, (y_lo * c_lo - y_hi * s_lo).to(dtype))
    tl.store(out_ptr + row * D + HALF + lo, (y_hi * c_hi + y_lo * s_hi).to(dtype))


def norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """x: [B, T, heads, D] (last three dims contiguous); weight: [D]; cos, sin: [B, T, D] -> [B, T, heads, D]."""
    if x.dim() != 4:
        raise ValueError(f"norm_rope expects x [B, T, heads, D], got {tuple(x.shape)}")
    b, t, heads, d = x.shape
    if d % 2 or d & (d - 1):
        raise ValueError(f"norm_rope needs a power-of-two head_dim, got {d}")
    if weight.shape != (d,):
        raise ValueError(f"norm_rope weight must be [{d}], got {tuple(weight.shape)}")
    if cos.shape != (b, t, d) or sin.shape != (b, t, d):
        raise ValueError(f"norm_rope cos/sin must be [{b}, {t}, {d}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"norm_rope cos/sin must be {x.dtype}, got {cos.dtype}, {sin.dtype}")
    if not (weight.device == x.device and cos.device == x.device and sin.device == x.device):
        raise ValueError("norm_rope tensors must all be on one device (CUDA, or CPU under TRITON_INTERPRET=1)")
    x = x.contiguous()  # a view of a projection output: already contiguous, so no copy
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    _norm_rope_kernel[(b * t * heads,)](x, weight, cos, sin, out, heads, eps, D=d, HALF=d // 2,
                                        num_warps=2 if d <= 256 else 4)
    return out
