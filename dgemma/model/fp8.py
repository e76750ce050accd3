"""FP8 expert weights: the routed experts stored as float8 (e4m3) with one float32 scale per output row.

At a batch-1 denoising step the experts are 45.7 of the 50.5 GB that every step reads, and the step is bound by
that read (docs/benchmarks.md). Storing them in one byte halves it. Only the weights are quantized: activations
stay in the model's dtype, and the fused MoE kernel widens each weight tile to that dtype before its matrix product
and applies the row scales to the float32 sums (`dgemma.kernels.fused_moe`). Attention, the dense MLP and the LM head
keep the checkpoint's precision.

A row's scale maps its largest magnitude to 448, the largest e4m3 number, so no weight saturates. e4m3 keeps 3
mantissa bits: each weight is within 2^-4 of itself, and near zero (subnormals, spaced 2^-9 apart) within 2^-10
times the row's scale.

The checkpoint layout does not change (the parameters keep their names and shapes; the scales are buffers that
are not saved), and every path computes the same function: the fused kernel where it runs, otherwise the weights
dequantized per call (CPU, and calls too large for the kernel).
"""

from __future__ import annotations

import functools

import torch

from dgemma.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn number
QUANTIZATIONS = ("fp8",)  # what `quantization=` accepts (None: the checkpoint's precision)


@functools.lru_cache(maxsize=None)
def fp8_kernel_supported(device: torch.device) -> bool:
    """Whether Triton can widen float8 e4m3 tiles on this device: compute capability 8.9 (Ada, Hopper) and later.
    CPUs can, through the interpreter (and their torch path dequantizes anyway)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def check_quantization(quantization: str | None, device: torch.device | None = None) -> str | None:
    """None or one of QUANTIZATIONS, with a specific error for anything else, or for a GPU whose fused kernels cannot
    read FP8 (every step would then widen all the experts' weights again: slower than not quantizing)."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {list(QUANTIZATIONS)} or none, got {quantization!r}")
    if device is not None and not fp8_kernel_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"quantization 'fp8' needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device)} is {major}.{minor}: run it without quantization")
    return quantization


@torch.no_grad()
def quantize_rows(w: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, out, in] -> (w8 [E, out, in] float8_e4m3fn, scale [E, out] float32) with w ~ w8 * scale[..., None].

    Converted `chunk` experts at a time, so the float32 temporary stays small next to a full-size layer."""
    if w.dim() != 3:
        raise ValueError(f"quantize_rows expects [experts, out, in], got {tuple(w.shape)}")
    w8 = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], chunk):
        block = w[start : start + chunk].float()  # [e, out, in]
        amax = block.abs().amax(dim=-1)  # [e, out]
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row keeps scale 1
        # Rounding w / s can land a hair above 448, which e4m3fn (no infinity) would turn into NaN: clamp first.
        w8[start : start + chunk] = (block / s[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        scale[start : start + chunk] = s
    return w8, scale


def dequantize_rows(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, in] weights in `dtype` from `quantize_rows`' output (the product rounded once, in float32)."""
    return (w8.float() * scale[..., None]).to(dtype)
