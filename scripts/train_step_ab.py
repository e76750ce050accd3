"""One training step of the random `mini` model on one GPU, eager RMSNorm vs the fused Triton norm with backward.

    python scripts/train_step_ab.py

bf16 under autocast with float32 master weights, dense experts, self-conditioning on, 80-token rows with a 30-token
response; 2 warm-up steps, then the mean of 5. Prints ms per step for both and the first step's loss (equal up to
rounding).
"""

from __future__ import annotations

import random
import time

import torch

import dgemma.kernels.rms_norm as kernels
from dgemma.checkpoint.random_init import build_random_model
from dgemma.train import trainer
from dgemma.train.dataset import collate
from dgemma.train.objective import ObjectiveConfig, block_diffusion_loss
from dgemma.train.optim import build_optimizer

FUSED = kernels.rms_norm_train_triton


def eager_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5) * weight.float()).type_as(x)


def time_step(config, batch, norm) -> tuple[float, float]:
    """(ms per step, first loss) with `norm` as the training RMSNorm."""
    kernels.rms_norm_train_triton = norm  # dgemma.model.layers looks it up at each call
    model = build_random_model(config, torch.float32, "cuda", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    trainer.use_dense_experts(model)
    model.set_kernel_devices(())
    master = trainer.MasterWeights(model, torch.bfloat16)
    optimizer = build_optimizer("adamw", master.named(), 1e-3, 0.1, (0.9, 0.95))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = block_diffusion_loss(model, batch, ObjectiveConfig(), gen).loss
        loss.backward()
        master.gradients_to_master()
        torch.nn.utils.clip_grad_norm_(master.params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master.master_to_model()
        return loss.detach()

    first = float(step())
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / 5 * 1e3, first


def main() -> None:
    config = trainer.model_preset("mini", 1024, [1])
    rng = random.Random(0)
    for rows, length in ((256, 80), (512, 80), (1024, 80)):
        examples = [([rng.randrange(1024) for _ in range(length)], length - 30) for _ in range(rows)]
        batch = collate(examples, config.canvas_length, 0, rng).to("cuda")
        eager_ms, eager_loss = time_step(config, batch, eager_norm)
        fused_ms, fused_loss = time_step(config, batch, FUSED)
        print(f"batch {rows} x {length}: eager norm {eager_ms:.0f} ms/step, fused norm {fused_ms:.0f} ms/step "
              f"({eager_ms / fused_ms:.2f}x); first loss {eager_loss:.4f} vs {fused_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
