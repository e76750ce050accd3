"""Attention over the KV cache in place, one Triton flash kernel, with each query's visible positions given as
bounds [key_start, key_end) instead of a mask.

Every attention in the model is such a range (`visible_positions`): full layers see all positions before the
bound, sliding layers a window of them; a sliding ring holds position p in slot p % S, and the ring's proof
(`dgemma.model.kv_cache.ring_positions`) says every position in a query's window is held there. So the kernel walks
positions, maps them to slots, and needs no mask, no gather of the rows' keys and no float32 score tensor.
It replaces SDPA with a boolean mask over every slot of a sliding ring (what a captured graph reads when a long
context keeps only a ring): 143 us a layer at batch 1 on an H200 where 37 us do without the mask. Where the model
uses it is decided, from measurements, by `dgemma.model.attention.use_cache_attention`; the kernel itself also takes
full layers (head_dim 512: key_start None) and any bounds.

Grid: (batch row x KV head, query block, value-dim block). A query block stacks the G query heads that share a KV
head, token-major (row r = token * G + head), so keys are read once for all G heads and a block's tokens have
nearby bounds. Keys are walked in tiles up to the block's largest bound with an online softmax (float32 scores,
probabilities rounded to the value dtype for the second product, as flash attention does). D = 512 is split into
BLOCK_D chunks for the scores and BLOCK_DV blocks of output (each program recomputes the scores for its block):
a [BLOCK_M, 512] float32 accumulator would not fit in registers. A tile with BLOCK_D = D loads its queries once
instead of once per key tile. Scale 1.0, as everywhere in Gemma 4 attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.kernels.launch import launch, pdl_options, wait_for_inputs


@triton.jit
def _attend_tile(n0, q_all, q_rows, r_ok, start, end, block_end, k_base, v_base, dv, d, n, m_i, l_i, acc, ring, HKV,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 RING: tl.constexpr):
    # One key tile [n0, n0 + BLOCK_N) folded into the online softmax (m_i, l_i) and the output block acc.
    pos = n0 + n  # [BLOCK_N] positions
    pos_ok = pos < block_end
    if RING:
        slots = pos % ring
    else:
        slots = pos
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_D == D:
        k = tl.load(k_base + slots[None, :].to(tl.int64) * HKV * D + d[:, None], mask=pos_ok[None, :],
                    other=0.0)  # [D, BN]
        s = tl.dot(q_all, k, s)
    else:
        for d0 in range(0, D, BLOCK_D):
            q = tl.load(q_rows[:, None] + d0 + d[None, :], mask=r_ok[:, None], other=0.0)  # [BM, BD]
            k = tl.load(k_base + slots[None, :].to(tl.int64) * HKV * D + d0 + d[:, None],
                        mask=pos_ok[None, :], other=0.0)  # [BD, BN]
            s = tl.dot(q, k, s)
    s = tl.where((pos[None, :] < end[:, None]) & (pos[None, :] >= start[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet: keep zeros
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + slots[:, None].to(tl.int64) * HKV * D + dv[None, :], mask=pos_ok[:, None],
                other=0.0)  # [BN, BDV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _cache_attention_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, start_ptr, end_ptr, out_ptr, part_ptr, stats_ptr, T,
                            HQ, HKV, G, k_row_stride, ring, D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            HAS_START: tl.constexpr, RING: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    kv = pid_bh - b * HKV
    split = tl.program_id(1) % SPLITS  # which slice of the key range (SPLITS > 1: few queries, see the wrapper)
    r = (tl.program_id(1) // SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked query rows: token * G + head
    r_ok = r < T * G
    token = tl.where(r_ok, r // G, 0)
    head = kv * G + (r - (r // G) * G)
    q_rows = q_ptr + ((b * T + token).to(tl.int64) * HQ + head) * D  # [BLOCK_M] row starts
    end = tl.load(end_ptr + b * T + token, mask=r_ok, other=0)  # [BLOCK_M] one past the last visible position
    block_end = tl.max(end, 0)
    if HAS_START:
        start = tl.maximum(tl.load(start_ptr + b * T + token, mask=r_ok, other=block_end), 0)  # first visible
        block_start = (tl.min(start, 0) // BLOCK_N) * BLOCK_N
    else:
        start = tl.zeros((BLOCK_M,), dtype=tl.int64)
        block_start = 0
    cache_row = tl.load(rows_ptr + b).to(tl.int64)
    k_base = k_ptr + cache_row * k_row_stride + kv * D  # key slot s of this head: k_base + s * HKV * D
    v_base = v_ptr + cache_row * k_row_stride + kv * D
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    if BLOCK_D == D:  # the query tile is loaded once, not once per key tile
        q_all = tl.load(q_rows[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)  # [BM, D]
    else:  # loaded per head-dim chunk in _attend_tile
        q_all = tl.zeros((BLOCK_M, BLOCK_D), dtype=q_ptr.dtype.element_ty)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if SPLITS == 1:
        for n0 in range(block_start, block_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(n0, q_all, q_rows, r_ok, start, end, block_end, k_base, v_base, dv, d, n,
                                         m_i, l_i, acc, ring, HKV, D, BLOCK_M, BLOCK_N, BLOCK_D, RING)
    else:
        # This program's slice: whole key tiles; the last slice may run past the end, where every load is masked.
        # (A tile count rather than bounds computed from the program id: the interpreter runs this too.)
        per_split = ((block_end - block_start + BLOCK_N - 1) // BLOCK_N + SPLITS - 1) // SPLITS
        for i in range(0, per_split):
            n0 = block_start + (split * per_split + i) * BLOCK_N
            m_i, l_i, acc = _attend_tile(n0, q_all, q_rows, r_ok, start, end, block_end, k_base, v_base, dv, d, n,
                                         m_i, l_i, acc, ring, HKV, D, BLOCK_M, BLOCK_N, BLOCK_D, RING)
    query = (b * T + token).to(tl.int64) * HQ + head  # [BLOCK_M] index of (row, token, head)
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + query[:, None] * D + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:  # unnormalised float32 partials and their (max, sum), merged by _merge_splits_kernel
        part = (query * SPLITS + split)  # [BLOCK_M]
        tl.store(part_ptr + part[:, None] * D + dv[None, :], acc, mask=r_ok[:, None])
        if tl.program_id(2) == 0:  # every value block computed the same scores
            tl.store(stats_ptr + part * 2, m_i, mask=r_ok)
            tl.store(stats_ptr + part * 2 + 1, l_i, mask=r_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, stats_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
                         BLOCK_DV: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    # One (row, token, head) and one block of D: the softmax over all keys from each slice's max m, sum l and
    # unnormalised output, rescaled to the largest max (an empty slice has m = -inf and contributes nothing).
    query = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m = tl.load(stats_ptr + (query * SPLITS + s) * 2)  # [SPLITS]
    l = tl.load(stats_ptr + (query * SPLITS + s) * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [SPLITS]
    total = tl.sum(w * l, 0)
    part = tl.load(part_ptr + (query * SPLITS + s)[:, None] * D + dv[None, :])  # [SPLITS, BLOCK_DV]
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + query * D + dv, out.to(out_ptr.dtype.element_ty))


# Tiles from scripts/cache_attention_sweep.py on an H100 (2026-11-27, 26b-a4b shapes, a 256-query canvas).
# Sliding layers (head_dim 256, the window on a ring, 4096-token prefix), best summed over batch 1 and 8 of 24
# tiles: 144.8 + 290.9 us (masked SDPA over the ring: 307.2 + 697.2 us; flash attention over the same keys in the
# full layout: 45.6 + 150.2 us). Full layers (head_dim 512), `--full`, 64 tiles at batch 1 and 8 over 1024- and
# 2048-token prefixes: scores as one product over the whole head_dim win everywhere; the best summed over the four
# cases, 105.3 + 174.7 + 423.2 + 715.7 us (the two batched matmuls: 229.0 + 387.2 + 1416.0 + 2575.3 us). At batch
# 1 its 128-row tiles leave SMs idle (64 programs): 64-row tiles took 64.0 and 104.4 us there. One program for all
# 512 output columns (scores computed once instead of twice; `--full-dv`, one H100, 2026-12-07) lost everywhere: at
# batch 8 over 1024 / 2048 positions 516 / 901 us against 427 / 725 us, at batch 1 133 / 223 against 68 / 101 us
# (its [rows, 512] float32 accumulator leaves too few registers).
SLIDING_TILE = dict(block_m=128, block_n=64, block_d=64, block_dv=256, num_warps=8, num_stages=2)
FULL_TILE = dict(block_m=128, block_n=32, block_d=512, block_dv=256, num_warps=8, num_stages=2)
FULL_TILE_FEW_ROWS = dict(block_m=64, block_n=32, block_d=512, block_dv=256, num_warps=4, num_stages=3)
FULL_FEW_ROWS = 8192  # batch x queries x query heads below which FULL_TILE_FEW_ROWS runs (a batch-1 canvas: 4096)
# Decoding one token (autoregressive mode): a row's G query heads fill one 16-row block, so the grid would be one
# program per KV head walking the whole context (2 programs on a full layer for 132 SMs). The key range is split
# into slices instead, each program keeping an unnormalised partial output and its softmax statistics, merged by a
# second kernel (flash decoding).
# Key tiles of 32 (sliding) and 16 (full, 8 warps) positions, in place of 64 and 32 (4 warps). One H100
# (`scripts/ar_chain_ab.sh`, three rounds, 2026-12-07): an AR token 281.5 / 281.5 / 281.7 -> 284.0 / 283.7 / 283.8
# tok/s with both, 283.5 / 283.3 / 283.5 with the sliding one alone. The likely reason: `most` below doubles, so a
# sliding layer's 8 KV heads take 32 key slices instead of 16 (256 programs instead of 128 on 132 SMs). They were
# chosen as spill-free by a compile that lacked the launch's alignment; with it the old tiles spill 0 and 112 B.
DECODE_TILE = dict(block_m=16, block_n=32, block_d=256, block_dv=256, num_warps=4, num_stages=2)
DECODE_TILE_FULL = dict(block_m=16, block_n=16, block_d=512, block_dv=512, num_warps=8, num_stages=2)
DECODE_PROGRAMS = 264  # aim: two programs per SM of an H100 (132 SMs)
MAX_SPLITS = 64


def cache_attention_triton(
    q: torch.Tensor,  # [B, T, Hq, D]
    keys: torch.Tensor,  # [rows, slots, Hkv, D] one layer's cache
    values: torch.Tensor,  # [rows, slots, Hkv, D]
    rows: torch.Tensor,  # [B] cache row of each batch row
    key_start: torch.Tensor | None,  # [B, T] first position each query sees (may be < 0), or None: position 0
    key_end: torch.Tensor,  # [B, T] one past the last
    ring: int | None = None,  # position p sits in slot p % ring (a sliding ring); None: slot = position
    splits: int | None = None,  # slices of the key range (a power of two); None: by the number of query rows
    **tile,  # block_m, block_n, block_d, block_dv, num_warps, num_stages: defaults by D and rows (above)
) -> torch.Tensor:
    """softmax(q k^T) v over each query's positions [key_start, key_end), read in place from the cache:
    [B, T, Hq, D] in q's dtype."""
    b, t, hq, d = q.shape
    hkv = keys.shape[2]
    if keys.shape[3] != d or values.shape != keys.shape or hq % hkv or d & (d - 1) or d < 16:
        raise ValueError(f"cache_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)} do not fit (head_dim must be a power of two >= 16)")
    if rows.shape != (b,) or key_end.shape != (b, t) or (key_start is not None and key_start.shape != (b, t)):
        raise ValueError(f"cache_attention: rows {tuple(rows.shape)} and key bounds {tuple(key_end.shape)} must be "
                         f"[{b}] and [{b}, {t}]")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("cache_attention reads the cache in place: keys and values must be contiguous")
    unknown = set(tile) - set(SLIDING_TILE)
    if unknown:
        raise ValueError(f"cache_attention: unknown tile options {sorted(unknown)}")
    g = hq // hkv
    decode = t * g <= DECODE_TILE["block_m"]
    if decode:
        default = DECODE_TILE if d <= 256 else DECODE_TILE_FULL
    else:
        default = SLIDING_TILE if d <= 256 else FULL_TILE_FEW_ROWS if b * t * hq < FULL_FEW_ROWS else FULL_TILE
    tile = {**default, **tile}
    if splits is None:
        # From shapes only (the slots a row can hold bound its key range), so a captured graph keeps the choice.
        most = max(1, keys.shape[1] // tile["block_n"])  # at least one key tile a slice
        splits = min(MAX_SPLITS, most, triton.cdiv(DECODE_PROGRAMS, b * hkv)) if decode else 1
        splits = 1 << (splits.bit_length() - 1)  # a power of two, at most the above
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"cache_attention: splits must be a power of two, got {splits}")
    q = q.contiguous()
    block_d, block_dv = min(tile["block_d"], d), min(tile["block_dv"], d)
    out = torch.empty_like(q)
    # Partial outputs and (max, sum) per query and slice: [B, T, Hq, splits, D] and [B, T, Hq, splits, 2] float32
    part = torch.empty(b, t, hq, splits, d, dtype=torch.float32, device=q.device) if splits > 1 else out
    stats = torch.empty(b, t, hq, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    key_end = key_end.contiguous()
    blocks = dict(BLOCK_M=tile["block_m"], BLOCK_N=tile["block_n"], BLOCK_D=block_d, BLOCK_DV=block_dv,
                  num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    grid = lambda blk: (b * hkv, triton.cdiv(t * g, blk["BLOCK_M"]) * splits,  # noqa: E731
                        triton.cdiv(d, blk["BLOCK_DV"]))
    launch(_cache_attention_kernel, grid, blocks, ("BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N"),
           q, keys, values, rows, key_start.contiguous() if key_start is not None else key_end, key_end, out,
           part, stats, t, hq, hkv, g, keys.stride(0), ring or 1, D=d, HAS_START=key_start is not None,
           RING=ring is not None, SPLITS=splits, **pdl_options(q.device, b * t))
    if splits > 1:
        merge_dv = max(16, min(d, 8192 // splits))  # at most 64 float32 partials per thread of 4 warps
        _merge_splits_kernel[(b * t * hq, triton.cdiv(d, merge_dv))](part, stats, out, D=d, SPLITS=splits,
                                                                     BLOCK_DV=merge_dv, num_warps=4,
                                                                     **pdl_options(q.device, b * t))
    return out
