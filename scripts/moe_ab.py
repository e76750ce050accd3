"""A/B of one MoE change on the full-size model, in one process on the same random weights: the change's two
variants are swapped in place (module attributes looked up at each call, so newly captured graphs take them).

    python scripts/moe_ab.py combine [--preset 26b-a4b] [--skip-engine]   # combine kernel vs batched matmul
    python scripts/moe_ab.py splits  [--preset 26b-a4b] [--skip-engine]   # fused experts with M_SPLITS up to
                                                                           # 512 per expert vs before (no splits,
                                                                           # torch._grouped_mm over 128)
    options: --batches 1,8 (graphed step), --concurrency 1,8 (engine runs, 2 x concurrency requests, at least 4)

Prints the MoE piece alone at 256 to 8192 tokens (with the variants' relative difference), the graphed
denoising step at each of --batches and the 1024-token prefill for each variant (two alternating rounds), then the
engine's output throughput at each --concurrency (`dgemma bench`'s protocol: random 1024-token prompts, 1024 output
tokens, 16 steps, EOS ignored).
"""

from __future__ import annotations

import argparse

import torch

import dgemma.kernels.fused_moe as fused_moe
import dgemma.kernels.moe_tiles as moe_tiles
import dgemma.model.moe as moe
from dgemma.bench.measure import copy_bandwidth_gbps, decoder_step_ms, prefill_ms, run_concurrency, weight_bytes
from dgemma.checkpoint.random_init import build_random_model


def bmm_combine(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The combine before the kernel: [N, 1, K] x [N, K, H] batched matmul, weights rounded to the rows' dtype."""
    n, k = weights.shape
    return torch.bmm(weights.to(rows.dtype)[:, None, :], rows.view(n, k, -1))[:, 0]


def without_splits(tiles: tuple) -> tuple:
    """LARGE_TILES with every M_SPLITS removed (one program per expert tile: the layout before the splits)."""
    strip = lambda t: {k: v for k, v in t.items() if k != "M_SPLITS"}  # noqa: E731
    return tuple((limit, strip(gate_up), strip(down)) for limit, gate_up, down in tiles)


def variants(what: str) -> dict:
    """name -> function that switches the model to that variant (baseline first)."""
    if what == "combine":
        triton_combine = fused_moe.combine_triton
        return {"bmm": lambda: setattr(fused_moe, "combine_triton", bmm_combine),
                "triton": lambda: setattr(fused_moe, "combine_triton", triton_combine)}
    tiles, limit = moe_tiles.LARGE_TILES, moe.FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT

    def before():
        moe_tiles.LARGE_TILES = without_splits(tiles[:2])
        moe.FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT = 128

    def current():
        moe_tiles.LARGE_TILES, moe.FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT = tiles, limit

    return {"before": before, "current": current}


def piece(what: str, model, n: int) -> tuple:
    """(the changed piece as a function, its time in us) for n canvas tokens: the combine, or one layer's fused
    experts."""
    cfg = model.config
    k, hidden = cfg.top_k_experts, cfg.hidden_size
    if what == "combine":
        rows = torch.randn(n * k, hidden, device="cuda").to(torch.bfloat16)  # [N*K, H]
        weights = torch.rand(n, k, device="cuda")  # [N, K]
        fn = lambda: fused_moe.combine_triton(rows, weights)  # noqa: E731
    else:
        experts = model.layers[0].experts
        x = torch.randn(n, hidden, device="cuda").to(torch.bfloat16)  # [N, H]
        w, ex = torch.topk(torch.randn(n, cfg.num_experts, device="cuda").softmax(-1), k)  # [N, K] each
        w = w / w.sum(-1, keepdim=True)
        fn = lambda: experts(x, w, ex)  # noqa: E731  (the model's choice of path, as in a step)
    return fn, _time_us(fn)


def _time_us(fn, repeats: int = 100) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("combine", "splits"))
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--concurrency", default="1,8")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(torch.cuda.get_device_name(), flush=True)
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.pack_projections()
    switch = variants(args.what)
    for n in (256, 1024, 2048, 4096, 8192):
        times, outs = {}, {}
        for name, use in switch.items():
            use()
            torch.manual_seed(0)  # the same inputs for both variants
            with torch.no_grad():  # the fused kernels serve inference only
                fn, times[name] = piece(args.what, model, n)
                outs[name] = fn().float()
        a, b = outs.values()
        diff = ((a - b).norm() / b.norm()).item()
        print(f"{args.what}, {n} tokens: " + ", ".join(f"{name} {t:.1f} us" for name, t in times.items())
              + f" (relative difference {diff:.1e})", flush=True)
    floor = weight_bytes(model) / (copy_bandwidth_gbps(model.device) * 1e9) * 1e3
    print(f"per-step floor {floor:.2f} ms", flush=True)
    for round_ in range(2):
        for name, use in switch.items():
            use()
            steps = ", ".join(f"b{b} {decoder_step_ms(model, b, 1024, repeats=20):.2f} ms" for b in batches)
            print(f"round {round_} {name:7s}: step {steps}, prefill 1024 {prefill_ms(model, 1024):.2f} ms "
                  f"(floor {floor:.2f} ms)", flush=True)
    if args.skip_engine:
        return
    run_concurrency(model, 1, 1, 1024, 64, 16)  # warm-up
    for name, use in switch.items():
        use()
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            r = run_concurrency(model, concurrency, max(4, 2 * concurrency), 1024, 1024, 16)
            print(f"{name:7s} c{concurrency}: {r.output_tok_s:.1f} tok/s, decode {r.decode_tok_s:.1f} tok/s, "
                  f"TTFC p50 {r.ttfc_ms_p50:.0f} ms, latency p50 {r.latency_ms_p50:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
