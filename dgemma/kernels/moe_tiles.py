"""Tile shapes of the fused MoE kernels (`fused_moe.py`) by load: plain data, importable without Triton."""

from __future__ import annotations

# Tile shapes from scripts/moe_kernel_sweep.py on an H200 (26b-a4b shapes, 256 tokens): 481 us for both kernels
# of one layer (3.0 TB/s); the best of 24 + 24 tiles was within 1% of this.
GATE_UP_TILE = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
DOWN_TILE = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)

# Busier experts (batches of 4 to 32 canvases) want 128-row tiles and 8 warps. A sweep of 32 + 48 tiles on an H200
# (2026-11-27, one layer's 26b-a4b experts, bf16): 1024 tokens (64 per expert) 691 us vs 821 us for
# torch._grouped_mm; 2048 tokens (128 per expert) 970 vs 1117 us. Outputs equal to _grouped_mm's.
# From 128 per expert on, many experts need several 128-row passes; M_SPLITS programs launched side by side take
# them in turn instead of one program running them all (the expert's weights stay in L2 between them).
# `scripts/moe_kernel_sweep.py --splits` on one H100 (2026-11-27; the N/K tiles below, 128 rows per pass, both
# kernels of one layer):
#   2048 tokens (128 per expert): M_SPLITS 2 817 us vs 1057 us for 1 (and 1247 us for torch._grouped_mm)
#   4096 tokens (256 per expert): M_SPLITS 3 1214 us vs 1667 us for torch._grouped_mm
#   8192 tokens (512 per expert): M_SPLITS 4 2412 us vs 2837 us for torch._grouped_mm
# At 1024 tokens splitting changed nothing (510 vs 514 us on an H200). Outputs are the same bits for any M_SPLITS.
# 8192 tokens again with tail passes (`--tails`, one H100, 2026-12-07): M_SPLITS 5 2198 us vs 2369 for 4, and
# 2170 us with TAIL_ROWS 32.
# Wider or deeper tiles for these loads, `--large --sizes 2048,4096` (one H100, 2026-12-07, both kernels; the tiles
# below 779 / 1168 us): gate_up with 128 output columns (half the re-reads of each expert's gathered rows from L2)
# 836 / 1228 us, with BLOCK_K 32 and 4-5 stages 953 / 1325 us; down with BLOCK_K 32 and 6 stages 861 / 1246 us,
# 128 columns with 4 warps 845 / 1324 us, a third program per expert 778 / 1168 us. None kept.
# (max mean assignments per expert, gate_up tile, down tile), first match wins.
LARGE_TILES = (
    (64, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4)),
    (128, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3, M_SPLITS=2),
     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, M_SPLITS=2)),
    (256, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3, M_SPLITS=3),
     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, M_SPLITS=3)),
    (512, dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3, M_SPLITS=5),
     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, M_SPLITS=5)),
)


# FP8 weights (one byte each), `scripts/moe_kernel_sweep.py --fp8 --sizes 256,1024,2048` on one H100 (2026-11-27,
# both kernels of one layer, 10 + 10 tiles a size): 256 tokens 358 us (bf16 weights: 570 us). With busier experts
# the widened weight tile must be the product's first operand (SWAP_AB, which Hopper's MMA reads from registers):
# 1024 tokens 631 us (bf16: 697 us; 699 us unswapped), 2048 tokens 927 us (bf16: 847 us; 1074 us unswapped).
FP8_GATE_UP_TILE = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
FP8_DOWN_TILE = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
_FP8_SWAPPED = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, SWAP_AB=True)


# 256 and 512 per expert (16 and 32 canvases) keep the bf16 tiles: SWAP_AB was not measured there.
FP8_LARGE_TILES = ((64, _FP8_SWAPPED, _FP8_SWAPPED),
                   (128, dict(_FP8_SWAPPED, M_SPLITS=2), dict(_FP8_SWAPPED, M_SPLITS=2)),
                   *LARGE_TILES[2:])


# Rows of the shorter product that takes a group's last rows where they are this few (`fused_moe` TAIL_M; 0: none):
# an expert with 150 assignments then runs one 128-row and one 32-row product instead of two 128-row ones.
# `scripts/moe_kernel_sweep.py --tails`, one H100 (2026-12-07), both kernels of a layer: 1024 tokens 700 -> 702 us
# (16/32) or 698 (64); 2048 tokens 816 -> 809 us; 8192 tokens 2198 -> 2170 us (M_SPLITS 5). In the whole step
# (`scripts/flags_ab.py`, one round, same process): b8 54.51 -> 54.00 ms, b16 98.71 -> 98.17 ms, b1 and AR
# unchanged (their tiles are shorter than 32 rows or hold no tail); 64 rows cost 0.5 ms at b1.
TAIL_ROWS = 32


# A few decoded tokens' experts with a program per assignment (`fused_moe.DIRECT_MAX_ASSIGNMENTS`): gate/up with
# 32 columns a program, so a token's 8 assignments x 22 column blocks give 176 programs for 132 SMs (64 columns gave
# 88); down at the canvas's small-load tile, 8 x 22. `bash scripts/ar_knobs_ab.sh` (ROUNDS=2), one H100, one process
# (2026-12-08): AR 290.5 / 290.5 -> 291.5 / 291.2 tok/s; then three rounds, 290.4 / 290.3 / 290.4 -> 291.4 / 291.0 /
# 291.1. The other 15 knobs (8 warps, K 64 or 256, other down tiles, the few-row products' rows, K and warps,
# flash decoding's slices) tied or lost. Neither tile spills on sm_90 (`scripts/kernel_spills.py`).
# The down tile: TMA loads with the weights as the product's first operand (wgmma fed by TMA; no ldmatrix, no
# cp.async on sm_90). `bash scripts/tma_ab.sh ar`, one H100 (lease K, 2026-12-08), three rounds of 384 tokens: AR
# 291.0 / 291.2 / 291.4 -> 294.9 / 295.1 / 295.0 tok/s; TMA alone 293.5 / 292.8 / 293.0, TMA in both products
# 293.4 / 293.4 / 293.4.
DIRECT_GATE_UP_TILE = dict(GATE_UP_TILE, BLOCK_N=32)
DIRECT_DOWN_TILE = dict(DOWN_TILE, SWAP_AB=True, TMA=True)


# Loads through Hopper's tensor-memory accelerator (`fused_moe` TMA): each weight tile, and the down product's rows
# (consecutive in the grouped order), copied to shared memory as one box by the TMA unit instead of by every thread's
# address arithmetic and `cp.async`. A tile may ask for it (DIRECT_DOWN_TILE above); these switch it on per product
# from this many mean assignments per expert on (0: every load; None: never). One H100 (2026-12-08, `bash
# scripts/tma_ab.sh steps`, two rounds): step b1 22.36 / 22.59 ms by default, 22.42 / 22.40 with TMA in the down
# product, 22.53 / 22.46 in both; b8 54.78 / 55.07, 54.65 / 54.81, 54.86 / 55.26: ties, so canvases keep pointer
# loads. (SGLang measured TMA in its down product at 45 -> 81% of its roofline on 8K-token prefills.)
TMA_GATE_UP_FROM: float | None = None
TMA_DOWN_FROM: float | None = None


def tiles_for(assignments: int, num_experts: int, fp8: bool = False, direct: bool = False) -> tuple[dict, dict]:
    """(gate_up tile, down tile) for a call with this many token-expert assignments; `fp8`: one-byte weights;
    `direct`: a program per assignment (bf16 only has tiles of its own)."""
    per_expert = assignments / num_experts
    tiles = (FP8_GATE_UP_TILE, FP8_DOWN_TILE) if fp8 else (GATE_UP_TILE, DOWN_TILE)
    if direct and not fp8:
        tiles = (DIRECT_GATE_UP_TILE, DIRECT_DOWN_TILE)
    if per_expert > 32:
        tiles = next(((g, d) for limit, g, d in (FP8_LARGE_TILES if fp8 else LARGE_TILES) if per_expert <= limit),
                     tiles)
    tma = [start is not None and per_expert >= start for start in (TMA_GATE_UP_FROM, TMA_DOWN_FROM)]
    return tuple(dict(t, TAIL_M=TAIL_ROWS, TMA=on or t.get("TMA", False)) for t, on in zip(tiles, tma))
