"""tanh for the Triton kernels that must round like torch (the sampler's softcapping, the MLP's GELU).

On a GPU, LIBDEVICE selects the CUDA math library's tanhf, which torch calls: values later rounded to bf16 must
match torch's float32 bits, not just its value. The interpreter (CPU tests) has no libdevice; there, and wherever a
kernel keeps its exp-based rounding (the fused MoE's GELU), tanh(u) = 2 sigmoid(2u) - 1.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # pass LIBDEVICE=not INTERPRETED to match torch on a GPU


@triton.jit
def tanh(u, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(u)
    else:
        return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
