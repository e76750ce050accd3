"""Time the fused Triton MoE kernels against torch._grouped_mm on the 26b-a4b expert shapes, and sweep tiles.

python scripts/moe_kernel_sweep.py [--quick | --splits] [--sizes 256,512,1024,2048]  (needs a Hopper GPU). Also
times the fused q/k norm+RoPE kernel. Without --quick it sweeps both kernels' tiles (rows per pass included) at every
size: several minutes a size. Rows per pass go up to 256: at 2048 tokens (8 canvases) experts get 128 assignments on
average and about half get more, so 128-row tiles stream those experts' weights twice.
--down sweeps only the down kernel's tiles at light loads (e.g. --down --sizes 256).
--splits times only the tiles in use with 64 or 128 rows per pass and 1 to 4 programs per expert (M_SPLITS), the
sweep behind moe_tiles.LARGE_TILES' splits (seconds a size; e.g. --splits --sizes 2048,4096,8192).
--tails times the tiles in use with each group's last rows in a shorter product (TAIL_M 0/16/32/64), at the
tiles' programs per expert and one more (e.g. --tails --sizes 1024,2048,4096,8192).
--large times wider tiles (more output columns per program, fewer re-reads of the gathered rows from L2) and deeper
pipelines for busier experts, each kernel with the other's tile in use, at the tiles' rows per pass, programs per
expert and tail (e.g. --large --sizes 2048,4096).
--fp8 times the kernels on FP8 weights (dgemma.model.fp8) against the same weights in bf16, with a short list of
FP8 tiles for each kernel (the sweep behind moe_tiles.FP8_*_TILE; e.g. --fp8 --sizes 256,2048).
--tma times the tiles in use with TMA loads (`moe_tiles.TMA_*_FROM`) off and on in each kernel, then a few TMA tiles
for each kernel (e.g. --tma --sizes 256,2048,8192).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

import dgemma.kernels.fused_moe as fm
from dgemma.kernels.moe_tiles import tiles_for
from dgemma.kernels.norm_rope import norm_rope_triton
from dgemma.model.layers import apply_rope, rms_norm
from dgemma.model.moe import experts_grouped

H, I, E, K = 2816, 704, 128, 8
dev, dt = "cuda", torch.bfloat16


def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=40)


def sweep_splits(run_fused, n: int) -> None:
    """The load's tiles with 64 or 128 rows per pass and 1 to 4 programs sharing each expert's passes."""
    gate_up, down = tiles_for(n * K, E)
    times = []
    for bm, splits in itertools.product((64, 128), (1, 2, 3, 4)):
        t1, t2 = dict(gate_up, BLOCK_M=bm, M_SPLITS=splits), dict(down, BLOCK_M=bm, M_SPLITS=splits)
        times.append((bench(lambda: run_fused(t1, t2)), bm, splits))
    for t, bm, splits in sorted(times):
        print(f"  BLOCK_M {bm} M_SPLITS {splits}: {t*1e3:.0f} us", flush=True)


def sweep_tails(run_fused, n: int) -> None:
    """The load's tiles with the group's last rows in a shorter product (TAIL_M rows; 0: none), at the tiles'
    programs per expert and one more."""
    gate_up, down = tiles_for(n * K, E)
    times = []
    for splits, tail in itertools.product({gate_up.get("M_SPLITS", 1), gate_up.get("M_SPLITS", 1) + 1},
                                          (0, 16, 32, 64)):
        t1, t2 = dict(gate_up, M_SPLITS=splits, TAIL_M=tail), dict(down, M_SPLITS=splits, TAIL_M=tail)
        if tail >= t1.get("BLOCK_M", 64):  # no shorter product than the tile's
            continue
        times.append((bench(lambda: run_fused(t1, t2)), splits, tail))
    for t, splits, tail in sorted(times):
        print(f"  M_SPLITS {splits} TAIL_M {tail}: {t*1e3:.0f} us", flush=True)


def sweep_down(run_fused, n: int) -> None:
    """The down kernel alone at light loads (batch 1: 16 assignments per expert), where it reads its weights at ~88%
    of the bandwidth gate_up reaches: rows per pass, N/K tiles, warps and stages; the 8 fastest printed."""
    times = []
    for bm, bn, bk, nw, ns in itertools.product((16, 32), (128, 256), (64, 128), (4, 8), (3, 4, 5)):
        t2 = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        try:
            times.append((bench(lambda: run_fused(None, t2)), str(t2)))
        except Exception as exc:  # out of shared memory etc.
            print("  down", t2, "failed", type(exc).__name__)
    for t, tile in sorted(times)[:8]:
        print(f"  down {tile}: {t*1e3:.0f} us (both kernels)", flush=True)


# (BLOCK_N, BLOCK_K, num_warps, num_stages, M_SPLITS or None for the tile's) for --large. gate_up with 64 columns
# re-reads an expert's gathered rows once per 64 of its 1408 output columns (~1 GB of L2 reads a layer at 2048
# tokens, as much as its weights); 128 columns halve that at the same registers per thread as down's 256.
LARGE_GATE_UP_CANDIDATES = [(64, 64, 8, 3, None), (128, 64, 8, 3, None), (128, 64, 8, 2, None), (128, 32, 8, 4, None),
                            (128, 32, 8, 5, None), (128, 64, 8, 3, 3), (64, 128, 8, 3, None), (128, 128, 8, 2, None)]
LARGE_DOWN_CANDIDATES = [(256, 64, 8, 4, None), (256, 32, 8, 6, None), (256, 64, 8, 3, None), (256, 128, 8, 2, None),
                         (128, 64, 4, 3, None), (128, 128, 8, 3, None), (256, 64, 8, 4, 3), (128, 64, 8, 4, None)]


def sweep_large(run_fused, n: int) -> None:
    """Each kernel's candidates with the other kernel's tile in use; the rest of the tile (rows per pass, programs per
    expert, tail) as moe_tiles gives it for this load."""
    gate_up, down = tiles_for(n * K, E)
    for label, base, candidates in (("gate_up", gate_up, LARGE_GATE_UP_CANDIDATES),
                                    ("down", down, LARGE_DOWN_CANDIDATES)):
        time_each(run_fused, label, (gate_up, down), [
            dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, M_SPLITS=splits or base.get("M_SPLITS", 1))
            for bn, bk, nw, ns, splits in candidates])


def time_each(run_fused, label: str, in_use: tuple[dict, dict], tiles: list[dict]) -> None:
    """Both kernels timed with each of `tiles` for the `label` kernel ("gate_up" or "down") and the other kernel's
    tile in use; printed fastest first (a tile that does not fit is reported and skipped)."""
    times = []
    for tile in tiles:
        pair = (tile, in_use[1]) if label == "gate_up" else (in_use[0], tile)
        try:
            times.append((bench(lambda: run_fused(*pair)), str(tile)))
        except Exception as exc:  # out of shared memory or registers
            print(f"  {label}", tile, "failed", type(exc).__name__, flush=True)
    for t, tile in sorted(times):
        print(f"  {label} {tile}: {t*1e3:.0f} us (both kernels)", flush=True)


# (BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB) for --tma, with TMA loads, at light loads (at most 32
# assignments per expert) and busier ones. The TMA unit takes the copies' address arithmetic off the threads (fewer
# registers: 236 instead of 242 for down's 128x256x64 tile on sm_90), so wider or deeper tiles than the pointer
# loads' may pay; some use at most ~100 KB of shared memory, so that two programs share an SM and one's stores
# overlap the other's loads. At light loads the tiles in use have fewer than 64 rows, so their products are mma.sync
# fed by ldmatrix from shared memory; with SWAP_AB the weights (64 or more output columns) are the product's first
# operand and the products become wgmma reading both operands where TMA put them (no ldmatrix, no cp.async in the
# down kernel's PTX for sm_90).
TMA_GATE_UP_CANDIDATES = {False: [(64, 128, 4, 5, False), (128, 128, 4, 3, False), (32, 128, 4, 4, False),
                                  (64, 64, 4, 4, False), (64, 128, 4, 4, True), (128, 128, 4, 3, True)],
                          True: [(128, 64, 8, 3, False), (64, 128, 8, 3, False), (64, 64, 8, 4, False),
                                 (64, 64, 4, 2, False), (128, 64, 8, 3, True)]}
TMA_DOWN_CANDIDATES = {False: [(128, 128, 4, 4, False), (256, 64, 4, 4, False), (128, 64, 4, 6, False),
                               (64, 128, 4, 4, False), (128, 64, 4, 4, True), (256, 64, 4, 4, True),
                               (128, 128, 4, 4, True)],
                       True: [(256, 128, 8, 2, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False),
                              (256, 64, 8, 3, False), (256, 32, 8, 6, False), (128, 64, 4, 3, False),
                              (256, 64, 8, 4, True)]}


def sweep_tma(run_fused, n: int) -> None:
    """The tiles in use with TMA loads off and on in each kernel, then each kernel's TMA candidates with the other
    kernel's tile in use (pointer loads); rows per pass, programs per expert and tail as moe_tiles gives them."""
    gate_up, down = tiles_for(n * K, E)
    for up_tma, down_tma in ((False, False), (True, False), (False, True), (True, True)):
        t = bench(lambda: run_fused(dict(gate_up, TMA=up_tma), dict(down, TMA=down_tma)))
        print(f"  tiles in use, TMA gate_up {up_tma!s:5s} down {down_tma!s:5s}: {t*1e3:.0f} us", flush=True)
    busy = n * K / E > 32
    for label, base, candidates in (("gate_up", gate_up, TMA_GATE_UP_CANDIDATES[busy]),
                                    ("down", down, TMA_DOWN_CANDIDATES[busy])):
        time_each(run_fused, label, (gate_up, down), [
            dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, SWAP_AB=swap, TMA=True)
            for bn, bk, nw, ns, swap in candidates])


# (BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP_AB): one-byte weights want about twice the K of the bf16 tiles per
# load; SWAP_AB makes the widened weight tile the product's first operand ([BLOCK_N, BLOCK_K] x [BLOCK_K, rows]).
FP8_GATE_UP_CANDIDATES = [(64, 256, 4, 4, False), (64, 128, 4, 4, False), (32, 256, 4, 4, False),
                          (128, 128, 4, 4, False), (64, 256, 8, 3, False), (128, 256, 8, 3, False),
                          (64, 128, 4, 4, True), (128, 128, 4, 4, True), (64, 256, 4, 3, True), (128, 64, 4, 4, True)]
FP8_DOWN_CANDIDATES = [(128, 128, 4, 4, False), (128, 64, 4, 4, False), (64, 256, 4, 4, False),
                       (256, 128, 8, 3, False), (64, 128, 4, 4, False), (128, 128, 8, 4, False),
                       (64, 128, 4, 4, True), (128, 128, 4, 4, True), (64, 256, 4, 3, True), (128, 64, 4, 4, True)]
# Busier experts (more than 32 assignments each): rows per pass and programs per expert as moe_tiles gives them.
FP8_LARGE_CANDIDATES = [(64, 64, 8, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False),
                        (128, 128, 8, 4, False), (64, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 128, 8, 3, True),
                        (64, 128, 4, 3, True), (256, 64, 8, 3, True)]


def fastest(label: str, tiles: list[dict], run, best: tuple) -> tuple:
    """(time, tile) of the fastest of `tiles` timed with run(tile), or `best` if none beats it; prints each."""
    for tile in tiles:
        try:
            t = bench(lambda: run(tile))
        except Exception as exc:  # out of shared memory etc.
            print(f"  {label}", tile, "failed", type(exc).__name__)
            continue
        print(f"  {label} {tile}: {t*1e3:.0f} us", flush=True)
        best = min(best, (t, tile), key=lambda r: r[0])
    return best


def sweep_fp8(sizes: list[int], best_out: str | None = None) -> None:
    from dgemma.model.fp8 import dequantize_rows, quantize_rows

    layers = 3
    gu = [torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
    dn = [torch.randn(E, H, I, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
    q = [(quantize_rows(g), quantize_rows(d)) for g, d in zip(gu, dn)]
    bytes_bf16 = (gu[0].numel() + dn[0].numel()) * 2
    bytes_fp8 = bytes_bf16 // 2 + (E * 2 * I + E * H) * 4
    bests = {}
    for n in sizes:
        x = torch.randn(n, H, device=dev, dtype=dt)
        w, ex = torch.topk(torch.randn(n, E, device=dev).softmax(-1), K)
        w = w / w.sum(-1, keepdim=True)
        (g8, gs), (d8, ds) = q[0]
        ref = experts_grouped(x, w, ex, dequantize_rows(g8, gs, dt), dequantize_rows(d8, ds, dt)).float()
        err = lambda out: ((out.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        i = [0]

        def run_bf16():
            i[0] = (i[0] + 1) % layers
            fm.fused_moe_triton(x, w, ex, gu[i[0]], dn[i[0]])

        def run_fp8(t1=None, t2=None):
            i[0] = (i[0] + 1) % layers
            (g8, gs), (d8, ds) = q[i[0]]
            return fm.fused_moe_triton(x, w, ex, g8, d8, t1, t2, scales=(gs, ds))

        def run_bf16_swapped():
            i[0] = (i[0] + 1) % layers
            t1, t2 = (dict(t, SWAP_AB=True) for t in tiles_for(n * K, E))
            fm.fused_moe_triton(x, w, ex, gu[i[0]], dn[i[0]], t1, t2)

        t_b, t_8 = bench(run_bf16), bench(run_fp8)
        try:
            print(f"N={n}: bf16 fused with SWAP_AB {bench(run_bf16_swapped)*1e3:.0f} us", flush=True)
        except Exception as exc:
            print(f"N={n}: bf16 fused with SWAP_AB failed", type(exc).__name__)
        i[0] = layers - 1  # the next run_fp8 reads layer 0, the reference's weights
        print(f"N={n}: bf16 fused {t_b*1e3:.0f} us ({bytes_bf16/t_b/1e9:.2f} TB/s), fp8 fused {t_8*1e3:.0f} us "
              f"({bytes_fp8/t_8/1e9:.2f} TB/s of fp8 bytes), rel err vs dequantized {err(run_fp8()):.2e}", flush=True)
        large = n * K / E > 32
        default_up, default_down = tiles_for(n * K, E, fp8=True)
        rows = {k: v for k, v in default_up.items() if k in ("BLOCK_M", "M_SPLITS")}  # large loads keep these
        up_tiles = [dict(rows, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, SWAP_AB=swap)
                    for bn, bk, nw, ns, swap in (FP8_LARGE_CANDIDATES if large else FP8_GATE_UP_CANDIDATES)]
        best_up = fastest("gate_up", up_tiles, lambda t1: run_fp8(t1, None), (t_8, None))
        down_candidates = FP8_LARGE_CANDIDATES + [(256, 64, 8, 4, False)] if large else FP8_DOWN_CANDIDATES
        down_tiles = [dict(rows, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, SWAP_AB=swap)
                      for bn, bk, nw, ns, swap in down_candidates]
        best_down = fastest("down", down_tiles, lambda t2: run_fp8(best_up[1], t2), (best_up[0], None))
        print(f"  fp8 best: {best_down[0]*1e3:.0f} us with gate_up {best_up[1]} and down {best_down[1]} "
              "(None: the default)", flush=True)
        if best_out:  # for scripts/fp8_ab.py --fp8-tiles: the best tiles of each size
            bests[n] = {"gate_up": best_up[1], "down": best_down[1]}
            with open(best_out, "w") as f:
                json.dump(bests, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="time the default tiles only")
    p.add_argument("--splits", action="store_true", help="time rows per pass x programs per expert only")
    p.add_argument("--tails", action="store_true", help="time tail passes (TAIL_M) with the tiles in use only")
    p.add_argument("--down", action="store_true", help="sweep the down kernel's tiles only (light loads)")
    p.add_argument("--large", action="store_true", help="wider tiles and deeper pipelines for busier experts only")
    p.add_argument("--fp8", action="store_true", help="FP8 weights against bf16, and a short FP8 tile sweep")
    p.add_argument("--tma", action="store_true", help="TMA loads off and on in each kernel, and TMA tiles, only")
    p.add_argument("--best-out", default=None, help="with --fp8: write each size's best tiles to this JSON file")
    p.add_argument("--sizes", default="256,512,1024,2048", help="token counts (x top-8 assignments)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.fp8:
        sweep_fp8([int(v) for v in args.sizes.split(",")], args.best_out)
        return
    layers = 3  # rotate over 3 layers' weights so nothing stays in L2
    gu = [torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
    dn = [torch.randn(E, H, I, device=dev, dtype=dt) * 0.02 for _ in range(layers)]
    nbytes = gu[0].numel() * 2 + dn[0].numel() * 2
    for n in [int(v) for v in args.sizes.split(",")]:
        x = torch.randn(n, H, device=dev, dtype=dt)
        probs = torch.randn(n, E, device=dev).softmax(-1)
        w, ex = torch.topk(probs, K)
        w = w / w.sum(-1, keepdim=True)
        per_expert = torch.bincount(ex.flatten(), minlength=E)
        print(f"N={n}: assignments per expert mean {per_expert.float().mean():.0f}, max {per_expert.max()}", flush=True)
        ref = experts_grouped(x, w, ex, gu[0], dn[0])
        out = fm.fused_moe_triton(x, w, ex, gu[0], dn[0])
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        i = [0]

        def run_ref():
            i[0] = (i[0] + 1) % layers
            experts_grouped(x, w, ex, gu[i[0]], dn[i[0]])

        def run_fused(t1=None, t2=None):
            i[0] = (i[0] + 1) % layers
            fm.fused_moe_triton(x, w, ex, gu[i[0]], dn[i[0]], t1, t2)

        t_ref, t_f = bench(run_ref), bench(run_fused)
        print(f"N={n}: grouped_mm {t_ref*1e3:.0f} us ({nbytes/t_ref/1e9:.2f} TB/s), fused {t_f*1e3:.0f} us "
              f"({nbytes/t_f/1e9:.2f} TB/s), rel err {err:.2e}", flush=True)
        if args.splits:
            sweep_splits(run_fused, n)
        if args.down:
            sweep_down(run_fused, n)
        if args.tails:
            sweep_tails(run_fused, n)
        if args.large:
            sweep_large(run_fused, n)
        if args.tma:
            sweep_tma(run_fused, n)
        if args.quick or args.splits or args.down or args.tails or args.large or args.tma:
            continue
        # Tiles are swept per size, rows per pass (BLOCK_M) included: busier experts want taller tiles.
        best = (t_f, None)
        for bm, bn, bk, nw, ns in itertools.product([64, 128, 256], [32, 64, 128], [64, 128], [4, 8], [3, 4]):
            t1 = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            try:
                t = bench(lambda: run_fused(t1, None))
            except Exception as exc:  # out of shared memory etc.
                print("  gate_up", t1, "failed", type(exc).__name__)
                continue
            if t < best[0]:
                best = (t, t1)
        best2 = (best[0], None)
        for bm, bn, bk, nw, ns in itertools.product([64, 128, 256], [32, 64, 128, 256], [64, 128], [4, 8], [3, 4]):
            t2 = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            try:
                t = bench(lambda: run_fused(best[1], t2))
            except Exception as exc:
                print("  down", t2, "failed", type(exc).__name__)
                continue
            if t < best2[0]:
                best2 = (t, t2)
        # An expert's passes shared by 2 programs launched side by side (M_SPLITS), on the best tiles and on
        # half-height ones.
        for which in ("gate_up", "down"):
            default = tiles_for(n * K, E)[0 if which == "gate_up" else 1]
            base = dict((best if which == "gate_up" else best2)[1] or default)
            base.setdefault("BLOCK_M", fm._block_m(n * K, E))
            for split in ([dict(base, M_SPLITS=2)] + ([dict(base, BLOCK_M=base["BLOCK_M"] // 2, M_SPLITS=2)]
                                                      if base.get("BLOCK_M", 0) >= 128 else [])):
                pair = (split, best2[1]) if which == "gate_up" else (best[1], split)
                try:
                    t = bench(lambda: run_fused(*pair))
                except Exception as exc:
                    print(f"  {which}", split, "failed", type(exc).__name__)
                    continue
                print(f"  {which} {split}: {t*1e3:.0f} us", flush=True)
                if t < best2[0]:
                    best, best2 = (t, pair[0]), (t, pair[1])
        print(f"  best: {best2[0]*1e3:.0f} us with gate_up {best[1]} and down {best2[1]}", flush=True)

    for d, heads in [(256, 16), (256, 8), (512, 16)]:
        xq = torch.randn(1, 256, heads, d, device=dev, dtype=dt)
        wt = torch.randn(d, device=dev, dtype=dt)
        cos = torch.randn(1, 256, d, device=dev, dtype=dt)
        sin = torch.randn(1, 256, d, device=dev, dtype=dt)
        ref = apply_rope(rms_norm(xq, wt, 1e-6), cos, sin)
        out = norm_rope_triton(xq, wt, cos, sin, 1e-6)
        err = (out.float() - ref.float()).abs().max().item()
        t_e = bench(lambda: apply_rope(rms_norm(xq, wt, 1e-6), cos, sin))
        t_k = bench(lambda: norm_rope_triton(xq, wt, cos, sin, 1e-6))
        print(f"norm+rope D={d} heads={heads}: eager {t_e*1e3:.1f} us, fused {t_k*1e3:.1f} us, max err {err:.3g}")


if __name__ == "__main__":
    main()
