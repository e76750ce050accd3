"""One pass over the vocabulary per canvas position: everything the Entropy Bound step needs from the logits.

For each position, from the bfloat16 LM-head output `l`:
    x = cap * tanh(l / cap)        (final softcapping, in float32, as the reference does after its matmul)
    z = x / T_row                  (the step's temperature)
    entropy(softmax(z)), argmax(z), a sample of softmax(z) (inverse CDF), one uniform noise token,
and, in a second pass, softmax(bf16(z)) written back over the logits in bfloat16: the self-conditioning input
(the reference rounds z to the weight dtype before its softmax). So the step never materialises a float32
[B, C, V] tensor, and the whole step has no host synchronisation.

Randomness is counter-based (Philox, keyed by a per-row, per-step seed and the position in the canvas), so a
request's draws do not depend on its batch, and a step can be replayed inside a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        # The CUDA math library's tanhf, as torch.tanh uses: z is rounded to bf16 for the self-conditioning
        # softmax, so z must match the reference's float32 bits, not just its value.
        return libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))  # the interpreter (CPU tests) has no libdevice
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)


@triton.jit
def _scaled(l, cap, temp, HAS_CAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    # Same operation order as the reference: float32(l) / cap, tanh, * cap, then / T.
    x = l.to(tl.float32)
    if HAS_CAP:
        x = _tanh(x / cap, LIBDEVICE) * cap
    return x / temp


@triton.jit
def _fused_sample_kernel(
    logits_ptr,  # [N, V] bfloat16 (N = B * C); overwritten with softmax(bf16(z)) if WRITE_PROBS
    temp_ptr,  # [B] float32: T of each row
    seed_ptr,  # [B] int64: per-row, per-step seed
    greedy_ptr,  # [B] int32: 1 = take the argmax instead of a sample
    entropy_ptr,  # [N] float32 out
    argmax_ptr,  # [N] int64 out
    sample_ptr,  # [N] int64 out
    noise_ptr,  # [N] int64 out: a uniform random token
    V, C, stride_n, cap,
    HAS_CAP: tl.constexpr, WRITE_PROBS: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    row = n // C
    pos = n % C
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    greedy = tl.load(greedy_ptr + row)
    base = logits_ptr + n.to(tl.int64) * stride_n
    cols = tl.arange(0, BLOCK)

    # Pass 1: softmax statistics of z (max m, sum s, and sum of e*z for the entropy), the argmax, and the
    # statistics of bf16(z) for the self-conditioning softmax.
    m = -float("inf")
    s = 0.0
    t = 0.0
    best = -float("inf")
    best_idx = 0
    mb = -float("inf")
    sb = 0.0
    for start in range(0, V, BLOCK):
        idx = start + cols
        valid = idx < V
        z = _scaled(tl.load(base + idx, mask=valid, other=0.0), cap, temp, HAS_CAP, LIBDEVICE)
        z = tl.where(valid, z, -float("inf"))
        block_max = tl.max(z, 0)
        new_m = tl.maximum(m, block_max)
        scale = tl.exp(m - new_m)
        e = tl.where(valid, tl.exp(z - new_m), 0.0)
        s = s * scale + tl.sum(e, 0)
        t = t * scale + tl.sum(tl.where(valid, e * z, 0.0), 0)
        m = new_m
        best_idx = tl.where(block_max > best, start + tl.argmax(z, 0), best_idx)
        best = tl.maximum(best, block_max)
        zb = tl.where(valid, z.to(tl.bfloat16).to(tl.float32), -float("inf"))
        new_mb = tl.maximum(mb, tl.max(zb, 0))
        sb = sb * tl.exp(mb - new_mb) + tl.sum(tl.where(valid, tl.exp(zb - new_mb), 0.0), 0)
        mb = new_mb

    tl.store(entropy_ptr + n, m + tl.log(s) - t / s)
    tl.store(argmax_ptr + n, best_idx.to(tl.int64))
    noise_u = tl.rand(seed, C + pos)
    tl.store(noise_ptr + n, tl.minimum((noise_u * V).to(tl.int32), V - 1).to(tl.int64))

    # Pass 2: inverse-CDF sampling from softmax(z) with one uniform number per position (the first index whose
    # running sum exceeds u * s), and the self-conditioning probabilities written over the logits.
    target = tl.rand(seed, pos) * s
    carry = 0.0
    sample_idx = V
    inv_sb = 1.0 / sb
    for start in range(0, V, BLOCK):
        idx = start + cols
        valid = idx < V
        z = _scaled(tl.load(base + idx, mask=valid, other=0.0), cap, temp, HAS_CAP, LIBDEVICE)
        e = tl.where(valid, tl.exp(z - m), 0.0)
        running = tl.cumsum(e, 0) + carry
        hit = tl.min(tl.where(valid & (running > target), idx, V), 0)
        sample_idx = tl.minimum(sample_idx, hit)
        carry += tl.sum(e, 0)
        if WRITE_PROBS:
            zb = z.to(tl.bfloat16).to(tl.float32)
            tl.store(base + idx, (tl.exp(zb - mb) * inv_sb).to(tl.bfloat16), mask=valid)
    # Rounding can leave the total a hair under u * s: fall back to the argmax (probability ~1e-7).
    sample_idx = tl.where(sample_idx >= V, best_idx, sample_idx)
    tl.store(sample_ptr + n, tl.where(greedy != 0, best_idx, sample_idx).to(tl.int64))


def fused_sample(
    logits: torch.Tensor,  # [B, C, V] bfloat16, raw LM-head output (before softcapping)
    temperature: torch.Tensor,  # [B] float32
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor,  # [B] int32
    softcap: float | None,
    write_probs: bool = True,
    block: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns entropy [B, C] float32, argmax, sample, noise [B, C] int64; with `write_probs`, `logits` now holds
    softmax(bf16(z)) in bfloat16 (the self-conditioning probabilities)."""
    if logits.dtype != torch.bfloat16 or logits.dim() != 3:
        raise ValueError(f"fused_sample needs [B, C, V] bfloat16 logits, got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError("fused_sample needs the vocabulary dimension contiguous")
    b, c, v = logits.shape
    for name, t, dtype in (("temperature", temperature, torch.float32), ("seeds", seeds, torch.int64),
                           ("greedy", greedy, torch.int32)):
        if t.shape != (b,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be [{b}] {dtype} on {logits.device}, got {tuple(t.shape)} {t.dtype}")
    flat = logits.view(b * c, v)
    entropy = torch.empty(b * c, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(b * c, dtype=torch.int64, device=logits.device)
    sample = torch.empty_like(argmax)
    noise = torch.empty_like(argmax)
    _fused_sample_kernel[(b * c,)](
        flat, temperature, seeds, greedy, entropy, argmax, sample, noise,
        v, c, flat.stride(0), float(softcap or 1.0),
        HAS_CAP=softcap is not None, WRITE_PROBS=write_probs, LIBDEVICE=not INTERPRETED, BLOCK=block,
    )
    return entropy.view(b, c), argmax.view(b, c), sample.view(b, c), noise.view(b, c)
