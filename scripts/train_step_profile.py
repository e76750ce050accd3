"""Where the mini model's training step spends its device time, and what CUDA graphs and torch.compile change.

    python scripts/train_step_profile.py [eager] [graphs] [compiled] [compiled_layers] [--batch 256] [--width 128]
        [--rows 25] [--device cpu]

One step = the trainer's: the block-diffusion objective (2 noisy copies per row, self-conditioning) forward and
backward under bf16 autocast, float32 master weights, gradient clipping and the fused AdamW, on random tokens
(rows of `width` tokens, the last 40 the response). Variants: eager; graphs (the CUDA graph `dgemma train`
replays); compiled (`--compile objective`, under the graph); compiled_layers (`--compile layers`, under the graph).
A variant with the suffix "+sparse" (e.g. graphs+sparse) computes only each token's top-2 experts, as grouped matrix
products (`--moe-impl model`: torch._grouped_mm in bf16 on a GPU), instead of all 8 side by side (`dense`); "+muon"
steps with Muon and AdamW (`--optimizer muon`) instead of AdamW alone. Suffixes combine: graphs+sparse+muon.
Per variant: wall and device ms per step (mean of 10 after 3 warm-up steps), kernels per step, the setup time
(compile included), and a table of the top kernels by device time ("eager" groups the operators by input shape
instead). With --device cpu (float32, no graph, no profile): wall per step and setup only.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.checkpoint.random_init import build_random_model
from dgemma.train.dataset import collate
from dgemma.train.objective import ObjectiveConfig
from dgemma.train.optim import build_optimizer
from dgemma.train.step_graphs import GraphedLossStep
from dgemma.train.trainer import MasterWeights, model_preset, training_objective, use_dense_experts


def run(variant: str, batch, rows: int, device: torch.device) -> None:
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model = build_random_model(model_preset("mini", 1024, [1]), torch.float32, device, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    label = variant
    variant, *suffixes = variant.split("+")
    if "sparse" not in suffixes:
        use_dense_experts(model)
    model.set_kernel_devices(())
    master = MasterWeights(model, torch.bfloat16 if cuda else None)
    optimizer = build_optimizer("muon" if "muon" in suffixes else "adamw", master.named(), 1e-3, 0.1, (0.9, 0.95))
    loss = training_objective(model, ObjectiveConfig(noise_samples=2),
                              "inductor" if variant.startswith("compiled") else None,
                              "layers" if variant == "compiled_layers" else "objective")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    step = GraphedLossStep(master.model_params, lambda b: loss(b, None), autocast,
                           capture=cuda and variant != "eager")

    def train_step():
        step.step(batch, device)
        master.gradients_to_master()
        torch.nn.utils.clip_grad_norm_(master.params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master.master_to_model()

    sync = torch.cuda.synchronize if cuda else lambda: None
    for _ in range(3):
        train_step()
    sync()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        train_step()
    sync()
    wall_ms = (time.perf_counter() - start) * 100
    if not cuda:
        print(f"{label}: {wall_ms:.1f} ms wall a step, setup {setup_s:.1f} s (3 steps, compile included)", flush=True)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=variant == "eager") as prof:
        train_step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in events) / 1e3
    kernels = sum(e.count for e in events if e.self_device_time_total > 0)
    print(f"{label}: {wall_ms:.1f} ms wall a step, {device_ms:.1f} ms of device time, {kernels} kernels, "
          f"setup {setup_s:.0f} s", flush=True)
    if variant == "eager":
        ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0
               and (e.key.startswith("aten::") or e.key.startswith("_"))]
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:rows]:
            print(f"  {e.self_device_time_total / 1e3:6.2f} ms x{e.count:4d} {e.key:30s} {str(e.input_shapes)[:110]}")
    else:
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=80), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="*", default=["eager", "graphs", "compiled"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    bases = [v.split("+")[0] for v in args.variants]
    unknown = set(bases) - {"eager", "graphs", "compiled", "compiled_layers"}
    unknown |= {s for v in args.variants for s in v.split("+")[1:]} - {"sparse", "muon"}
    if unknown or (device.type != "cuda" and "graphs" in bases):
        p.error(f"variants: eager, graphs (CUDA only), compiled, compiled_layers, each with optional suffixes "
                f"+sparse and +muon; "
                f"got {args.variants}")
    rng = random.Random(0)
    examples = [([rng.randrange(3, 1024) for _ in range(args.width)], args.width - 40) for _ in range(args.batch)]
    batch = collate(examples, model_preset("mini", 1024, [1]).canvas_length, 0, rng).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(name, torch.__version__, f"batch {args.batch} x {args.width} tokens", flush=True)
    for variant in args.variants:
        run(variant, batch, args.rows, device)


if __name__ == "__main__":
    main()
