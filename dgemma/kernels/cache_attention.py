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

from dgemma.kernels.launch import launch


@triton.jit
def _cache_attention_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, start_ptr, end_ptr, out_ptr, T, HQ, HKV, G,
                            k_row_stride, ring, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_START: tl.constexpr,
                            RING: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    kv = pid_bh - b * HKV
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked query rows: token * G + head
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
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(block_start, block_end, BLOCK_N):
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
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + ((b * T + token).to(tl.int64) * HQ + head)[:, None] * D + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


# Tiles from scripts/cache_attention_sweep.py on an H100 (2026-11-27, 26b-a4b shapes, a 256-query canvas).
# Sliding layers (head_dim 256, the window on a ring, 4096-token prefix), best summed over batch 1 and 8 of 24
# tiles: 144.8 + 290.9 us (masked SDPA over the ring: 307.2 + 697.2 us; flash attention over the same keys in the
# full layout: 45.6 + 150.2 us). Full layers (head_dim 512), `--full`, 64 tiles at batch 1 and 8 over 1024- and
# 2048-token prefixes: scores as one product over the whole head_dim win everywhere; the best summed over the four
# cases, 105.3 + 174.7 + 423.2 + 715.7 us (the two batched matmuls: 229.0 + 387.2 + 1416.0 + 2575.3 us). At batch
# 1 its 128-row tiles leave SMs idle (64 programs): 64-row tiles took 64.0 and 104.4 us there.
SLIDING_TILE = dict(block_m=128, block_n=64, block_d=64, block_dv=256, num_warps=8, num_stages=2)
FULL_TILE = dict(block_m=128, block_n=32, block_d=512, block_dv=256, num_warps=8, num_stages=2)
FULL_TILE_FEW_ROWS = dict(block_m=64, block_n=32, block_d=512, block_dv=256, num_warps=4, num_stages=3)
FULL_FEW_ROWS = 8192  # batch x queries x query heads below which FULL_TILE_FEW_ROWS runs (a batch-1 canvas: 4096)


def cache_attention_triton(
    q: torch.Tensor,  # [B, T, Hq, D]
    keys: torch.Tensor,  # [rows, slots, Hkv, D] one layer's cache
    values: torch.Tensor,  # [rows, slots, Hkv, D]
    rows: torch.Tensor,  # [B] cache row of each batch row
    key_start: torch.Tensor | None,  # [B, T] first position each query sees (may be < 0), or None: position 0
    key_end: torch.Tensor,  # [B, T] one past the last
    ring: int | None = None,  # position p sits in slot p % ring (a sliding ring); None: slot = position
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
    default = SLIDING_TILE if d <= 256 else FULL_TILE_FEW_ROWS if b * t * hq < FULL_FEW_ROWS else FULL_TILE
    tile = {**default, **tile}
    q = q.contiguous()
    block_d, block_dv = min(tile["block_d"], d), min(tile["block_dv"], d)
    g = hq // hkv
    out = torch.empty_like(q)
    key_end = key_end.contiguous()
    blocks = dict(BLOCK_M=tile["block_m"], BLOCK_N=tile["block_n"], BLOCK_D=block_d, BLOCK_DV=block_dv,
                  num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    grid = lambda blk: (b * hkv, triton.cdiv(t * g, blk["BLOCK_M"]), triton.cdiv(d, blk["BLOCK_DV"]))  # noqa: E731
    launch(_cache_attention_kernel, grid, blocks, ("BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N"),
           q, keys, values, rows, key_start.contiguous() if key_start is not None else key_end, key_end, out, t, hq,
           hkv, g, keys.stride(0), ring or 1, D=d, HAS_START=key_start is not None, RING=ring is not None)
    return out
