"""GPU results agree with the CPU float32 path (skipped without CUDA).

bfloat16 keeps 8 bits of mantissa: each rounding is up to 2^-9 relative, and a forward through a few layers
accumulates many of them, so bf16 logits differ from float32 by ~1% of their scale. We check the relative
L2 error of the logits (< 3%) and that the most likely token agrees on almost every position (> 90%): a
wrong kernel (a missed norm, a wrong RoPE or routing) gives errors of order 100% and near-random argmaxes.
A float32 GPU run must match the CPU to rounding (1e-3 relative: TF32 is off for float32 matmuls by default).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dgemma.checkpoint.random_init import InitScale, build_random_model, preset
from dgemma.config import FULL, SLIDING
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(model, prompt, canvas, soft_logits):
    """Encoder KV of the prompt and decoder logits of a canvas, self-conditioned on soft_logits."""
    cfg, device = model.config, model.device
    n = prompt.shape[1]
    cache = KVCache(cfg, 1, n + cfg.canvas_length, model.dtype, device)
    with torch.no_grad():
        model.encode(prompt.to(device), AttentionBatch.for_encoder([0], [0], [n], cfg.sliding_window, cache), cache)
        soft = model.soft_embedding(soft_logits.to(device))
        logits = model.decode(canvas.to(device), AttentionBatch.for_decoder([0], [n], cfg.canvas_length,
                                                                              cfg.sliding_window, cache), cache, soft)
    return cache, logits.float().cpu()


def compare(config, scale, prompt_len, bf16_rel_tol=3e-2):
    cpu = build_random_model(config, "float32", "cpu", seed=1, scale=scale)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, prompt_len), generator=gen)
    canvas = torch.randint(0, config.vocab_size, (1, config.canvas_length), generator=gen)
    soft_logits = 3 * torch.randn(1, config.canvas_length, config.vocab_size, generator=gen)
    _, ref = run(cpu, prompt, canvas, soft_logits)
    results = {}
    for dtype in ("float32", "bfloat16"):
        gpu = cpu.to("cuda", getattr(torch, dtype))
        gpu.reset_buffers(torch.device("cuda"))
        _, logits = run(gpu, prompt, canvas, soft_logits)
        rel = ((logits - ref).norm() / ref.norm()).item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        results[dtype] = (rel, agree)
        cpu = build_random_model(config, "float32", "cpu", seed=1, scale=scale)  # .to() moved the weights
    print(results)
    assert results["float32"][0] < 1e-3, results
    assert results["bfloat16"][0] < bf16_rel_tol and results["bfloat16"][1] > 0.9, results


def test_tiny_preset_on_gpu_matches_cpu_float32():
    compare(preset("tiny"), InitScale(embed_std=1.0, perturb=0.1), prompt_len=100)


def test_a_slice_of_the_full_size_model_on_gpu_matches_cpu_float32():
    """Two layers (one sliding, one full: head_dim 512, k-as-v, proportional RoPE) of the released shapes,
    128 experts top-8, the 262144-token vocabulary, a prompt longer than the 1024-token window."""
    config = replace(preset("26b-a4b"), layer_types=[SLIDING, FULL])
    compare(config, InitScale(embed_std=0.03, perturb=0.1), prompt_len=1200)
