"""Two passes over the vocabulary per canvas position: everything the Entropy Bound step needs from the logits.

For each position, from the bfloat16 LM-head output `l`:
    x = cap * tanh(l / cap)        (final softcapping, in float32, as the reference does after its matmul)
    z = x / T_row                  (the step's temperature)
    entropy(softmax(z)), argmax(z), a sample of softmax(z) (inverse CDF), one uniform noise token,
and, in the second pass, softmax(bf16(z)) written back over the logits in bfloat16: the self-conditioning input
(the reference rounds z to the weight dtype before its softmax). So the step never materialises a float32
[B, C, V] tensor, and the whole step has no host synchronisation.

Each position's vocabulary is cut into chunks taken by programs side by side (`vocab_splits`): the first kernel
writes each chunk's statistics, the second merges them in every program (a few floats) and finishes its chunk.

Randomness is counter-based (Philox, keyed by a per-row, per-step seed and the position in the canvas), so a
request's draws do not depend on its batch, and a step can be replayed inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.tanh import INTERPRETED, tanh


@triton.jit
def _scaled(l, cap, temp, HAS_CAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    # Same operation order as the reference: float32(l) / cap, tanh, * cap, then / T.
    x = l.to(tl.float32)
    if HAS_CAP:
        x = tanh(x / cap, LIBDEVICE) * cap  # LIBDEVICE: z's float32 bits as the reference's (bf16(z) below)
    return x / temp


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,  # [N, V] bfloat16 (N = B * C)
    temp_ptr,  # [B] float32: T of each row
    stats_ptr,  # [N, SPLITS, 6] float32 out: per chunk m, s, t, best, mb, sb (below)
    best_idx_ptr,  # [N, SPLITS] int32 out: the chunk's argmax
    V, C, CHUNK, stride_n, cap,
    SPLITS: tl.constexpr, HAS_CAP: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (position, chunk of CHUNK vocabulary entries): the softmax statistics of z over the chunk
    # (max m, sum s of exp(z - m), and t, the sum of exp(z - m) * z, for the entropy), its argmax, and the same
    # max and sum for bf16(z), whose softmax is the self-conditioning input.
    n = tl.program_id(0)
    j = tl.program_id(1)
    temp = tl.load(temp_ptr + n // C)
    base = logits_ptr + n.to(tl.int64) * stride_n
    cols = tl.arange(0, BLOCK)
    m = -float("inf")
    s = 0.0
    t = 0.0
    best = -float("inf")
    best_idx = 0
    mb = -float("inf")
    sb = 0.0
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    for start in range(lo, hi, BLOCK):
        idx = start + cols
        valid = idx < hi
        z = _scaled(tl.load(base + idx, mask=valid, other=0.0), cap, temp, HAS_CAP, LIBDEVICE)
        z = tl.where(valid, z, -float("inf"))
        block_max = tl.max(z, 0)
        new_m = tl.maximum(m, block_max)
        scale = tl.exp(m - new_m)
        e = tl.where(valid, tl.exp(z - new_m), 0.0)
        s = s * scale + tl.sum(e, 0)
        t = t * scale + tl.sum(tl.where(valid, e * z, 0.0), 0)
        m = new_m
        best_idx = tl.where(block_max > best, start + tl.argmax(z, 0), best_idx)  # ties: the first index
        best = tl.maximum(best, block_max)
        zb = tl.where(valid, z.to(tl.bfloat16).to(tl.float32), -float("inf"))
        new_mb = tl.maximum(mb, tl.max(zb, 0))
        sb = sb * tl.exp(mb - new_mb) + tl.sum(tl.where(valid, tl.exp(zb - new_mb), 0.0), 0)
        mb = new_mb
    out = stats_ptr + (n * SPLITS + j) * 6
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, t)
    tl.store(out + 3, best)
    tl.store(out + 4, mb)
    tl.store(out + 5, sb)
    tl.store(best_idx_ptr + n * SPLITS + j, best_idx)


@triton.jit
def _sample_chunks_kernel(
    logits_ptr,  # [N, V] bfloat16; overwritten with softmax(bf16(z)) if WRITE_PROBS
    temp_ptr,  # [B] float32
    seed_ptr,  # [B] int64: per-row, per-step seed
    greedy_ptr,  # [B] int32: 1 = take the argmax instead of a sample
    stats_ptr,  # [N, SPLITS, 6] float32, from _chunk_stats_kernel
    best_idx_ptr,  # [N, SPLITS] int32
    entropy_ptr,  # [N] float32 out
    argmax_ptr,  # [N] int64 out
    sample_ptr,  # [N] int64 out
    noise_ptr,  # [N] int64 out: a uniform random token
    V, C, CHUNK, stride_n, cap,
    SPLITS: tl.constexpr, HAS_CAP: tl.constexpr, WRITE_PROBS: tl.constexpr, LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Every program merges its position's chunk statistics (a few floats), so no third kernel is needed; then
    # writes its chunk's self-conditioning probabilities, and the one chunk holding the sample finds it.
    n = tl.program_id(0)
    j = tl.program_id(1)
    row = n // C
    pos = n % C
    temp = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + n.to(tl.int64) * stride_n
    parts = tl.arange(0, SPLITS)
    stats = stats_ptr + (n * SPLITS + parts) * 6
    m_j = tl.load(stats)  # [SPLITS]
    m = tl.max(m_j, 0)
    s_j = tl.load(stats + 1) * tl.exp(m_j - m)  # [SPLITS] each chunk's sum, relative to the position's max
    s = tl.sum(s_j, 0)
    mb_j = tl.load(stats + 4)
    mb = tl.max(mb_j, 0)
    sb = tl.sum(tl.load(stats + 5) * tl.exp(mb_j - mb), 0)
    best_j = tl.load(stats + 3)
    best = tl.max(best_j, 0)
    first = tl.min(tl.where(best_j == best, parts, SPLITS), 0)  # the first chunk holding the max: ties as one pass
    best_idx = tl.sum(tl.where(parts == first, tl.load(best_idx_ptr + n * SPLITS + parts), 0), 0)
    if j == 0:
        t = tl.sum(tl.load(stats + 2) * tl.exp(m_j - m), 0)
        tl.store(entropy_ptr + n, m + tl.log(s) - t / s)
        tl.store(argmax_ptr + n, best_idx.to(tl.int64))
        noise_u = tl.rand(seed, C + pos)
        tl.store(noise_ptr + n, tl.minimum((noise_u * V).to(tl.int32), V - 1).to(tl.int64))

    # Inverse-CDF sampling from softmax(z) with one uniform number per position: the first index whose running
    # sum exceeds u * s. The chunk sums place it in one chunk (the last one when rounding leaves the total a hair
    # under u * s); only that program scans its chunk.
    target = tl.rand(seed, pos) * s
    carry = tl.sum(tl.where(parts < j, s_j, 0.0), 0)
    chunk_sum = tl.sum(tl.where(parts == j, s_j, 0.0), 0)
    holds_sample = (carry <= target) & ((target < carry + chunk_sum) | (j == SPLITS - 1))
    lo = j * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    cols = tl.arange(0, BLOCK)
    inv_sb = 1.0 / sb
    sample_idx = V
    for start in range(lo, tl.where(holds_sample | WRITE_PROBS, hi, lo), BLOCK):  # nothing to do: no pass
        idx = start + cols
        valid = idx < hi
        z = _scaled(tl.load(base + idx, mask=valid, other=0.0), cap, temp, HAS_CAP, LIBDEVICE)
        if holds_sample:
            e = tl.where(valid, tl.exp(z - m), 0.0)
            running = tl.cumsum(e, 0) + carry
            hit = tl.min(tl.where(valid & (running > target), idx, V), 0)
            sample_idx = tl.minimum(sample_idx, hit)
            carry += tl.sum(e, 0)
        if WRITE_PROBS:
            zb = z.to(tl.bfloat16).to(tl.float32)
            tl.store(base + idx, (tl.exp(zb - mb) * inv_sb).to(tl.bfloat16), mask=valid)
    if holds_sample:
        # Rounding can leave the total a hair under u * s: fall back to the argmax (probability ~1e-7).
        sample_idx = tl.where(sample_idx >= V, best_idx, sample_idx)
        greedy = tl.load(greedy_ptr + row)
        tl.store(sample_ptr + n, tl.where(greedy != 0, best_idx, sample_idx).to(tl.int64))


def vocab_splits(positions: int, vocab: int, block: int, target_programs: int = 32768) -> int:
    """Chunks of the vocabulary per position: a power of two, at most 16, no more than the vocabulary has blocks,
    fewer once positions x chunks reach `target_programs`. The sampler is compute-bound (tanh, exp and divisions
    per logit), and one program walking a position's 262144 logits twice left an H100 mostly idle: 256 positions
    706 -> 298 us with 16 chunks, 2048 positions 2847 -> 2191 us (`scripts/sampler_ab.py`, 2026-12-07)."""
    splits = 1
    while splits < 16 and positions * splits < target_programs and splits * 2 <= triton.cdiv(vocab, block):
        splits *= 2
    return splits


def fused_sample(
    logits: torch.Tensor,  # [B, C, V] bfloat16, raw LM-head output (before softcapping)
    temperature: torch.Tensor,  # [B] float32
    seeds: torch.Tensor,  # [B] int64
    greedy: torch.Tensor,  # [B] int32
    softcap: float | None,
    write_probs: bool = True,
    block: int = 2048,
    splits: int | None = None,  # vocabulary chunks per position; None: `vocab_splits`
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
    splits = splits or vocab_splits(b * c, v, block)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two >= 1, got {splits}")
    chunk = triton.cdiv(triton.cdiv(v, splits), block) * block  # whole blocks; trailing chunks may be empty
    flat = logits.view(b * c, v)
    device = logits.device
    stats = torch.empty(b * c, splits, 6, dtype=torch.float32, device=device)
    best_idx = torch.empty(b * c, splits, dtype=torch.int32, device=device)
    entropy = torch.empty(b * c, dtype=torch.float32, device=device)
    argmax = torch.empty(b * c, dtype=torch.int64, device=device)
    sample = torch.empty_like(argmax)
    noise = torch.empty_like(argmax)
    grid = (b * c, splits)
    flags = dict(HAS_CAP=softcap is not None, LIBDEVICE=not INTERPRETED, BLOCK=block, SPLITS=splits)
    _chunk_stats_kernel[grid](flat, temperature, stats, best_idx, v, c, chunk, flat.stride(0), float(softcap or 1.0),
                              **flags)
    _sample_chunks_kernel[grid](
        flat, temperature, seeds, greedy, stats, best_idx, entropy, argmax, sample, noise,
        v, c, chunk, flat.stride(0), float(softcap or 1.0), WRITE_PROBS=write_probs, **flags,
    )
    return entropy.view(b, c), argmax.view(b, c), sample.view(b, c), noise.view(b, c)
