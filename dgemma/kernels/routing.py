"""Expert routing as two Triton kernels: the top-k choice, and the assignments grouped by expert.

Eager, a layer's routing is ~6 kernels (softmax, top-k, sum, divide, gather, product) and its grouping a stable
radix sort plus a count and a cumulative sum (~8 kernels; the sort alone took 0.9 ms of a batch-1 denoising step
on an H200). Both are tiny: 256 tokens choose 8 of 128 experts.

- `route_top_k`: one program per token: softmax over the experts in float32, the k largest by repeated argmax
  (descending, as torch.topk; among equal probabilities the lower expert id first), renormalised, times the
  per-expert scale.
- `group_by_expert_triton`: one program per expert: the assignments to experts below it give its start, and a
  running prefix count over its own assignments their places, in assignment order. That is exactly the stable
  sort `dgemma.model.moe.group_by_expert` computes, so the results are identical, not just close.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.launch import pdl_options, wait_for_inputs


@triton.jit
def _route_top_k_kernel(logits_ptr, scale_ptr, weights_ptr, experts_ptr, E, K: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, BLOCK_E)
    valid = ids < E
    logits = tl.load(logits_ptr + row * E + ids, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp(logits - tl.max(logits, 0))
    probs = e / tl.sum(e, 0)  # 0 past E
    left = tl.where(valid, probs, -1.0)
    slots = tl.arange(0, BLOCK_K)
    chosen_p = tl.zeros((BLOCK_K,), dtype=tl.float32)
    chosen_id = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(left, 0)
        best_id = tl.min(tl.where(left == best, ids, BLOCK_E), 0)
        chosen_p = tl.where(slots == k, best, chosen_p)
        chosen_id = tl.where(slots == k, best_id, chosen_id)
        left = tl.where(ids == best_id, -1.0, left)
    taken = slots < K
    total = tl.sum(tl.where(taken, chosen_p, 0.0), 0)
    scale = tl.load(scale_ptr + chosen_id, mask=taken, other=0.0).to(tl.float32)
    tl.store(weights_ptr + row * K + slots, chosen_p / total * scale, mask=taken)
    tl.store(experts_ptr + row * K + slots, chosen_id.to(tl.int64), mask=taken)


@triton.jit
def _group_by_expert_kernel(experts_ptr, order_ptr, token_ptr, ends_ptr, M, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    e = tl.program_id(0)
    before = 0
    for m0 in range(0, M, BLOCK):
        idx = m0 + tl.arange(0, BLOCK)
        ex = tl.load(experts_ptr + idx, mask=idx < M, other=2147483647)
        before += tl.sum((ex < e).to(tl.int32), 0)
    place = before
    for m0 in range(0, M, BLOCK):
        idx = m0 + tl.arange(0, BLOCK)
        ex = tl.load(experts_ptr + idx, mask=idx < M, other=-1)
        hit = (ex == e).to(tl.int32)
        slot = place + tl.cumsum(hit, 0) - hit  # this expert's assignments keep their order
        tl.store(order_ptr + slot, idx.to(tl.int64), mask=hit == 1)
        tl.store(token_ptr + slot, (idx // K).to(tl.int64), mask=hit == 1)
        place += tl.sum(hit, 0)
    tl.store(ends_ptr + e, place)


def route_top_k(
    logits: torch.Tensor,  # [N, E] router logits (any float dtype)
    per_expert_scale: torch.Tensor,  # [E]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `dgemma.model.moe.Router`'s choice from its logits: weights [N, K] float32, expert ids [N, K] int64."""
    n, e = logits.shape
    if per_expert_scale.shape != (e,) or not 0 < k <= e:
        raise ValueError(f"route_top_k: per_expert_scale must be [{e}] and 0 < k <= {e}, got "
                         f"{tuple(per_expert_scale.shape)}, k={k}")
    logits = logits.contiguous()
    weights = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    experts = torch.empty((n, k), dtype=torch.int64, device=logits.device)
    block_e = triton.next_power_of_2(e)
    _route_top_k_kernel[(n,)](logits, per_expert_scale, weights, experts, e, K=k, BLOCK_E=block_e,
                              BLOCK_K=triton.next_power_of_2(k), num_warps=1 if block_e <= 256 else 4,
                              **pdl_options(logits.device, n))
    return weights, experts


def group_by_expert_triton(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dgemma.model.moe.group_by_expert` as one kernel: experts [N, K] -> order [N*K], token_of [N*K] (int64),
    ends [E] (int32), with no host sync."""
    n, k = experts.shape
    m = n * k
    flat = experts.reshape(-1).contiguous()
    order = torch.empty(m, dtype=torch.int64, device=experts.device)
    token_of = torch.empty(m, dtype=torch.int64, device=experts.device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=experts.device)
    block = min(4096, max(16, triton.next_power_of_2(m)))
    _group_by_expert_kernel[(num_experts,)](flat, order, token_of, ends, m, k, BLOCK=block,
                                            num_warps=4 if block <= 1024 else 8, **pdl_options(experts.device, n))
    return order, token_of, ends
