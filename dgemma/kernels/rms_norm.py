"""RMSNorm as one Triton kernel (float32 math, optional weight, output in the input dtype).

The eager form is ~7 kernels per norm and a layer has 10 norms: at small batch the GPU spends more time
starting these kernels than computing them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.launch import pdl_options, wait_for_inputs


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_out, eps, HAS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
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
        **pdl_options(x.device, flat.shape[0]),
    )
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------------
# Training: the same norm with a backward, so a step runs 2 kernels per norm instead of ~20.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, N, D, ROWS_PER_PROGRAM,
                         BLOCK: tl.constexpr):
    # Each program takes a run of rows and keeps its share of the weight gradient in registers: one partial sum
    # per program ([programs, D] float32), added up by the caller, instead of an atomic per row.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = first + i
        if row < N:
            offset = row.to(tl.int64) * D
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            g = dy * w
            # d/dx of x * rstd(x) * w: rstd * (g - xhat * mean(g * xhat))
            dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / D))
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=mask)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        flat = x.reshape(-1, d).contiguous()  # [N, D]
        out = torch.empty_like(flat)
        rstd = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)  # [N]
        block = triton.next_power_of_2(d)
        _rms_norm_fwd_kernel[(flat.shape[0],)](flat, weight, out, rstd, d, eps, BLOCK=block,
                                               num_warps=4 if block <= 1024 else 8)
        ctx.save_for_backward(flat, weight, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        flat, weight, rstd = ctx.saved_tensors
        n, d = flat.shape
        dy = dy.reshape(n, d).contiguous()  # [N, D]
        dx = torch.empty_like(flat)
        programs = max(1, min(n, 4 * _multiprocessors(flat.device)))
        rows_per_program = -(-n // programs)
        programs = -(-n // rows_per_program)
        dw_partial = torch.empty((programs, d), dtype=torch.float32, device=flat.device)  # [programs, D]
        block = triton.next_power_of_2(d)
        _rms_norm_bwd_kernel[(programs,)](flat, weight, dy, rstd, dx, dw_partial, n, d, rows_per_program,
                                          BLOCK=block, num_warps=4 if block <= 1024 else 8)
        return dx.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the Triton interpreter on a CPU (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm_train_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with weight and a fused backward: x [..., D] -> same shape and dtype (float32 math inside)."""
    return _RMSNormFunction.apply(x, weight, eps)
