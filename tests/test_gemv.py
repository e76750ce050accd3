"""Products of a few rows (autoregressive tokens) through `dgemma.kernels.gemv`, and programmatic dependent launch.

The choice tests run everywhere. The numeric tests run the kernel on a CPU through the Triton interpreter and are
skipped unless TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_gemv.py`); tests/test_gpu.py checks
bfloat16 and the launches with PDL on an H100.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_wiring import count_calls, interpreted, rel_err

from dgemma.model import layers
from dgemma.model.layers import linear, use_gemv


def weights(n: int, k: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)).to(dtype)


def test_only_a_few_rows_in_inference_on_a_kernel_device_take_the_few_row_kernel(monkeypatch):
    w = weights(32, 16)
    with torch.no_grad():
        for rows in (1, 2, layers.GEMV_MAX_ROWS):
            assert use_gemv(torch.empty(rows, 16), w, ("cpu",))
        assert use_gemv(torch.empty(1, 1, 16), w, ("cpu",))  # [B, T, H] with one token
        assert not use_gemv(torch.empty(layers.GEMV_MAX_ROWS + 1, 16), w, ("cpu",))  # a canvas: cuBLAS
        assert not use_gemv(torch.empty(1, 16), w, ())  # a CPU is not a kernel device unless named
        assert not use_gemv(torch.empty(1, 16, dtype=torch.float16), w, ("cpu",))  # dtypes differ
        assert not use_gemv(torch.empty(1, 32), w.t(), ("cpu",))  # a transposed view
        monkeypatch.setattr(layers, "GEMV_MAX_ROWS", 0)
        assert not use_gemv(torch.empty(1, 16), w, ("cpu",))  # switched off
    assert not use_gemv(torch.empty(1, 16), w, ("cpu",))  # training: the kernel has no backward


def test_linear_without_the_kernel_is_f_linear():
    x, w = torch.randn(3, 16), weights(8, 16)
    assert torch.equal(linear(x, w, ()), F.linear(x, w))


def test_the_few_row_kernel_rejects_a_weight_that_does_not_fit():
    pytest.importorskip("triton")
    from dgemma.kernels.gemv import gemv_triton

    with pytest.raises(ValueError, match="contiguous \\[N, 16\\] weight"):
        gemv_triton(torch.randn(1, 16), weights(8, 12))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        gemv_triton(torch.randn(1, 16), weights(8, 16, torch.float16))


def test_launches_on_a_cpu_never_ask_for_programmatic_dependent_launch():
    pytest.importorskip("triton")
    from dgemma.kernels.launch import pdl_options

    assert pdl_options(torch.device("cpu"), 1) == {"PDL": False}


@interpreted
@pytest.mark.parametrize("rows,n,k", [(1, 37, 100), (3, 64, 300), (4, 5, 16), (2, 130, 4096 + 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_few_row_products_equal_f_linear(rows, n, k, dtype, monkeypatch):
    """Ragged N and K, several rows, and K over several loads (`MAX_BLOCK_K` lowered to 64 for the second case):
    float32 sums of the same products as F.linear, so within a few ulps of the output dtype."""
    from dgemma.kernels import gemv

    if k == 300:
        monkeypatch.setattr(gemv, "MAX_BLOCK_K", 64)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = weights(n, k, dtype)
    got = gemv.gemv_triton(x, w)
    want = F.linear(x.double(), w.double())
    assert got.shape == (rows, n) and got.dtype == dtype
    assert (got.double() - want).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-3) * want.abs().max()


@interpreted
def test_interpreted_token_by_token_forward_runs_every_dense_product_through_the_kernel(monkeypatch):
    """One token of the tiny model's encoder (autoregressive decoding) with the kernels on: q/k/v, o, the dense MLP's
    gate/up and down, the router and the LM head each run as the few-row kernel, and the logits are those of the
    eager products."""
    from dgemma.checkpoint.random_init import InitScale, build_random_model
    from dgemma.kernels import gemv
    from dgemma.model.attention import AttentionBatch
    from dgemma.model.kv_cache import KVCache

    model = build_random_model("tiny", "float32", "cpu", seed=1, scale=InitScale(embed_std=1.0, perturb=0.1))
    model.pack_projections()
    cfg = model.config
    prompt = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    calls = {}
    count_calls(monkeypatch, calls, gemv, "gemv_triton", "gemv")
    logits = []
    for devices in ((), ("cpu",)):
        model.set_kernel_devices(devices)
        cache = KVCache(cfg, 1, 16, model.dtype, "cpu")
        with torch.no_grad():
            model.encode(prompt[:, :11], AttentionBatch.for_encoder([0], [0], [11], cfg.sliding_window, cache), cache)
            hidden = model.encode(prompt[:, 11:], AttentionBatch.for_encoder([0], [11], [1], cfg.sliding_window,
                                                                             cache), cache)
            logits.append(model.logits(hidden[:, 0]))
    assert calls["gemv"] == 5 * cfg.num_layers + 1  # q/k/v, o, MLP gate/up and down, router; the LM head
    assert rel_err(logits[1], logits[0]) < 1e-5
