"""The norms around a layer's residual stream, as two Triton kernels per layer instead of fourteen.

A layer adds its attention output to the residual and normalises the sum three ways (the dense MLP's input, the
router's input, the experts' input); at the end it normalises the dense and routed outputs, their sum, adds that
to the residual and scales by the layer scalar. Eager, that is 7 + 7 kernels, each one pass over a [tokens, H]
row; at a batch-1 denoising step (256 tokens) each is a few microseconds of work behind a launch.

- `attention_residual`: h = x + norm(attn; w_post_attn), then norm(h; w_pre_ff), norm(h; w_pre_ff2) and the
  router's input norm(h) * scale * H^-1/2, from one read of x and attn.
- `layer_output`: (h + norm(norm(dense; w1) + norm(routed; w2); w)) * scalar; it can also take the routed experts'
  K rows per token unsummed and sum them itself (the MoE's combine kernel folded in), and also write the next norm of
  the residual stream (the next layer's input norm, or the final norm: that norm's kernel folded in).

Rounding follows the eager path step by step: every intermediate the eager code holds in the activation dtype is
rounded to it here too, and the norms are those of `dgemma.kernels.rms_norm` (float32, 1 / sqrt). So on a GPU the
results equal the eager path's bit for bit up to the order of each row's sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.fused_moe import weighted_rows_sum
from dgemma.kernels.launch import pdl_options, wait_for_inputs


@triton.jit
def _rms(v, D, eps):
    """v [BLOCK] float32 (zeros past D) times 1 / rms(v): the unweighted norm, in float32."""
    return v * (1.0 / tl.sqrt(tl.sum(v * v, 0) / D + eps))


@triton.jit
def _attention_residual_kernel(x_ptr, attn_ptr, w_post_ptr, w_dense_ptr, w_experts_ptr, router_scale_ptr,
                               h_ptr, dense_ptr, router_ptr, experts_ptr, D, eps, router_factor,
                               BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    dtype = h_ptr.dtype.element_ty
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    attn = tl.load(attn_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = (x + (_rms(attn, D, eps) * w_post).to(dtype).to(tl.float32)).to(dtype)
    tl.store(h_ptr + row + cols, h, mask=mask)
    normed = _rms(h.to(tl.float32), D, eps)
    w_dense = tl.load(w_dense_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w_experts = tl.load(w_experts_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dense_ptr + row + cols, (normed * w_dense).to(dtype), mask=mask)
    tl.store(experts_ptr + row + cols, (normed * w_experts).to(dtype), mask=mask)
    # The router's input: the weightless norm, then its scale, then H^-1/2, each product rounded as eager.
    scale = tl.load(router_scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    z = (normed.to(dtype).to(tl.float32) * scale).to(dtype).to(tl.float32)
    tl.store(router_ptr + row + cols, (z * router_factor).to(dtype), mask=mask)


@triton.jit
def _layer_output_kernel(h_ptr, dense_ptr, routed_ptr, route_w_ptr, w_dense_ptr, w_routed_ptr, w_out_ptr, scalar_ptr,
                         out_ptr, w_next_ptr, next_ptr, D, eps, tokens_per_scalar, K: tl.constexpr,
                         NEXT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    index = tl.program_id(0)
    row = index.to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    dtype = out_ptr.dtype.element_ty
    dense = tl.load(dense_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if K == 0:
        routed = tl.load(routed_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    else:  # the experts' K rows of this token, summed as `fused_moe.combine_triton` sums them
        acc = weighted_rows_sum(routed_ptr, route_w_ptr, index.to(tl.int64), cols, mask, D, dtype, K, BLOCK)
        routed = acc.to(dtype).to(tl.float32)
    w_dense = tl.load(w_dense_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w_routed = tl.load(w_routed_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    mixed = ((_rms(dense, D, eps) * w_dense).to(dtype).to(tl.float32)
             + (_rms(routed, D, eps) * w_routed).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    w_out = tl.load(w_out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    out = (h + (_rms(mixed, D, eps) * w_out).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    scalar = tl.load(scalar_ptr + index % tokens_per_scalar).to(tl.float32)
    out = (out * scalar).to(dtype)
    tl.store(out_ptr + row + cols, out, mask=mask)
    if NEXT:  # the next norm of the residual stream (the next layer's input norm, or the final norm), as rms_norm
        w_next = tl.load(w_next_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(next_ptr + row + cols, (_rms(out.to(tl.float32), D, eps) * w_next).to(dtype), mask=mask)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    flat = t.reshape(-1, d)
    return flat if flat.is_contiguous() else flat.contiguous()


def _launch_options(d: int, device: torch.device, rows: int) -> dict:
    block = triton.next_power_of_2(d)
    return {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8, **pdl_options(device, rows)}


def attention_residual_triton(
    x: torch.Tensor,  # [..., H] the layer's input (the residual)
    attn: torch.Tensor,  # [..., H] the attention output
    w_post_attn: torch.Tensor,  # [H]
    w_dense: torch.Tensor,  # [H] the dense MLP's input norm
    w_experts: torch.Tensor,  # [H] the experts' input norm
    router_scale: torch.Tensor,  # [H]
    router_factor: float,  # H^-1/2
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dense input, router input, experts input), each shaped and typed like x."""
    d = x.shape[-1]
    if attn.shape != x.shape or attn.dtype != x.dtype:
        raise ValueError(f"attention_residual: attn {tuple(attn.shape)} {attn.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    for name, w in (("w_post_attn", w_post_attn), ("w_dense", w_dense), ("w_experts", w_experts),
                    ("router_scale", router_scale)):
        if w.shape != (d,) or w.device != x.device:
            raise ValueError(f"attention_residual: {name} must be [{d}] on {x.device}, got {tuple(w.shape)} "
                             f"on {w.device}")
    xs, attns = _rows(x, d), _rows(attn, d)
    h, dense, router, experts = (torch.empty_like(xs) for _ in range(4))
    _attention_residual_kernel[(xs.shape[0],)](xs, attns, w_post_attn, w_dense, w_experts, router_scale,
                                               h, dense, router, experts, d, eps, router_factor,
                                               **_launch_options(d, x.device, xs.shape[0]))
    return h.view(x.shape), dense.view(x.shape), router.view(x.shape), experts.view(x.shape)


def layer_output_triton(
    h: torch.Tensor,  # [B, T, H] the residual after attention
    dense: torch.Tensor,  # [B, T, H] the dense MLP's output
    routed: torch.Tensor,  # [B, T, H] the experts' output; with route_weights, their rows [B * T * K, H]
    w_dense: torch.Tensor,  # [H]
    w_routed: torch.Tensor,  # [H]
    w_out: torch.Tensor,  # [H]
    scalar: torch.Tensor,  # [1], or [T, 1]: one per token position
    eps: float,
    route_weights: torch.Tensor | None = None,  # [B * T, K] float32: routed holds each token's K rows, unsummed
    w_next: torch.Tensor | None = None,  # [H]: also return the output's norm with this weight
):
    """out = (h + norm(norm(dense; w_dense) + norm(routed; w_routed); w_out)) * scalar: [B, T, H] in h's dtype; with
    `w_next`, (out, norm(out; w_next)).

    With `route_weights`, routed is the fused MoE's token-major rows (token * K + k) and their weighted sum is taken
    here, rounded as `dgemma.kernels.fused_moe.combine_triton` rounds it: the same result, one kernel fewer. `w_next`
    is the next norm on the residual stream (the next layer's input norm, or the model's final norm), computed as
    `dgemma.kernels.rms_norm.rms_norm_triton` computes it: again one kernel fewer."""
    _, t, d = h.shape
    tokens = h.numel() // d
    k = 0 if route_weights is None else route_weights.shape[-1]
    routed_shape = h.shape if route_weights is None else (tokens * k, d)
    if (dense.shape != h.shape or tuple(routed.shape) != tuple(routed_shape) or dense.dtype != h.dtype
            or routed.dtype != h.dtype):
        raise ValueError(f"layer_output: dense {tuple(dense.shape)} must match h {tuple(h.shape)} {h.dtype}, and "
                         f"routed {tuple(routed.shape)} be {tuple(routed_shape)}")
    if route_weights is not None and (route_weights.shape != (tokens, k) or route_weights.dtype != torch.float32):
        raise ValueError(f"layer_output: route_weights must be float32 [{tokens}, K], got "
                         f"{tuple(route_weights.shape)} {route_weights.dtype}")
    for name, w in (("w_dense", w_dense), ("w_routed", w_routed), ("w_out", w_out), ("w_next", w_next)):
        if w is not None and (w.shape != (d,) or w.device != h.device):
            raise ValueError(f"layer_output: {name} must be [{d}] on {h.device}, got {tuple(w.shape)}")
    if scalar.numel() not in (1, t):
        raise ValueError(f"layer_output: scalar must have 1 or {t} values, got {tuple(scalar.shape)}")
    hs = _rows(h, d)
    out = torch.empty_like(hs)
    normed = torch.empty_like(hs) if w_next is not None else out  # unwritten without w_next
    route_w = hs if route_weights is None else route_weights.contiguous()  # unread without K
    _layer_output_kernel[(hs.shape[0],)](hs, _rows(dense, d), _rows(routed, d), route_w, w_dense, w_routed, w_out,
                                         scalar.reshape(-1).contiguous(), out,
                                         w_next if w_next is not None else w_out, normed, d, eps, scalar.numel(),
                                         K=k, NEXT=w_next is not None, **_launch_options(d, h.device, hs.shape[0]))
    if w_next is None:
        return out.view(h.shape)
    return out.view(h.shape), normed.view(h.shape)
