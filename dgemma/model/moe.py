"""Mixture of experts: the router and the routed experts of every layer."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.fp8 import FP8, dequantize_rows, fp8_kernel_supported, quantize_rows
from dgemma.model.layers import linear, rms_norm


class Router(nn.Module):
    """Top-K routing on the raw residual: softmax over all experts, renormalised top-K, per-expert scale."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float,
                 kernel_devices: tuple[str, ...] = ("cuda",)):
        super().__init__()
        self.top_k = top_k
        self.eps = eps
        self.inv_sqrt_hidden = hidden_size**-0.5
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        self.kernel_devices = kernel_devices  # as in Experts

    def normalize(self, residual: torch.Tensor) -> torch.Tensor:
        """The router's input from the residual [..., H]: norm without weight, then its scale and H^-1/2.
        (`dgemma.kernels.residual_norms` computes the same inside the layer's fused norms.)"""
        return rms_norm(residual, None, self.eps) * self.scale * self.inv_sqrt_hidden

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: [N, H] from `normalize` -> weights [N, K] float32, expert ids [N, K]."""
        logits = linear(z, self.proj.weight, self.kernel_devices)  # [N, E]
        if z.device.type in self.kernel_devices and not torch.is_grad_enabled():
            from dgemma.kernels.routing import route_top_k  # one kernel instead of six

            return route_top_k(logits, self.per_expert_scale, self.top_k)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
        weights, experts = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # The same values as per_expert_scale[experts], but its backward scatters into distinct slots of each row
        # and then sums rows: an index's backward accumulates N*K gradients into E slots (25 of the 87 ms of device
        # time of a training step of the mini model on an H200).
        scale = self.per_expert_scale.expand(experts.shape[0], -1).gather(1, experts)  # [N, K]
        return weights * scale, experts


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token-expert assignments grouped by expert (stable: token order within an expert), with no host sync.

    experts: [N, K] -> order [N*K] (sorted slot -> token-major assignment index), token_of [N*K] (the token of each
    sorted slot), ends [E] int32 (one past each expert's last slot).
    """
    flat = experts.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)
    # bincount would size its output from the data (a host sync); scatter_add keeps a step capturable.
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, order // experts.shape[1], torch.cumsum(counts, 0, dtype=torch.int32)


def experts_loop(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Routed experts, one matmul pair per expert that received tokens.

    x: [N, H]; weights, experts: [N, K]; gate_up: [E, 2I, H]; down: [E, H, I] -> [N, H].
    Tokens are sorted by expert so each expert's weights are read once per call. This is the portable
    path (CPU, and any GPU); the grouped-GEMM path replaces it where available.
    """
    order, token_of, ends = group_by_expert(experts, gate_up.shape[0])
    xs = x[token_of]  # [N*K, H]
    out = torch.empty_like(xs)
    start = 0
    for e, end in enumerate(ends.tolist()):  # the loop needs the group sizes on the host
        if end > start:
            gate, up = F.linear(xs[start:end], gate_up[e]).chunk(2, dim=-1)  # [n, I] each
            out[start:end] = F.linear(F.gelu(gate, approximate="tanh") * up, down[e])
        start = end
    return combine(out, order, weights, x.dtype)


def experts_grouped(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Routed experts as two grouped matrix products: every expert's weights are read once, with no host sync
    (group offsets stay on the device), so the step can be captured in a CUDA graph. Same shapes as `experts_loop`.
    """
    order, token_of, offsets = group_by_expert(experts, gate_up.shape[0])  # offsets: [E] group ends
    xs = x[token_of]  # [N*K, H], grouped by expert
    gate, up = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [N*K, I] each
    out = torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, down.transpose(1, 2), offs=offsets)  # [N*K, H]
    return combine(out, order, weights, x.dtype)


def combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs. out: [N*K, H] in expert order -> [N, H].

    Un-permuting and summing over K is deterministic (index_add_ on a GPU adds with atomics in any order,
    which would make bf16 results, and so a seeded generation, differ from run to run).
    """
    n_tokens, k = weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    per_token = out[inverse].view(n_tokens, k, -1)  # [N, K, H] in each token's top-k order
    if out.is_cuda:
        # One batched matmul [N, 1, K] x [N, K, H] with float32 accumulation, instead of three passes over
        # a float32 [N, K, H] temporary.
        return torch.bmm(weights.to(out.dtype)[:, None, :], per_token)[:, 0].to(dtype)
    # The weight product is float32 (as in the reference), then summed in the activation dtype.
    weighted = (per_token * weights[..., None]).to(dtype)
    return weighted.sum(dim=1)


# The fused Triton kernel streams each expert's weights once per tile of rows and beat torch._grouped_mm on an
# H200 and an H100 (26b-a4b shapes, top-8 of 128) from 256 to 8192 tokens (16 to 512 assignments per expert, 32
# canvases) with tiles chosen per load (dgemma/kernels/moe_tiles.py). Larger calls (prefill chunks over 8192 tokens)
# keep _grouped_mm, which was not measured to lose there.
FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT = 512


def use_fused_moe(
    x: torch.Tensor,  # [N, H]
    experts: torch.Tensor,  # [N, K]
    gate_up: torch.Tensor,  # [E, 2I, H]
    kernel_devices: tuple[str, ...] = ("cuda",),
) -> bool:
    """Whether `fused_moe_triton` computes the routed experts of this call.

    Only devices, dtypes, shapes and the grad mode decide (never tensor values): the choice costs no host sync,
    and a captured CUDA graph, whose shapes are fixed, keeps the choice it was captured with. The kernel has no
    backward, so it serves inference only. `kernel_devices` are the device types that run Triton kernels: a CPU
    runs them only under TRITON_INTERPRET=1, which tests use. FP8 weights (`dgemma.model.fp8`) need a GPU that
    converts float8 in registers (compute capability 8.9: Ada, Hopper and later).
    """
    n_tokens, k = experts.shape
    return (
        x.device.type in kernel_devices
        and x.dtype in (torch.bfloat16, torch.float16)
        and (gate_up.dtype == x.dtype or (gate_up.dtype == FP8 and fp8_kernel_supported(x.device)))
        and not torch.is_grad_enabled()
        and n_tokens * k <= FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT * gate_up.shape[0]
    )


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm runs on CPUs (any float dtype) and on Hopper-class GPUs in bfloat16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return False


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, moe_intermediate_size: int,
                 kernel_devices: tuple[str, ...] = ("cuda",)):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * moe_intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, moe_intermediate_size))
        # Device types that may run the Triton kernel: () forces the torch path (tests compare the two), and
        # tests add "cpu" under TRITON_INTERPRET=1.
        self.kernel_devices = kernel_devices
        # With FP8 weights (`quantize_fp8`): one float32 scale per output row, [E, 2I] and [E, H]. Buffers, not
        # parameters: the checkpoint layout stays the same, and `.to(device)` moves them with the weights.
        self.register_buffer("gate_up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)

    @property
    def quantized(self) -> bool:
        return self.gate_up_scale is not None

    def quantize_fp8(self, names: tuple[str, ...] = ("gate_up_proj", "down_proj")) -> None:
        """Store these weights as float8 e4m3 with per-row scales (`dgemma.model.fp8`); inference only. The loader
        calls it tensor by tensor, so a full-size model never holds both copies of more than one tensor."""
        for name in names:
            w8, scale = quantize_rows(getattr(self, name).data)
            setattr(self, name, nn.Parameter(w8, requires_grad=False))
            setattr(self, name.replace("_proj", "_scale"), scale)

    def rows(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor | None:
        """Where the fused kernel runs, each token's K expert outputs before their weighted sum, token-major:
        [N * K, H] (for a caller that sums them in a kernel of its own); elsewhere None (call `forward`)."""
        if not use_fused_moe(x, experts, self.gate_up_proj, self.kernel_devices):
            return None
        from dgemma.kernels.fused_moe import fused_moe_triton  # imported here: Triton loads only where a kernel runs

        scales = (self.gate_up_scale, self.down_scale) if self.quantized else None
        return fused_moe_triton(x, weights, experts, self.gate_up_proj, self.down_proj, scales=scales, combine=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # x: [N, H]; weights, experts: [N, K]
        rows = self.rows(x, weights, experts)  # [N * K, H] where the fused kernel runs
        if rows is not None:
            from dgemma.kernels.fused_moe import combine_triton

            return combine_triton(rows, weights)  # deterministic, float32 accumulation
        gate_up, down = self.gate_up_proj, self.down_proj  # [E, 2I, H], [E, H, I]
        scales = (self.gate_up_scale, self.down_scale) if self.quantized else None
        if scales is not None:  # every other path multiplies in x's dtype: widen the weights for this call
            gate_up, down = dequantize_rows(gate_up, scales[0], x.dtype), dequantize_rows(down, scales[1], x.dtype)
        grouped = grouped_mm_supported(x.device, x.dtype)
        impl = experts_grouped if grouped else experts_loop
        return impl(x, weights, experts, gate_up, down)
