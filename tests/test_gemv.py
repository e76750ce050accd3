"""Products of a few rows (autoregressive tokens) through `dgemma.kernels.gemv`, the kernels that add a tail to
them (`dgemma.kernels.last_program`), and programmatic dependent launch.

The choice tests run everywhere. The numeric tests run the kernel on a CPU through the Triton interpreter and are
skipped unless TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_gemv.py`); tests/test_gpu.py checks
bfloat16 and the launches with PDL on an H100.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_wiring import interpreted, rel_err

from dgemma.model import layers
from dgemma.model.layers import linear, use_gemv


def tiny_model(dtype: str = "float32"):
    """The tiny preset on the CPU, prepared for inference (packed projections, the tails' counters)."""
    from dgemma.checkpoint.random_init import InitScale, build_random_model

    model = build_random_model("tiny", dtype, "cpu", seed=1, scale=InitScale(embed_std=1.0, perturb=0.1))
    model.prepare_inference()
    return model


def token_logits(model, capacity: int = 16) -> torch.Tensor:
    """The logits [1, V] of one decoded token (autoregressive decoding) after an 11-token prompt, through the
    encoder: the prompt is more rows than the few-row kernels take, the token goes through them. A decoded token's
    attention reads the cache's whole capacity (cut into key slices from 128 slots on)."""
    from dgemma.model.attention import AttentionBatch
    from dgemma.model.kv_cache import KVCache

    cfg = model.config
    prompt = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache(cfg, 1, capacity, model.dtype, "cpu")
    with torch.no_grad():
        model.encode(prompt[:, :11], AttentionBatch.for_encoder([0], [0], [11], cfg.sliding_window, cache), cache)
        hidden = model.encode(prompt[:, 11:], AttentionBatch.for_encoder([0], [11], [1], cfg.sliding_window, cache),
                              cache)
        return model.logits(hidden[:, 0])


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
    from dgemma.kernels import gemv

    model = tiny_model()
    cfg = model.config
    calls = {"gemv": 0}
    real = gemv.gemv_triton

    def spy(*args):
        calls["gemv"] += 1
        return real(*args)

    monkeypatch.setattr(gemv, "gemv_triton", spy)
    logits = []
    for devices in ((), ("cpu",)):
        model.set_kernel_devices(devices)
        logits.append(token_logits(model))
    assert calls["gemv"] == 5 * cfg.num_layers + 1  # q/k/v, o, MLP gate/up and down, router; the LM head
    assert rel_err(logits[1], logits[0]) < 1e-5


@interpreted
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_router_with_routing_as_its_tail_equals_the_two_kernels(rows, dtype):
    """`router_triton`: the router's product whose last program routes gives the bits of the product kernel
    followed by the routing kernel, leaves its counter at 0, and does so launch after launch."""
    from dgemma.kernels.gemv import gemv_triton
    from dgemma.kernels.routing import route_top_k, router_triton

    gen = torch.Generator().manual_seed(rows)
    e, h, k = 37, 100, 8  # ragged: E is not a multiple of the product's rows a program
    proj = weights(e, h, dtype)
    scale = (0.5 + torch.rand(e, generator=gen)).to(dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    for _ in range(2):
        z = torch.randn(rows, h, generator=gen).to(dtype)
        want_w, want_ids = route_top_k(gemv_triton(z, proj), scale, k)
        got_w, got_ids = router_triton(z, proj, scale, k, counter)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
        assert counter.item() == 0


def test_the_one_launch_router_needs_its_counter_and_loses_it_when_moved():
    """Without `set_counter` (a model not prepared for inference), or after a move or cast, the router takes its
    two kernels: the counter belongs to one device."""
    from dgemma.model.moe import Router

    router = Router(16, 8, 2, 1e-6)
    assert router.counter is None
    router.set_counter()
    assert router.counter is not None and router.counter.dtype == torch.int32 and router.counter.item() == 0
    router.to(torch.float64)
    assert router.counter is None


def test_the_one_launch_router_refuses_a_counter_it_cannot_use():
    pytest.importorskip("triton")
    from dgemma.kernels.routing import router_triton

    with pytest.raises(ValueError, match="counter int32 \\[1\\]"):
        router_triton(torch.randn(1, 16), weights(8, 16), torch.ones(8), 2, torch.zeros(1, dtype=torch.int64))


@interpreted
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_output_projection_with_the_residual_norms_as_its_tail_equals_the_two_kernels(rows, dtype):
    """`output_projection_residual_triton`: the output projection whose last program computes the residual and its
    three norms gives the bits of the product kernel followed by the residual norms' kernel, launch after launch."""
    from dgemma.kernels.gemv import gemv_triton
    from dgemma.kernels.residual_norms import attention_residual_triton, output_projection_residual_triton

    gen = torch.Generator().manual_seed(rows)
    h, heads_width = 40, 96  # ragged: 40 outputs over 4-row programs, a 64-wide norm block
    w_o = weights(h, heads_width, dtype)
    norms = [(0.5 + torch.rand(h, generator=gen)).to(dtype) for _ in range(4)]  # post-attn, dense, experts, router
    counter = torch.zeros(1, dtype=torch.int32)
    for _ in range(2):
        x = torch.randn(1, rows, h, generator=gen).to(dtype)
        heads = torch.randn(1, rows, heads_width, generator=gen).to(dtype)
        want = attention_residual_triton(x, gemv_triton(heads, w_o), *norms, h**-0.5, 1e-6)
        got = output_projection_residual_triton(x, heads, w_o, *norms, h**-0.5, 1e-6, counter)
        for g, w in zip(got, want, strict=True):
            assert g.shape == x.shape and torch.equal(g, w)
        assert counter.item() == 0


@interpreted
@pytest.mark.parametrize("b,t", [(1, 1), (2, 1), (1, 3)])  # a token; a token of each of two rows; three tokens
@pytest.mark.parametrize("k_as_v", [False, True])  # a sliding layer's q, k, v; a full layer's values are its keys
def test_interpreted_qkv_projection_with_the_head_norms_as_tails_equals_the_four_kernels(b, t, k_as_v):
    """`qkv_projection_triton`: the packed projection whose last program of each head normalises it (queries
    rotated into a new tensor, keys rotated and values into the cache at each token's row and slot) gives the bits
    of the product kernel and three norm kernels over `rope_cos_sin`'s tables, launch after launch."""
    from dgemma.config import AttentionSpec
    from dgemma.kernels.gemv import gemv_triton
    from dgemma.kernels.norm_rope import norm_rope_triton
    from dgemma.kernels.qkv_projection import qkv_projection_triton
    from dgemma.model.layers import rope_cos_sin, rope_inv_freq

    gen = torch.Generator().manual_seed(b * t)
    hq, hkv, d, h = 4, 2, 16, 48
    spec = AttentionSpec(head_dim=d, num_kv_heads=hkv, rope_theta=10_000.0, partial_rotary_factor=0.5)
    packed = weights((hq + (1 if k_as_v else 2) * hkv) * d, h, torch.float16)
    qw, kw = ((1 + 0.1 * torch.randn(d, generator=gen)).half() for _ in range(2))
    rows = torch.tensor([2, 0][:b])
    counters = torch.zeros(hq + 2 * hkv, dtype=torch.int32)
    for step in range(2):
        x = torch.randn(b, t, h, generator=gen).half()
        positions = torch.randint(0, 5000, (b, t), generator=gen)
        slots = torch.randint(0, 10, (b, t), generator=gen)
        caches = [[torch.zeros(3, 10, hkv, d, dtype=torch.float16) for _ in range(2)] for _ in range(2)]
        q = qkv_projection_triton(x, packed, qw, kw, positions, rope_inv_freq(spec), 1e-6, (hq, hkv),
                                  (*caches[0], rows, slots), counters)
        raw = gemv_triton(x, packed)  # [B, T, N]
        q_raw = raw[..., : hq * d].view(b, t, hq, d)
        k_raw = raw[..., hq * d : (hq + hkv) * d].view(b, t, hkv, d)
        v_raw = k_raw if k_as_v else raw[..., (hq + hkv) * d :].view(b, t, hkv, d)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(spec), torch.float16)
        norm_rope_triton(k_raw, kw, cos, sin, 1e-6, into=(caches[1][0], rows, slots))
        norm_rope_triton(v_raw, None, None, None, 1e-6, into=(caches[1][1], rows, slots))
        assert torch.equal(q, norm_rope_triton(q_raw, qw, cos, sin, 1e-6)), step
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1]), step
        assert (caches[0][0] != 0).any() and (caches[0][1] != 0).any()
        assert not counters.any()


@interpreted
@pytest.mark.parametrize("switches", [
    ("moe", "FUSED_ROUTER", "router_triton"),
    ("diffusion_gemma", "FOLD_OUTPUT_PROJECTION", "output_projection_residual_triton"),
    ("attention", "FUSED_QKV_PROJECTION", "qkv_projection_triton")])
def test_interpreted_token_by_token_forward_with_one_launch_tails_changes_no_bit(switches, monkeypatch):
    """`FUSED_ROUTER` (routing in the router's kernel), `FOLD_OUTPUT_PROJECTION` (the residual norms in the output
    projection's kernel) and `FUSED_QKV_PROJECTION` (the head norms in the q/k/v projection's kernel): one token of
    the tiny model's encoder gives the logits of the separate kernels, bit for bit but for the rotation's angles,
    with one launch a layer where there were two or four."""
    import importlib

    from dgemma.kernels import qkv_projection, residual_norms, routing

    module = importlib.import_module(f"dgemma.model.{switches[0]}")
    model = tiny_model()
    model.set_kernel_devices(("cpu",))
    cfg = model.config
    calls = []
    for kernels, name in ((routing, "router_triton"), (residual_norms, "output_projection_residual_triton"),
                          (qkv_projection, "qkv_projection_triton")):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    logits = []
    for on in (False, True):
        monkeypatch.setattr(module, switches[1], on)
        logits.append(token_logits(model))
    assert calls == [switches[2]] * cfg.num_layers
    if switches[1] == "FUSED_QKV_PROJECTION":
        # The kernel computes the rotation's cos and sin itself: under the interpreter NumPy's, which differ from
        # torch's in the last float32 bit at some angles. On a GPU both are the CUDA math library's, and the bf16
        # results agree bit for bit (tests/test_gpu.py).
        assert rel_err(logits[1], logits[0]) < 1e-6
    else:
        assert torch.equal(logits[1], logits[0])


@interpreted
def test_interpreted_token_forward_with_the_merge_as_attentions_tail_changes_no_bit(monkeypatch):
    """`cache_attention.MERGE_TAIL`: a decoded token's attention over key slices merges them in the attention
    kernel's tail, with the cache's counters, on every layer of the tiny model (their partials are small): no merge
    kernel runs, and the logits are the bits of the merge kernel's. (fp16: the attention kernel takes 16-bit
    activations.)"""
    from dgemma.kernels import cache_attention

    model = tiny_model("float16")
    model.set_kernel_devices(("cpu",))
    launches = []
    real = cache_attention._merge_splits_kernel
    monkeypatch.setattr(cache_attention, "_merge_splits_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    logits = []
    for on in (False, True):
        monkeypatch.setattr(cache_attention, "MERGE_TAIL", on)
        launches.clear()
        logits.append(token_logits(model, capacity=300))  # 4 slices of 64 keys
        assert (len(launches) == 0) == on, launches
    assert torch.equal(logits[1], logits[0])
