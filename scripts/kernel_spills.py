"""Registers and spills of the engine's Triton kernels on Hopper (sm_90), at the released model's shapes and the
tiles the engine launches, without a GPU: each kernel is compiled to PTX by Triton and assembled by the `ptxas`
Triton ships, which reports what a thread uses. Pointers and the integers that are multiples of 16 at these shapes
carry the 16-byte alignment a launch gives them (`signature`), so the loads vectorise and pipeline as they do on the
GPU.

    python scripts/kernel_spills.py [--only moe,attention,products]

A spill is local memory: per thread, through L1 and, where it does not fit there, L2. In a kernel that streams
weights it competes with the stream; in a latency-bound one (a decoded token's attention) it lengthens the chain.
The table says where to look, not what is faster: tiles are chosen by timing them (`scripts/moe_kernel_sweep.py`,
`scripts/cache_attention_sweep.py`, `scripts/flags_ab.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dgemma.kernels import cache_attention, fused_moe, gemv
from dgemma.kernels.moe_tiles import tiles_for

H, I, E, K = 2816, 704, 128, 8  # hidden, expert width, experts, experts a token (26b-a4b)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def signature(names: str, types: dict[str, str], aligned: str = "",
              default: str = "*bf16") -> tuple[dict[str, str], dict[tuple, list]]:
    """Triton's signature from the kernel's argument names (pointers `default` unless typed, constexprs by name), and
    the attributes a launch would give them: 16-byte alignment for every pointer and for the integers in `aligned`
    (multiples of 16 at the released shapes). Without them Triton cannot vectorise the loads, and its pipeliner
    leaves them out (no `cp.async`): the kernel measured would not be the one that runs."""
    sig = {}
    for name in names.split():
        sig[name] = types.get(name, "constexpr" if name.isupper() and name not in types else default)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
             if kind.startswith("*") or name in aligned.split()}
    return sig, attrs


def report(label: str, fn, args: tuple[dict, dict], const: dict, warps: int, stages: int = 3) -> None:
    sig, attrs = args
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    ptx = compiled.asm["ptx"]
    copies = f"{len(re.findall(r'cp[.]async[.](?:ca|cg)', ptx))} cp.async"
    tma = len(re.findall(r"cp[.]async[.]bulk[.]tensor", ptx))
    print(f"  {label:64s} {warps} warps  {regs.group(1) if regs else '?':>3s} regs  spills "
          f"{spill.group(1) if spill else '?':>5s} B st / {spill.group(2) if spill else '?':>5s} B ld  "
          f"smem {compiled.metadata.shared // 1024} KB  {copies}{f', {tma} TMA' if tma else ''}", flush=True)


def products() -> None:
    print("few-row products (decoded tokens; 4 warps)")
    gemv_sig = signature("x_ptr w_ptr y_ptr N K stride_x stride_y M BLOCK_N BLOCK_K PDL PRELOAD",
                         {"N": "i32", "K": "i32", "stride_x": "i32", "stride_y": "i32"}, "N K stride_x stride_y")
    base = dict(BLOCK_N=gemv.BLOCK_N, PDL=True, PRELOAD=True)
    for m in (1, 4):
        report(f"gemv, {m} row(s), K <= 4096", gemv._gemv_kernel, gemv_sig, dict(base, M=m, BLOCK_K=4096),
               gemv.NUM_WARPS)


def moe() -> None:
    print("fused MoE at the tiles `tiles_for` picks (26b-a4b, bf16; * the loads in use)")
    types = {"scale_ptr": "*bf16", "token_ptr": "*i64", "dest_ptr": "*i64", "ends_ptr": "*i32",
             "experts_ptr": "*i64", "H": "i32", "I": "i32", "K_ROUTE": "i32"}
    flags = "BLOCK_M BLOCK_N BLOCK_K EVEN_N EVEN_K M_SPLITS SCALED SWAP_AB TAIL_M DIRECT TMA PDL"
    names = {"gate/up": f"x_ptr w_ptr scale_ptr token_ptr ends_ptr experts_ptr out_ptr H I K_ROUTE w_desc {flags}",
             "down": f"h_ptr w_ptr scale_ptr dest_ptr ends_ptr experts_ptr out_ptr H I w_desc a_desc a_tail_desc "
                     f"{flags}"}
    for tokens, what in ((1, "a decoded token"), (256, "a batch-1 canvas"), (1024, "4 canvases"),
                         (2048, "8 canvases"), (8192, "32 canvases")):
        assignments = tokens * K
        direct = assignments <= fused_moe.DIRECT_MAX_ASSIGNMENTS  # a program per assignment, 16-row tiles
        for name, fn, tile, n, k in zip(("gate/up", "down"), (fused_moe._gate_up_kernel, fused_moe._down_kernel),
                                        tiles_for(assignments, E, direct=direct), (I, H), (H, I)):
            for tma in (False, True):  # pointer loads and TMA loads; the tile says which is in use
                t = fused_moe._with_tail({"BLOCK_M": 16 if direct else fused_moe._block_m(assignments, E),
                                          "M_SPLITS": 1, "SWAP_AB": False, "TAIL_M": 0, **tile, "TMA": tma})
                warps, stages = t.pop("num_warps"), t.pop("num_stages")
                boxes = {"w_desc": (t["BLOCK_N"], t["BLOCK_K"]), "a_desc": (t["BLOCK_M"], t["BLOCK_K"]),
                         "a_tail_desc": (t["TAIL_M"], t["BLOCK_K"])}
                descs = {d: f"tensordesc<bf16[{r}, {c}]>" for d, (r, c) in boxes.items()
                         if d in names[name] and tma and r > 0}
                sig = signature(names[name], {**types, **{d: "constexpr" for d in boxes}, **descs}, "H I")
                const = dict(t, EVEN_N=n % t["BLOCK_N"] == 0, EVEN_K=k % t["BLOCK_K"] == 0, SCALED=False,
                             DIRECT=direct, PDL=tokens <= 256, **{d: None for d in boxes if d not in descs})
                const = {c: v for c, v in const.items() if c in sig[0]}
                shape = "x".join(str(t[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                extra = (", weights first" if t["SWAP_AB"] else "") + (", TMA" if tma else "")
                mark = "*" if tma == tile["TMA"] else " "  # the loads in use
                report(f"{mark}{name}, {what}: {shape}, {stages} st{extra}", fn, sig, const, warps, stages)


def attention() -> None:
    print("attention over the cache (`cache_attention`), the tiles in use")
    types = {"rows_ptr": "*i64", "start_ptr": "*i64", "end_ptr": "*i64", "part_ptr": "*fp32", "stats_ptr": "*fp32",
             "T": "i32", "HQ": "i32", "HKV": "i32", "G": "i32", "k_row_stride": "i32",
             "ring": "i32"}
    sig = signature("q_ptr k_ptr v_ptr rows_ptr start_ptr end_ptr out_ptr part_ptr stats_ptr T HQ HKV G k_row_stride "
                    "ring D BLOCK_M BLOCK_N BLOCK_D BLOCK_DV HAS_START RING SPLITS PDL", types, "HQ k_row_stride")
    ca = cache_attention
    for label, tile, d, sliding, splits in (
            ("decoded token, sliding layer", ca.DECODE_TILE, 256, True, 32),
            ("decoded token, full layer", ca.DECODE_TILE_FULL, 512, False, 64),
            ("canvas, sliding layer on a ring", ca.SLIDING_TILE, 256, True, 1),
            ("canvas, full layer, batch 1", ca.FULL_TILE_FEW_ROWS, 512, False, 1),
            ("canvas, full layer, batches", ca.FULL_TILE, 512, False, 1)):
        const = dict(D=d, BLOCK_M=tile["block_m"], BLOCK_N=tile["block_n"], BLOCK_D=min(tile["block_d"], d),
                     BLOCK_DV=min(tile["block_dv"], d), HAS_START=sliding, RING=sliding, SPLITS=splits, PDL=True)
        shape = f"{tile['block_m']} rows x {tile['block_n']} keys, dv {const['BLOCK_DV']}"
        report(f"{label}: {shape}", ca._cache_attention_kernel, sig, const, tile["num_warps"], tile["num_stages"])


def main() -> None:
    parts = {"products": products, "moe": moe, "attention": attention}
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(parts), help="comma-separated: " + ", ".join(parts))
    args = p.parse_args()
    if not os.access(PTXAS, os.X_OK):
        raise SystemExit(f"no ptxas at {PTXAS}: this needs Triton with its NVIDIA backend (pip install triton==3.6.0)")
    for name in args.only.split(","):
        if name not in parts:
            raise SystemExit(f"--only: unknown part {name!r}; choose from {', '.join(parts)}")
        parts[name]()


if __name__ == "__main__":
    main()
