"""gelu_tanh(gate) * up as one Triton kernel, over the packed gate|up output of the dense MLP.

Eagerly this is two kernels on strided halves (the GELU, then the product), each launched 30 times per forward:
at one token per forward (autoregressive decoding) they cost more than the 12 MB of the MLP's down projection.
Rounding follows the eager form: GELU in float32 rounded to the input dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.launch import pdl_options, wait_for_inputs
from dgemma.kernels.tanh import INTERPRETED, tanh


@triton.jit
def gelu_tanh(x, LIBDEVICE: tl.constexpr = False):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in float32; LIBDEVICE: see `dgemma.kernels.tanh`."""
    u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # torch's order of operations
    return 0.5 * x * (1.0 + tanh(u, LIBDEVICE))


@triton.jit
def _gelu_mul_kernel(x_ptr, out_ptr, I, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    h = gelu_tanh(gate, LIBDEVICE).to(dtype).to(tl.float32) * up
    tl.store(out_ptr + row * I + cols, h.to(dtype), mask=mask)


def gelu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate then up, rows contiguous) -> gelu_tanh(gate) * up [..., I], same dtype."""
    two_i = gate_up.shape[-1]
    if two_i % 2 or not gate_up.is_contiguous():
        raise ValueError(f"gelu_mul needs a contiguous [..., 2I] tensor, got {tuple(gate_up.shape)}")
    i = two_i // 2
    flat = gate_up.view(-1, two_i)
    out = torch.empty((flat.shape[0], i), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(i))
    _gelu_mul_kernel[(flat.shape[0], triton.cdiv(i, block))](flat, out, i, LIBDEVICE=not INTERPRETED, BLOCK=block,
                                                            **pdl_options(out.device, flat.shape[0]))
    return out.view(*gate_up.shape[:-1], i)
