"""A canvas's dense products through `dgemma.kernels.gemm` (off by default: `layers.GEMM_MAX_ROWS`).

The choice tests run everywhere. The numeric tests run the kernel on a CPU through the Triton interpreter and are
skipped unless TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_gemm.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_wiring import interpreted, run, set_kernel_devices

from dgemma.checkpoint.random_init import InitScale, build_random_model
from dgemma.model import layers
from dgemma.model.layers import use_gemm


def weights(n: int, k: int, dtype=torch.float16) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * k**-0.5).to(dtype)


def test_only_a_canvas_of_rows_in_16_bit_inference_on_a_kernel_device_takes_the_tiled_kernel(monkeypatch):
    w = weights(32, 16)
    with torch.no_grad():
        assert not use_gemm(torch.empty(256, 16, dtype=torch.float16), w, ("cpu",))  # off by default
        monkeypatch.setattr(layers, "GEMM_MAX_ROWS", 256)
        assert use_gemm(torch.empty(256, 16, dtype=torch.float16), w, ("cpu",))
        assert use_gemm(torch.empty(1, 256, 16, dtype=torch.float16), w, ("cpu",))  # [B, T, H]: a canvas
        assert use_gemm(torch.empty(layers.GEMV_MAX_ROWS + 1, 16, dtype=torch.float16), w, ("cpu",))
        assert not use_gemm(torch.empty(layers.GEMV_MAX_ROWS, 16, dtype=torch.float16), w, ("cpu",))  # few rows
        assert not use_gemm(torch.empty(257, 16, dtype=torch.float16), w, ("cpu",))  # larger batches: cuBLAS
        assert not use_gemm(torch.empty(256, 16, dtype=torch.float16), w, ())  # not a kernel device
        assert not use_gemm(torch.empty(256, 16), w.float(), ("cpu",))  # float32: TF32 on tensor cores
        assert not use_gemm(torch.empty(256, 16, dtype=torch.bfloat16), w, ("cpu",))  # dtypes differ
        assert not use_gemm(torch.empty(256, 32, dtype=torch.float16), w.t(), ("cpu",))  # a transposed view
        lm_head = weights(layers.GEMM_MAX_OUTPUTS + 1, 16)
        assert not use_gemm(torch.empty(256, 16, dtype=torch.float16), lm_head, ("cpu",))  # the LM head: cuBLAS
    assert not use_gemm(torch.empty(256, 16, dtype=torch.float16), w, ("cpu",))  # training: no backward


def test_the_tiled_kernel_rejects_float32_and_a_weight_that_does_not_fit():
    pytest.importorskip("triton")
    from dgemma.kernels.gemm import gemm_triton

    with pytest.raises(ValueError, match="bfloat16 or float16 activations, got torch.float32"):
        gemm_triton(torch.randn(8, 16), weights(8, 16).float())
    with pytest.raises(ValueError, match="contiguous \\[N, 16\\] weight"):
        gemm_triton(torch.randn(8, 16).half(), weights(8, 12))


@interpreted
@pytest.mark.parametrize("rows,n,k", [(256, 64, 128), (37, 100, 72), (5, 16, 16), (130, 200, 300)])
def test_interpreted_canvas_products_equal_f_linear(rows, n, k):
    """Ragged rows, outputs and K (the masked last tiles and K steps), and exact tiles: float32 sums of the same
    products as F.linear, so within a few float16 ulps of the output's scale."""
    from dgemma.kernels.gemm import gemm_triton

    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).half()
    w = weights(n, k)
    tile = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)  # several tiles of each dimension
    got = gemm_triton(x, w, **tile)
    want = F.linear(x.double(), w.double())
    assert got.shape == (rows, n) and got.dtype == torch.float16
    assert (got.double() - want).abs().max() <= 2e-3 * want.abs().max()


@interpreted
def test_interpreted_canvas_forward_runs_its_dense_products_through_the_tiled_kernel(monkeypatch):
    """The tiny model's prompt and canvas with the kernels on, the tiled one too: every dense product of their rows
    but the LM head takes it, and the logits stay within float16 rounding of the forward without it."""
    from dgemma.kernels import gemm

    tiny_fp16 = build_random_model("tiny", "float16", "cpu", seed=1, scale=InitScale(embed_std=1.0, perturb=0.1))
    set_kernel_devices(tiny_fp16, ("cpu",))
    cfg = tiny_fp16.config
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, 40), generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen)
    soft = 3 * torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=gen)
    _, off = run(tiny_fp16, prompt, canvas, soft)
    shapes = []
    real = gemm.gemm_triton
    monkeypatch.setattr(gemm, "gemm_triton", lambda x, w, **t: shapes.append(tuple(w.shape)) or real(x, w, **t))
    monkeypatch.setattr(layers, "GEMM_MAX_ROWS", 256)
    monkeypatch.setattr(layers, "GEMM_MAX_OUTPUTS", cfg.vocab_size - 1)  # as the released model's 16384 < 262144
    _, on = run(tiny_fp16, prompt, canvas, soft)
    assert shapes and all(n <= layers.GEMM_MAX_OUTPUTS for n, _ in shapes)
    assert (cfg.vocab_size, cfg.hidden_size) not in shapes  # the LM head stays on F.linear
    assert (on - off).abs().max() <= 2e-2 * off.abs().max()
