"""One training step of the random `mini` model on one GPU, eager RMSNorm vs the fused Triton norm with backward.

    python scripts/train_step_ab.py

bf16 under autocast with float32 master weights, dense experts, self-conditioning on, 80-token rows with a 30-token
response; 2 warm-up steps, then the mean of 5. Prints ms per step for both and the first step's loss (equal up to
rounding).
"""
import random, time, torch
import dgemma.kernels.rms_norm as K
from dgemma.train import trainer as T
from dgemma.train.objective import block_diffusion_loss, ObjectiveConfig
from dgemma.train.dataset import collate
from dgemma.checkpoint.random_init import build_random_model
fused = K.rms_norm_train_triton
def eager(x, w, eps):
    x32 = x.float(); out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return (out * w.float()).type_as(x)
cfg = T.model_preset("mini", 1024, [1])
rng = random.Random(0)
for B, L in ((256, 80), (512, 80), (1024, 80)):
    rows = [([rng.randrange(1024) for _ in range(L)], L - 30) for _ in range(B)]
    batch = collate(rows, cfg.canvas_length, 0, rng).to("cuda")
    res = {}
    for name, fn in (("eager", eager), ("fused", fused)):
        K.rms_norm_train_triton = fn
        model = build_random_model(cfg, torch.float32, "cuda", seed=0)
        for p in model.parameters(): p.requires_grad_(True)
        T.use_dense_experts(model); model.set_kernel_devices(())
        master = T.MasterWeights(model, torch.bfloat16)
        opt = torch.optim.AdamW(master.param_groups(0.1), lr=1e-3, fused=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                parts = block_diffusion_loss(model, batch, ObjectiveConfig(), g)
            parts.loss.backward(); master.gradients_to_master()
            torch.nn.utils.clip_grad_norm_(master.params, 1.0); opt.step(); opt.zero_grad(set_to_none=True); master.master_to_model()
            return parts.loss
        first = float(step().detach())
        for _ in range(2): step()
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5): step()
        torch.cuda.synchronize(); res[name] = ((time.perf_counter() - t) / 5 * 1e3, first)
    print(f"B={B} L={L}: eager {res['eager'][0]:.0f} ms/step, fused norm {res['fused'][0]:.0f} ms/step "
          f"({res['eager'][0]/res['fused'][0]:.2f}x); first loss {res['eager'][1]:.4f} vs {res['fused'][1]:.4f}", flush=True)
