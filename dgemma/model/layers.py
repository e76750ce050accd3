"""Small building blocks: RMSNorm, the gated GELU MLP and rotary position embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import AttentionSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in float32, scaled by the plain weight (not 1 + weight), cast back to the input dtype."""
    # Under torch.compile (training) the plain formula below: Inductor fuses it into the ops around it, which an
    # opaque Triton call would stop.
    if x.is_cuda and not torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            from dgemma.kernels.rms_norm import rms_norm_triton  # one kernel instead of seven

            return rms_norm_triton(x, weight, eps)
        if weight is not None:
            # Training: a fused forward and backward (2 kernels instead of ~20, and one float32 pass over the
            # activations instead of several): norms are most of a small model's training step on a GPU.
            from dgemma.kernels.rms_norm import rms_norm_train_triton

            return rms_norm_train_triton(x, weight, eps)
    x32 = x.float()
    # pow(-0.5) rather than rsqrt: it is what the reference computes, so float32 results agree bit for bit.
    out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# Inference products of at most this many rows (autoregressive tokens) run as `dgemma.kernels.gemv` on a kernel
# device; 0: always F.linear. `python scripts/flags_ab.py`, one H100, one process, two rounds (2026-12-07): AR at
# batch 1 236.1 / 237.2 -> 241.8 / 241.7 tok/s without PDL, 248.5 / 247.9 -> 256.7 / 256.9 with it.
GEMV_MAX_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, kernel_devices: tuple[str, ...] = ("cuda",)) -> torch.Tensor:
    """F.linear(x, weight) without bias: x [..., K], weight [N, K] -> [..., N]; a few rows in inference go through
    the few-row kernel (`use_gemv`)."""
    if use_gemv(x, weight, kernel_devices):
        from dgemma.kernels.gemv import gemv_triton  # Triton: imported only where it runs

        return gemv_triton(x, weight)
    return F.linear(x, weight)


def use_gemv(x: torch.Tensor, weight: torch.Tensor, kernel_devices: tuple[str, ...]) -> bool:
    """Whether `linear` runs `gemv_triton`: at most GEMV_MAX_ROWS rows, inference in a float dtype shared with a
    contiguous weight, on a kernel device. Shapes, dtypes and flags only: a captured graph keeps the choice."""
    return (x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
            and x.device.type in kernel_devices
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == x.dtype
            and weight.is_contiguous()
            and not torch.is_grad_enabled())


def pack_linears(linears: list[nn.Linear]) -> torch.Tensor:
    """Inference: the weights of linears that read the same input, concatenated into one [sum(out), in] tensor that
    each linear's weight then views (no second copy). One GEMM over it replaces one per linear: fewer launches, and
    at small batches a larger weight read streams closer to memory bandwidth."""
    packed = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(packed[start : start + rows], requires_grad=linear.weight.requires_grad)
        start += rows
    return packed


def still_packed(packed: torch.Tensor | None, linears: list[nn.Linear]) -> bool:
    """Whether every linear's weight is still its view of `packed`: replacing a weight (loading, `.to()`) ends the
    packing, and the linears then run one by one. Pointers only: no device work, so a captured graph keeps it."""
    if packed is None or torch.is_grad_enabled():  # packed weights serve inference: no gradient reaches them
        return False
    offset = packed.data_ptr()
    for linear in linears:
        w = linear.weight
        if w.dtype != packed.dtype or w.device != packed.device or w.data_ptr() != offset:
            return False
        offset += w.numel() * w.element_size()
    return True


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): the dense MLP of every layer and the self-conditioning MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.packed: torch.Tensor | None = None  # [2I, H] gate and up, see `pack`
        self.kernel_devices: tuple[str, ...] = ("cuda",)  # device types that run `gelu_mul_triton`

    def pack(self) -> None:
        """Gate and up as one GEMM (inference; see `pack_linears`)."""
        self.packed = pack_linears([self.gate_proj, self.up_proj])

    def _apply(self, fn, recurse=True):
        self.packed = None  # a moved or cast weight is a new tensor: the packing ends
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., H]
        if still_packed(self.packed, [self.gate_proj, self.up_proj]):
            gate_up = linear(x, self.packed, self.kernel_devices)  # [..., 2I]
            if use_gelu_mul_kernel(gate_up, self.kernel_devices):
                from dgemma.kernels.gated_gelu import gelu_mul_triton  # Triton: imported only where it runs

                return linear(gelu_mul_triton(gate_up), self.down_proj.weight, self.kernel_devices)
            gate, up = gate_up.chunk(2, dim=-1)  # [..., I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return linear(F.gelu(gate, approximate="tanh") * up, self.down_proj.weight, self.kernel_devices)


def use_gelu_mul_kernel(gate_up: torch.Tensor, kernel_devices: tuple[str, ...]) -> bool:
    """Whether the packed MLP's activation runs as one kernel (`dgemma.kernels.gated_gelu`): inference in a float
    dtype on a kernel device. Device, dtype and grad mode only, so a captured CUDA graph keeps the choice."""
    return (gate_up.device.type in kernel_devices and gate_up.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not torch.is_grad_enabled())


def rope_inv_freq(spec: AttentionSpec) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for one layer type.

    Proportional RoPE rotates only the first `partial_rotary_factor` of the frequency pairs, with exponents
    divided by the full head_dim (not the rotated width); the other pairs get frequency 0, i.e. no rotation.
    For the default RoPE (factor 1) both rules give the usual theta^(-2i/d).
    """
    half = spec.head_dim // 2
    rotated = int(spec.partial_rotary_factor * spec.head_dim // 2)
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / spec.head_dim
    inv_freq = torch.zeros(half, dtype=torch.float32)
    inv_freq[:rotated] = 1.0 / (spec.rope_theta**exponents)
    return inv_freq


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [B, T, head_dim] for positions [B, T], computed in float32 then cast to the activation dtype."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class Rotation:
    """How one forward rotates its tokens on one layer type: their positions and the type's inverse frequencies.
    The cos/sin tables are built on first use (`tables`): the one-launch head norms of a GPU forward
    (`dgemma.kernels.norm_rope.qkv_norm_rope_triton`) compute the angles themselves and build none."""

    positions: torch.Tensor  # [B, T]
    inv_freq: torch.Tensor  # [D / 2] float32
    dtype: torch.dtype  # the tables' (the activations')
    _tables: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [B, T, D] each (`rope_cos_sin`), once per forward."""
        if self._tables is None:
            self._tables = rope_cos_sin(self.positions, self.inv_freq, self.dtype)
        return self._tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation. x: [B, T, heads, D]; cos, sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def use_fused_norm_rope(
    x: torch.Tensor,  # [B, T, heads, D]
    cos: torch.Tensor | None,  # [B, T, D], or None (the norm alone)
    sin: torch.Tensor | None,  # [B, T, D]
    kernel_devices: tuple[str, ...] = ("cuda",),
) -> bool:
    """Whether `norm_rope_triton` computes `norm_rope` for these tensors.

    The kernel has no backward (inference only), takes a power-of-two head_dim, and reads cos/sin in x's dtype
    (under autocast they may differ, and the eager path then returns the wider dtype). Decided from devices,
    dtypes, shapes and the grad mode only, so a captured CUDA graph keeps the choice. `kernel_devices`: as in
    `dgemma.model.moe.use_fused_moe` (a CPU runs Triton only under TRITON_INTERPRET=1).
    """
    d = x.shape[-1]
    return (
        x.device.type in kernel_devices
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and (cos is None or cos.dtype == x.dtype)
        and (sin is None or sin.dtype == x.dtype)
        and d & (d - 1) == 0
        and not torch.is_grad_enabled()
    )


def norm_rope(
    x: torch.Tensor,  # [B, T, heads, D]
    weight: torch.Tensor,  # [D]
    cos: torch.Tensor,  # [B, T, D]
    sin: torch.Tensor,  # [B, T, D]
    eps: float,
    kernel_devices: tuple[str, ...] = ("cuda",),
) -> torch.Tensor:
    """RMSNorm with weight, then half-split RoPE (the attention queries and keys): [B, T, heads, D].

    Proportional RoPE needs no special case: its non-rotating pairs have cos 1 and sin 0 in both halves.
    """
    if use_fused_norm_rope(x, cos, sin, kernel_devices):
        # One kernel instead of the norm's plus ~6 for the rotation.
        from dgemma.kernels.norm_rope import norm_rope_triton

        return norm_rope_triton(x, weight, cos, sin, eps)
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def norm_heads(x: torch.Tensor, eps: float, kernel_devices: tuple[str, ...] = ("cuda",)) -> torch.Tensor:
    """RMSNorm without weight over each head of x [B, T, heads, D] (the attention values): [B, T, heads, D]. x may be
    a view of a packed projection; the kernel reads it in place where the eager norm would copy it first."""
    if use_fused_norm_rope(x, None, None, kernel_devices):
        from dgemma.kernels.norm_rope import norm_rope_triton

        return norm_rope_triton(x, None, None, None, eps)
    return rms_norm(x, None, eps)
