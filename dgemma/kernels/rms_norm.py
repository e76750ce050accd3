"""RMSNorm as one Triton kernel (float32 math, optional weight, output in the input dtype).

The eager form is ~7 kernels per norm and a layer has 10 norms: at small batch the GPU spends more time
starting these kernels than computing them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_out, eps, HAS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    y = x * inv
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D] on CUDA -> same shape and dtype."""
    d = x.shape[-1]
    if weight is not None and (weight.shape != (d,) or weight.device != x.device):
        raise ValueError(f"rms_norm weight must be [{d}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    flat = x.reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty((flat.shape[0], d), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(flat.shape[0],)](
        flat, weight if weight is not None else flat, out, d, flat.stride(0), out.stride(0), eps,
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out.view(x.shape)
