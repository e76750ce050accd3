"""When the fused Triton kernels replace the eager attention norm+RoPE and routed experts, and that they compute
the same thing.

The choice tests run everywhere. The numeric tests run the kernels on a CPU through the Triton interpreter and
are skipped unless TRITON_INTERPRET=1 (they take ~70 s): `TRITON_INTERPRET=1 pytest tests/test_kernel_wiring.py`.
They need `triton` and NumPy < 2.4: from 2.4 NumPy refuses to turn the one-element arrays the interpreter makes of
scalars into Python ints, so every kernel loop with a run-time bound fails there.
The interpreter cannot check bfloat16 (its `tl.dot` multiplies bfloat16 tiles as raw 16-bit integers, and it
rounds float32 -> bfloat16 by truncation), so these use float16 and float32; tests/test_gpu.py checks bfloat16.
"""

from __future__ import annotations

import copy
import pytest
import torch
from kernel_wiring import (
    count_calls,
    argmax_agreement,
    attention_kernel_off_and_on,
    decode_attention_kernel_off_and_on,
    experts_kernel_off_and_on,
    inputs,
    interpreted,
    rel_err,
    ring_canvas,
    run,
    set_kernel_devices,
    spy_on_kernels,
)

from dgemma.checkpoint.random_init import InitScale, build_random_model, preset
from dgemma.config import FULL, SLIDING
from dgemma.model import attention
from dgemma.model.attention import AttentionBatch
from dgemma.model.layers import (
    apply_rope,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    use_fused_norm_rope,
)
from dgemma.model.moe import (
    FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT,
    experts_loop,
    use_fused_moe,
)



# ------------------------------------------------------------------------------------------------------------
# Which path runs (CPU tensors stand in for CUDA ones by naming "cpu" among the kernel devices)


def test_fused_moe_runs_only_for_inference_with_at_most_512_assignments_per_expert():
    gate_up = torch.empty(8, 64, 16, dtype=torch.bfloat16)  # E = 8
    fits = FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT * 8 // 2  # tokens at top-2 that give exactly 512 per expert
    x, ids = torch.empty(fits, 16, dtype=torch.bfloat16), torch.zeros(fits, 2, dtype=torch.int64)
    with torch.no_grad():
        assert use_fused_moe(x, ids, gate_up, kernel_devices=("cpu",))
        assert not use_fused_moe(x, ids, gate_up)  # a CPU is not a kernel device unless named
        big_x, big_ids = torch.empty(fits + 1, 16, dtype=torch.bfloat16), torch.zeros(fits + 1, 2, dtype=torch.int64)
        assert not use_fused_moe(big_x, big_ids, gate_up, kernel_devices=("cpu",))  # torch._grouped_mm wins
        assert use_fused_moe(x.half(), ids, gate_up.half(), kernel_devices=("cpu",))
        assert not use_fused_moe(x.float(), ids, gate_up.float(), kernel_devices=("cpu",))
        assert not use_fused_moe(x, ids, gate_up.float(), kernel_devices=("cpu",))  # the kernel needs one dtype
    assert not use_fused_moe(x, ids, gate_up, kernel_devices=("cpu",))  # grad enabled: the kernel has no backward


def test_busier_experts_get_the_tiles_measured_for_their_load(monkeypatch):
    from dgemma.kernels import moe_tiles
    from dgemma.kernels.moe_tiles import (
        DIRECT_DOWN_TILE,
        DIRECT_GATE_UP_TILE,
        DOWN_TILE,
        FP8_DOWN_TILE,
        FP8_GATE_UP_TILE,
        GATE_UP_TILE,
        LARGE_TILES,
        TAIL_ROWS,
        tiles_for,
    )

    def tail(tiles):  # every tile takes the tail passes' rows; TMA where its tile asks for it
        return tuple(dict(t, TAIL_M=TAIL_ROWS, TMA=t.get("TMA", False)) for t in tiles)

    assert tiles_for(32 * 128, 128) == tail((GATE_UP_TILE, DOWN_TILE))  # a batch-2 canvas: the small-load tiles
    assert tiles_for(33 * 128, 128)[0]["BLOCK_M"] == 128
    assert tiles_for(64 * 128, 128) == tail(LARGE_TILES[0][1:])
    assert tiles_for(128 * 128, 128) == tail(LARGE_TILES[1][1:])
    assert tiles_for(512 * 128, 128)[0]["M_SPLITS"] == 5  # 32 canvases: 5 programs share each expert's passes
    assert LARGE_TILES[-1][0] == FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT  # every load the model sends has a tile
    # A decoded token's experts, a program per assignment: their own tiles in bf16, the FP8 tiles in FP8.
    assert tiles_for(8, 128, direct=True) == tail((DIRECT_GATE_UP_TILE, DIRECT_DOWN_TILE))
    assert [t["TMA"] for t in tiles_for(8, 128, direct=True)] == [False, True]  # measured: the down product only
    assert tiles_for(8, 128, fp8=True, direct=True) == tail((FP8_GATE_UP_TILE, FP8_DOWN_TILE))
    # TMA loads (off by default) from a mean load per expert on, product by product.
    monkeypatch.setattr(moe_tiles, "TMA_DOWN_FROM", 64)
    assert [t["TMA"] for t in tiles_for(63 * 128, 128)] == [False, False]
    assert [t["TMA"] for t in tiles_for(64 * 128, 128)] == [False, True]
    monkeypatch.setattr(moe_tiles, "TMA_GATE_UP_FROM", 0)
    assert [t["TMA"] for t in tiles_for(8, 128, direct=True)] == [True, True]


def test_fused_norm_rope_runs_only_for_inference_with_matching_dtypes_and_power_of_two_head_dim():
    def args(d, dtype=torch.bfloat16, rope_dtype=torch.bfloat16):
        return torch.empty(1, 3, 2, d, dtype=dtype), torch.empty(1, 3, d, dtype=rope_dtype), torch.empty(
            1, 3, d, dtype=rope_dtype)

    with torch.no_grad():
        assert use_fused_norm_rope(*args(256), kernel_devices=("cpu",))
        assert use_fused_norm_rope(*args(512, torch.float32, torch.float32), kernel_devices=("cpu",))
        assert not use_fused_norm_rope(*args(256))  # a CPU is not a kernel device unless named
        assert not use_fused_norm_rope(*args(96), kernel_devices=("cpu",))  # not a power of two
        # Under autocast the projection is bf16 but cos/sin float32: the eager path returns float32 there.
        assert not use_fused_norm_rope(*args(256, torch.bfloat16, torch.float32), kernel_devices=("cpu",))
    assert not use_fused_norm_rope(*args(256), kernel_devices=("cpu",))  # grad enabled


def test_proportional_rope_tables_leave_the_unrotated_pairs_unchanged():
    """The kernel applies the half-split rotation to every pair; proportional RoPE needs no special case because
    the pairs that must not rotate have cos 1 and sin 0 at both of their positions (i and i + D/2)."""
    spec = preset("26b-a4b").full  # head_dim 512, a quarter of the pairs rotate
    half = spec.head_dim // 2
    rotated = int(spec.partial_rotary_factor * half)
    cos, sin = rope_cos_sin(torch.arange(3000)[None], rope_inv_freq(spec), torch.float32)  # [1, 3000, D]
    frozen = torch.cat((torch.arange(rotated, half), torch.arange(half + rotated, 2 * half)))
    assert torch.equal(cos[..., frozen], torch.ones_like(cos[..., frozen]))
    assert torch.equal(sin[..., frozen], torch.zeros_like(sin[..., frozen]))
    assert (sin[0, 1:, :rotated] != 0).all()  # the others do rotate


# ------------------------------------------------------------------------------------------------------------
# The kernels and their wiring, on a CPU through the Triton interpreter

# float16 keeps 11 bits: the kernels round at other points than the eager code (once where it rounds up to three
# times), so results differ by about one float16 eps (measured 0.4 to 0.8 eps, relative L2). Four eps leaves room;
# a wrong norm, rotation or routing gives errors of order 1.
ULPS = 4


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,partial", [(16, 1.0), (32, 0.25), (256, 1.0), (512, 0.25)])
def test_interpreted_norm_rope_matches_the_eager_norm_then_rotation(dtype, head_dim, partial):
    from dgemma.config import AttentionSpec
    from dgemma.kernels.norm_rope import norm_rope_triton

    gen = torch.Generator().manual_seed(head_dim)
    spec = AttentionSpec(head_dim=head_dim, num_kv_heads=1, rope_theta=10_000.0, partial_rotary_factor=partial)
    x = torch.randn(2, 5, 3, head_dim, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype)
    positions = torch.randint(0, 4000, (2, 5), generator=gen)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(spec), dtype)
    expected = apply_rope(rms_norm(x, w, 1e-6), cos, sin).float()
    err = rel_err(norm_rope_triton(x, w, cos, sin, 1e-6).float(), expected)
    assert err < ULPS * torch.finfo(dtype).eps, err


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37, 96), (1, 1, 256), (200, 64)])  # 200 rows: several rows per program
def test_interpreted_training_norm_matches_eager_values_and_gradients(dtype, shape):
    from dgemma.kernels.rms_norm import rms_norm_train_triton

    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=gen).to(dtype)
    fused = rms_norm_train_triton(x, w, 1e-6)
    fused_dx, fused_dw = torch.autograd.grad(fused, (x, w), dy)
    eager = rms_norm(x, w, 1e-6)  # a CPU tensor: the eager float32 formula
    eager_dx, eager_dw = torch.autograd.grad(eager, (x, w), dy)
    assert fused.dtype == dtype and fused_dx.dtype == dtype and fused_dw.dtype == dtype
    for got, want in ((fused, eager), (fused_dx, eager_dx), (fused_dw, eager_dw)):
        err = rel_err(got.float(), want.float())
        assert err < ULPS * torch.finfo(dtype).eps, err


@interpreted
@pytest.mark.parametrize("n,h,i,e,k", [(37, 64, 32, 8, 2), (20, 48, 40, 4, 2), (3, 64, 32, 8, 2),
                                       (100, 64, 32, 4, 2), (250, 48, 40, 4, 2)])  # last two: 128-row tiles
def test_interpreted_fused_moe_matches_the_expert_loop(n, h, i, e, k):
    from dgemma.kernels.fused_moe import fused_moe_triton

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), k)
    expected = experts_loop(x, weights, experts, gate_up, down).float()
    err = rel_err(fused_moe_triton(x, weights, experts, gate_up, down).float(), expected)
    assert err < ULPS * torch.finfo(torch.float16).eps, err


@interpreted
def test_interpreted_fused_moe_with_256_row_tiles_split_or_tail_passes_matches_the_expert_loop():
    """Tiles taller than any expert's group (one pass over each expert's weights), an expert's passes shared by
    programs launched side by side, or a group's last rows taken by a shorter product (TAIL_M), as a sweep may choose
    for batches of 8 canvases: same result as the loop."""
    from dgemma.kernels.fused_moe import fused_moe_triton

    gen = torch.Generator().manual_seed(0)
    n, h, i, e, k = 300, 64, 32, 4, 2  # ~150 assignments per expert
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), k)
    expected = experts_loop(x, weights, experts, gate_up, down).float()
    tall = dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3)
    split = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, M_SPLITS=2)  # passes of 64 rows taken in turn by 2 programs
    tails = [dict(split, TAIL_M=tail) for tail in (16, 32)]  # a group's last rows in a shorter product
    for tile in (tall, split, *tails):
        err = rel_err(fused_moe_triton(x, weights, experts, gate_up, down, tile, tile).float(), expected)
        assert err < ULPS * torch.finfo(torch.float16).eps, (tile, err)


@interpreted
@pytest.mark.parametrize("n", [1, 4])  # one decoded token; four whose experts repeat (top-2 of 4)
def test_interpreted_fused_moe_with_a_program_per_assignment_matches_the_grouped_kernels(n, monkeypatch):
    """`DIRECT_MAX_ASSIGNMENTS`: decoded tokens' assignments each in their own program, with no grouping, give the
    rows the grouped kernels give (the same products row by row), unsummed and summed, with any tile."""
    from dgemma.kernels import fused_moe, moe_tiles

    gen = torch.Generator().manual_seed(n)
    h, i, e, k = 64, 48, 4, 2
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), k)
    grouped = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, combine=False)
    calls = []
    monkeypatch.setattr(fused_moe, "group_by_expert_triton", lambda *a: calls.append(a))  # must not run
    monkeypatch.setattr(fused_moe, "DIRECT_MAX_ASSIGNMENTS", n * k)
    direct = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, combine=False)
    assert not calls and direct.shape == grouped.shape == (n * k, h)
    assert rel_err(direct.float(), grouped.float()) < ULPS * torch.finfo(torch.float16).eps
    # The direct path's own tiles (swept apart from the canvas's): narrower and shallower, the same rows.
    monkeypatch.setattr(moe_tiles, "DIRECT_GATE_UP_TILE", dict(BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2))
    monkeypatch.setattr(moe_tiles, "DIRECT_DOWN_TILE", dict(BLOCK_N=32, BLOCK_K=16, num_warps=2, num_stages=2))
    asked, tiles_for = [], fused_moe.tiles_for
    monkeypatch.setattr(fused_moe, "tiles_for", lambda *a, **kw: asked.append(kw["direct"]) or tiles_for(*a, **kw))
    narrow = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, combine=False)
    assert asked == [True]
    assert rel_err(narrow.float(), grouped.float()) < ULPS * torch.finfo(torch.float16).eps
    expected = experts_loop(x, weights, experts, gate_up, down).float()
    summed = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down)
    assert rel_err(summed.float(), expected) < ULPS * torch.finfo(torch.float16).eps


def spy_on_boxes(monkeypatch) -> list[tuple[int, int]]:
    """The box shapes of the TMA descriptors the fused MoE builds, in the order it builds them."""
    from dgemma.kernels import fused_moe

    boxes, box = [], fused_moe._box

    def spy(view, rows, cols, on):
        if on:
            boxes.append((rows, cols))
        return box(view, rows, cols, on)

    monkeypatch.setattr(fused_moe, "_box", spy)
    return boxes


@interpreted
@pytest.mark.parametrize("n,h,i,e,k,tile,direct", [
    (37, 64, 48, 8, 2, dict(BLOCK_N=32, BLOCK_K=32), False),  # gate boxes reach into up's rows, the last further
    (300, 64, 32, 4, 2, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, M_SPLITS=2, TAIL_M=32), False),  # splits, tails
    (300, 64, 32, 4, 2, dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, SWAP_AB=True), False),  # weights first
    (4, 64, 40, 4, 2, None, True),  # a program per assignment (DIRECT_MAX_ASSIGNMENTS), K past the boxes' edge
    (4, 64, 40, 4, 2, dict(BLOCK_N=32, BLOCK_K=32, SWAP_AB=True), True),  # ... with the weights first
])
def test_interpreted_fused_moe_loads_through_tma_give_the_same_bits(n, h, i, e, k, tile, direct, monkeypatch):
    """`TMA`: the weight tiles and the down product's rows as descriptor boxes, instead of pointer loads. A box may
    reach past the product's rows (into up's rows, the next expert's, the next group's): those columns and rows are
    computed and never stored, so every stored row has the products of the pointer path, bit for bit."""
    from dgemma.kernels import fused_moe

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), k)
    if direct:
        monkeypatch.setattr(fused_moe, "DIRECT_MAX_ASSIGNMENTS", n * k)
    tiles = (tile, tile) if tile else fused_moe.tiles_for(n * k, e, direct=True)
    plain = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, *tiles, combine=False)
    boxes = spy_on_boxes(monkeypatch)
    tma = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, *(dict(t, TMA=True) for t in tiles),
                                     combine=False)
    assert torch.equal(tma, plain)
    expected_boxes = 4 if (tile or {}).get("TAIL_M") else 3  # gate/up weights; down weights, rows (and tail rows)
    assert len(boxes) == expected_boxes, boxes


@interpreted
def test_interpreted_fused_moe_loads_with_pointers_where_tma_cannot_read_the_rows(monkeypatch):
    """Rows of 36 halves (72 bytes) are not 16-byte aligned: the TMA tile falls back to pointer loads, same rows."""
    from dgemma.kernels import fused_moe

    gen = torch.Generator().manual_seed(0)
    n, h, i, e, k = 20, 36, 40, 4, 2
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), k)
    tile = dict(BLOCK_N=16, BLOCK_K=16, TMA=True)
    boxes = spy_on_boxes(monkeypatch)
    got = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, tile, tile)
    assert len(boxes) == 2  # down's weights [E * H, I] and rows [N * K, I] are 80-byte rows: those go through TMA
    assert rel_err(got.float(), experts_loop(x, weights, experts, gate_up, down).float()) < \
        ULPS * torch.finfo(torch.float16).eps


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_interpreted_combine_is_the_weighted_sum_of_each_tokens_rows(dtype):
    """Each token's K expert rows, weighted (weights rounded to the activation dtype) and summed in float32."""
    from dgemma.kernels.fused_moe import combine_triton

    gen = torch.Generator().manual_seed(0)
    n, k, h = 7, 3, 1100  # h over one 1024-column tile: the masked last tile
    rows = torch.randn(n * k, h, generator=gen).to(dtype)
    weights = torch.rand(n, k, generator=gen)
    expected = (weights.to(dtype).double()[..., None] * rows.double().view(n, k, h)).sum(1)
    got = combine_triton(rows, weights)
    assert got.dtype == dtype and got.shape == (n, h)
    assert rel_err(got.double(), expected) < ULPS * torch.finfo(dtype).eps


def test_combine_refuses_rows_that_do_not_match_the_weights():
    pytest.importorskip("triton")
    from dgemma.kernels.fused_moe import combine_triton

    with pytest.raises(ValueError, match=r"combine needs contiguous rows \[4 \* 2, H\]"):
        combine_triton(torch.zeros(7, 16), torch.zeros(4, 2))


@pytest.fixture(scope="module")
def tiny_fp16():
    return build_random_model("tiny", "float16", "cpu", seed=1, scale=InitScale(embed_std=1.0, perturb=0.1))


@interpreted
@pytest.mark.parametrize("fused_qkv", [True, False], ids=["one_norm_kernel", "three_norm_kernels"])
@pytest.mark.parametrize("layer", [0, 5])  # a sliding layer; a full one (head_dim 32, proportional RoPE, k-as-v)
def test_interpreted_attention_with_the_kernel_matches_eager(tiny_fp16, layer, fused_qkv, monkeypatch):
    monkeypatch.setattr(attention, "FUSED_QKV_NORM", fused_qkv)
    calls = spy_on_kernels(monkeypatch)
    x = torch.randn(1, 40, tiny_fp16.config.hidden_size, generator=torch.Generator().manual_seed(layer)).half()
    (out_eager, keys_eager), (out_fused, keys_fused) = attention_kernel_off_and_on(tiny_fp16, layer, x)
    # queries, keys and values: in one launch, or one each
    assert (calls["qkv_norm_rope"], calls["norm_rope"]) == ((1, 0) if fused_qkv else (0, 3))
    assert rel_err(keys_fused, keys_eager) < ULPS * torch.finfo(torch.float16).eps
    assert rel_err(out_fused, out_eager) < ULPS * torch.finfo(torch.float16).eps


@interpreted
def test_interpreted_experts_with_the_kernel_match_eager(tiny_fp16, monkeypatch):
    calls = spy_on_kernels(monkeypatch)
    x = torch.randn(37, tiny_fp16.config.hidden_size, generator=torch.Generator().manual_seed(0)).half()
    eager, fused = experts_kernel_off_and_on(tiny_fp16, 0, x)
    assert calls["fused_moe"] == 1
    assert rel_err(fused, eager) < ULPS * torch.finfo(torch.float16).eps


def test_the_mlp_activation_kernel_runs_only_for_inference_on_a_kernel_device():
    from dgemma.model.layers import use_gelu_mul_kernel

    gate_up = torch.empty(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert use_gelu_mul_kernel(gate_up, ("cpu",))
        assert not use_gelu_mul_kernel(gate_up, ())
        assert not use_gelu_mul_kernel(gate_up.to(torch.int32), ("cpu",))
    assert not use_gelu_mul_kernel(gate_up, ("cpu",))  # gradients: the eager ops


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2112 * 2), (2, 5, 48)])  # one decoded token of the released MLP; odd rows
def test_interpreted_mlp_activation_equals_eager_gelu_times_up(dtype, shape):
    from dgemma.kernels.gated_gelu import gelu_mul_triton

    gate_up = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.gelu(gate, approximate="tanh") * up
    out = gelu_mul_triton(gate_up)
    assert out.shape == expected.shape and out.dtype == dtype
    # Same rounding steps as eager; tanh differs in its last float32 bits (exp form in the interpreter).
    assert torch.allclose(out.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_mlp_activation_refuses_an_odd_or_strided_input():
    pytest.importorskip("triton")
    from dgemma.kernels.gated_gelu import gelu_mul_triton

    with pytest.raises(ValueError, match="2I"):
        gelu_mul_triton(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="contiguous"):
        gelu_mul_triton(torch.zeros(8, 4).T)


@interpreted
def test_interpreted_model_with_the_kernels_is_as_accurate_as_eager(tiny_fp16, monkeypatch):
    """A whole encode + decode in float16, both paths against float32. The random tiny model amplifies rounding
    (eager float16 is ~5% off float32 in relative L2), so the two float16 runs are compared through their
    distance to float32 (as tests/test_gpu.py compares with the reference), not with each other."""
    cfg = tiny_fp16.config
    prompt, canvas, soft_logits = inputs(cfg)
    fp32 = build_random_model("tiny", "float32", "cpu", seed=1, scale=InitScale(embed_std=1.0, perturb=0.1))
    _, truth = run(fp32, prompt, canvas, soft_logits)
    set_kernel_devices(tiny_fp16, ())
    _, eager = run(tiny_fp16, prompt, canvas, soft_logits)
    calls = spy_on_kernels(monkeypatch)
    set_kernel_devices(tiny_fp16, ("cpu",))
    fused_model = copy.deepcopy(tiny_fp16)
    fused_model.pack_projections()  # as an LLM runs it: the kernels read q, k and v as views of one GEMM
    _, fused = run(fused_model, prompt, canvas, soft_logits)
    # 6 layers, encoder and decoder: q, k and v of each (one launch: FUSED_QKV_NORM); experts of each (40 and 32
    # tokens, top-2 of 8: <= 32 each); the routing, the two residual norms and the dense MLP's activation of each (no
    # ring and head_dim <= 256 here: no cache_attention).
    assert calls == {"norm_rope": 0, "qkv_norm_rope": 12, "fused_moe": 12, "route_top_k": 12, "attention_residual": 12,
                     "layer_output": 12, "cache_attention": 0, "gelu_mul": 12}
    report = {"fused": rel_err(fused, truth), "eager": rel_err(eager, truth),
              "fused_argmax_agree": argmax_agreement(fused, truth), "eager_argmax_agree": argmax_agreement(eager, truth)}
    assert report["fused"] <= 1.25 * report["eager"] + 2e-3, report
    assert report["fused_argmax_agree"] >= report["eager_argmax_agree"] - 0.05, report


@interpreted
@pytest.mark.parametrize("n,k,e", [(7, 2, 8), (300, 8, 128), (1, 1, 4), (2000, 4, 16)])  # 2000 x 4: several blocks
def test_interpreted_grouping_by_expert_equals_the_stable_sort(n, k, e):
    """The kernel computes the same stable order as the eager argsort, so the grouped experts see identical rows."""
    from dgemma.kernels.routing import group_by_expert_triton
    from dgemma.model.moe import group_by_expert

    experts = torch.randint(0, e, (n, k), generator=torch.Generator().manual_seed(n))
    for got, want in zip(group_by_expert_triton(experts, e), group_by_expert(experts, e)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_routing_kernel_chooses_the_eager_experts_and_weights(dtype):
    """From the same router logits: the same probabilities chosen, in descending order, and the eager weights.
    Logits of a 16-bit router tie (some rows below are built to): among equal probabilities the kernel takes the
    lower expert id, which torch.topk does not promise, so ids are compared through the probabilities they pick."""
    from dgemma.kernels.routing import route_top_k

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 16, generator=gen).to(dtype)  # [N, E]
    logits[:5, 8:] = logits[:5, :8]  # exact ties
    scale = (0.5 + torch.rand(16, generator=gen)).to(dtype)
    weights, ids = route_top_k(logits, scale, 4)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # the eager Router's arithmetic
    eager_p, eager_ids = torch.topk(probs, 4)
    eager_weights = eager_p / eager_p.sum(-1, keepdim=True) * scale.expand(50, -1).gather(1, eager_ids)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.allclose(probs.gather(1, ids), eager_p, rtol=ULPS * torch.finfo(torch.float32).eps, atol=0)
    same = (ids == eager_ids).all(-1)
    assert same.float().mean() > 0.8  # only the tied rows may differ
    assert rel_err(weights[same], eager_weights[same]) < ULPS * torch.finfo(torch.float32).eps


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scalar_shape", [(1,), (5, 1)])  # one layer scalar, or one per token (fused forward)
def test_interpreted_residual_norms_equal_the_eager_layer_norms(tiny_fp16, dtype, scalar_shape):
    """Both fused residual kernels round where the eager path rounds: float16 results are identical, float32 ones
    differ only by the order of the sum of squares."""
    layer = copy.deepcopy(tiny_fp16.layers[0]).to(dtype)
    gen = torch.Generator().manual_seed(1)
    h_size = tiny_fp16.config.hidden_size
    x, attn, dense, routed = (torch.randn(2, 5, h_size, generator=gen).to(dtype) for _ in range(4))
    for norm in (layer.post_attention_layernorm, layer.pre_feedforward_layernorm, layer.pre_feedforward_layernorm_2,
                 layer.post_feedforward_layernorm_1, layer.post_feedforward_layernorm_2, layer.post_feedforward_layernorm):
        norm.weight.data = (1 + 0.3 * torch.randn(h_size, generator=gen)).to(dtype)
    layer.router.scale.data = (1 + 0.3 * torch.randn(h_size, generator=gen)).to(dtype)
    scalar = (0.5 + torch.rand(scalar_shape, generator=gen)).to(dtype)
    results = []
    with torch.no_grad():
        for devices in ((), ("cpu",)):
            layer.kernel_devices = devices
            h, *normed = layer.attention_residual(x, attn)
            results.append([h, *normed, layer.layer_output(h, dense, routed, scalar)])
    for got, want in zip(results[1], results[0]):
        assert got.dtype == dtype
        if dtype == torch.float16:
            assert torch.equal(got, want)
        else:
            assert rel_err(got, want) < ULPS * torch.finfo(dtype).eps


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_output_kernel_sums_the_experts_rows_as_the_combine_kernel_does(tiny_fp16, dtype):
    """Folding the MoE's combine into the layer's output kernel changes no value: each token's K rows are weighted
    (weights rounded to the activation dtype), summed in float32 and rounded once, as `combine_triton` does."""
    from dgemma.kernels.fused_moe import combine_triton
    from dgemma.kernels.residual_norms import layer_output_triton

    layer = copy.deepcopy(tiny_fp16.layers[0]).to(dtype)
    gen = torch.Generator().manual_seed(2)
    b, t, k, d = 2, 5, 3, tiny_fp16.config.hidden_size
    h, dense = (torch.randn(b, t, d, generator=gen).to(dtype) for _ in range(2))
    rows = torch.randn(b * t * k, d, generator=gen).to(dtype)  # token-major: token * K + k
    route_weights = torch.rand(b * t, k, generator=gen)
    norms = (layer.post_feedforward_layernorm_1.weight, layer.post_feedforward_layernorm_2.weight,
             layer.post_feedforward_layernorm.weight)
    scalar = torch.tensor([0.7]).to(dtype)
    with torch.no_grad():
        summed = layer_output_triton(h, dense, combine_triton(rows, route_weights).view(b, t, d), *norms, scalar, 1e-6)
        folded = layer_output_triton(h, dense, rows, *norms, scalar, 1e-6, route_weights)
    assert torch.equal(folded, summed)
    with pytest.raises(ValueError, match=r"routed \(29, 64\) be \(30, 64\)"):
        layer_output_triton(h, dense, rows[:-1], *norms, scalar, 1e-6, route_weights)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_output_kernel_applies_the_next_norm_as_the_norm_kernel_does(tiny_fp16, dtype):
    """With `w_next` the output kernel also returns the next norm of its output, computed as `rms_norm_triton`
    computes it (float16: identical; float32: up to the order of the sum of squares), and the output itself is
    unchanged."""
    from dgemma.kernels.residual_norms import layer_output_triton
    from dgemma.kernels.rms_norm import rms_norm_triton

    layer = copy.deepcopy(tiny_fp16.layers[0]).to(dtype)
    gen = torch.Generator().manual_seed(3)
    d = tiny_fp16.config.hidden_size
    h, dense, routed = (torch.randn(2, 5, d, generator=gen).to(dtype) for _ in range(3))
    norms = (layer.post_feedforward_layernorm_1.weight, layer.post_feedforward_layernorm_2.weight,
             layer.post_feedforward_layernorm.weight)
    scalar = torch.tensor([0.7]).to(dtype)
    w_next = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    with torch.no_grad():
        plain = layer_output_triton(h, dense, routed, *norms, scalar, 1e-6)
        out, normed = layer_output_triton(h, dense, routed, *norms, scalar, 1e-6, w_next=w_next)
        want = rms_norm_triton(plain, w_next, 1e-6)
    assert torch.equal(out, plain)
    if dtype == torch.float16:
        assert torch.equal(normed, want)
    else:
        assert rel_err(normed, want) < ULPS * torch.finfo(dtype).eps


@interpreted
@pytest.mark.parametrize("combine,next_norm", [(True, False), (False, True), (True, True)])
def test_interpreted_model_with_folds_into_the_output_kernel_computes_the_same_logits(tiny_fp16, monkeypatch,
                                                                                      combine, next_norm):
    """`FOLD_MOE_COMBINE` (the output kernel sums the experts' rows) and `FOLD_NEXT_NORM` (it applies the next layer's
    input norm, and the last layer the final norm): the whole encode + decode gives the same float16 logits and
    cache as without them, with one combine kernel or one norm kernel fewer per layer and pass."""
    from dgemma.kernels import fused_moe
    from dgemma.model import diffusion_gemma, layers

    calls = {}
    count_calls(monkeypatch, calls, fused_moe, "combine_triton", "combine")
    count_calls(monkeypatch, calls, layers, "rms_norm", "norm")  # what RMSNorm modules call
    cfg = tiny_fp16.config
    prompt, canvas, soft_logits = inputs(cfg)
    model = copy.deepcopy(tiny_fp16)
    set_kernel_devices(model, ("cpu",))
    results, counts = [], []
    for folds in ((False, False), (combine, next_norm)):
        monkeypatch.setattr(diffusion_gemma, "FOLD_MOE_COMBINE", folds[0])
        monkeypatch.setattr(diffusion_gemma, "FOLD_NEXT_NORM", folds[1])
        calls.update(combine=0, norm=0)
        results.append(run(model, prompt, canvas, soft_logits))
        counts.append(dict(calls))
    (cache, logits), (folded_cache, folded_logits) = results
    assert torch.equal(folded_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(folded_cache.keys + folded_cache.values, cache.keys + cache.values))
    passes = 2  # the encoder's and the decoder's, every layer
    assert counts[1]["combine"] == counts[0]["combine"] - (passes * cfg.num_layers if combine else 0)
    assert counts[1]["norm"] == counts[0]["norm"] - (passes * cfg.num_layers if next_norm else 0)


@interpreted
def test_interpreted_model_with_tma_loads_in_the_experts_computes_the_same_logits(tiny_fp16, monkeypatch):
    """`moe_tiles.TMA_GATE_UP_FROM` / `TMA_DOWN_FROM` at 0: every expert product of the encode + decode loads through
    descriptors (3 a layer and pass, 4 with the down product's tail rows), and the logits and cache keep every bit."""
    from dgemma.kernels import moe_tiles

    cfg = tiny_fp16.config
    prompt, canvas, soft_logits = inputs(cfg)
    model = copy.deepcopy(tiny_fp16)
    set_kernel_devices(model, ("cpu",))
    cache, logits = run(model, prompt, canvas, soft_logits)
    monkeypatch.setattr(moe_tiles, "TMA_GATE_UP_FROM", 0)
    monkeypatch.setattr(moe_tiles, "TMA_DOWN_FROM", 0)
    boxes = spy_on_boxes(monkeypatch)
    tma_cache, tma_logits = run(model, prompt, canvas, soft_logits)
    assert torch.equal(tma_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(tma_cache.keys + tma_cache.values, cache.keys + cache.values))
    assert len(boxes) >= 2 * cfg.num_layers * 3


@interpreted
@pytest.mark.parametrize("rope", [True, False])  # queries and keys; values (the norm alone, no weight)
def test_interpreted_head_norm_reads_views_of_a_packed_projection_in_place(rope):
    from dgemma.config import AttentionSpec
    from dgemma.kernels.norm_rope import norm_rope_triton

    gen = torch.Generator().manual_seed(0)
    packed = torch.randn(2, 5, 7 * 32, generator=gen).half()  # [B, T, (4 + 2 + 1) heads * D]: q, k, v of one GEMM
    x = packed[..., 4 * 32 : 6 * 32].view(2, 5, 2, 32)  # the two k heads: a strided view
    w = (1 + 0.1 * torch.randn(32, generator=gen)).half() if rope else None
    spec = AttentionSpec(head_dim=32, num_kv_heads=2, rope_theta=10_000.0, partial_rotary_factor=1.0)
    cos, sin = rope_cos_sin(torch.randint(0, 500, (2, 5), generator=gen), rope_inv_freq(spec), torch.float16)
    cos, sin = (cos, sin) if rope else (None, None)
    got = norm_rope_triton(x, w, cos, sin, 1e-6)
    assert got.is_contiguous() and torch.equal(got, norm_rope_triton(x.contiguous(), w, cos, sin, 1e-6))
    expected = apply_rope(rms_norm(x, w, 1e-6), cos, sin) if rope else rms_norm(x, None, 1e-6)
    assert rel_err(got.float(), expected.float()) < ULPS * torch.finfo(torch.float16).eps


@interpreted
@pytest.mark.parametrize("k_as_v", [False, True])  # a sliding layer's q, k, v; a full layer's values are its keys
def test_interpreted_one_launch_of_the_three_head_norms_equals_the_three_launches(k_as_v):
    """One launch normalises and rotates the queries, and writes the keys (rotated) and values into the cache at each
    token's row and slot, computing the angles itself: the same rows as three launches over `rope_cos_sin`'s
    tables."""
    from dgemma.config import AttentionSpec
    from dgemma.kernels.norm_rope import norm_rope_triton, qkv_norm_rope_triton

    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = 2, 3, 4, 2, 32
    packed = torch.randn(b, t, (hq + 2 * hkv) * d, generator=gen).half()  # [B, T, (Hq + 2 Hkv) * D], one GEMM
    q_raw = packed[..., : hq * d].view(b, t, hq, d)
    k_raw = packed[..., hq * d : (hq + hkv) * d].view(b, t, hkv, d)
    v_raw = k_raw if k_as_v else packed[..., (hq + hkv) * d :].view(b, t, hkv, d)
    qw, kw = ((1 + 0.1 * torch.randn(d, generator=gen)).half() for _ in range(2))
    spec = AttentionSpec(head_dim=d, num_kv_heads=hkv, rope_theta=10_000.0, partial_rotary_factor=1.0)
    positions = torch.randint(0, 5000, (b, t), generator=gen)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(spec), torch.float16)
    rows, slots = torch.tensor([3, 1]), torch.tensor([[0, 1, 2], [7, 5, 9]])  # rows in any order, slots anywhere
    caches = [[torch.zeros(4, 10, hkv, d, dtype=torch.float16) for _ in range(2)] for _ in range(2)]
    q = qkv_norm_rope_triton(q_raw, k_raw, v_raw, qw, kw, positions, rope_inv_freq(spec), 1e-6,
                             (*caches[0], rows, slots))
    want_q = norm_rope_triton(q_raw, qw, cos, sin, 1e-6)
    norm_rope_triton(k_raw, kw, cos, sin, 1e-6, into=(caches[1][0], rows, slots))
    norm_rope_triton(v_raw, None, None, None, 1e-6, into=(caches[1][1], rows, slots))
    assert torch.equal(q, want_q)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert int((caches[0][0] != 0).any(dim=(2, 3)).sum()) == b * t  # the six slots named, nothing else


def cache_attention_case(dtype, b: int, t: int, hq: int, hkv: int, d: int, window: int | None, ring: int | None,
                         seed: int):
    """Queries [B, T, Hq, D] over a 4-row cache of 50 written positions, with per-query bounds (a window when
    `window` is set) and, when `ring` is set, the cache laid out as a sliding ring of that many slots. Returns (q,
    cache keys, cache values, rows, key_start, key_end, expected), expected being masked attention in float32."""
    from dgemma.model.attention import grouped_attention

    gen = torch.Generator().manual_seed(seed)
    written = 50  # positions [0, 50) were written
    # Scores of order 1 (a float32 score of order sqrt(d) would carry sqrt(d) times the rounding into exp).
    q = (torch.randn(b, t, hq, d, generator=gen) * d**-0.5).to(dtype)
    keys, values = (torch.randn(4, written, hkv, d, generator=gen).to(dtype) for _ in range(2))  # slot = position
    rows = torch.tensor([3, 0, 2][:b])
    key_end = torch.randint(written - 5, written + 1, (b, t), generator=gen)
    key_start = None if window is None else key_end - window
    cache_keys, cache_values = keys, values
    if ring is not None:  # slot p % S holds the last position written there, as in a sliding ring
        cache_keys, cache_values = keys[:, :ring].clone(), values[:, :ring].clone()
        for p in range(written):
            cache_keys[:, p % ring], cache_values[:, p % ring] = keys[:, p], values[:, p]
    positions = torch.arange(written)
    mask = positions < key_end[..., None]  # [B, T, S]
    if key_start is not None:
        mask &= positions >= key_start[..., None]
    expected = grouped_attention(q.float(), keys[rows].float(), values[rows].float(), mask[:, None])
    return q, cache_keys, cache_values, rows, key_start, key_end, expected


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,t,hq,hkv,d", [(2, 5, 4, 2, 32), (1, 37, 8, 1, 64), (3, 1, 4, 2, 512)])  # 512: split D
@pytest.mark.parametrize("window,ring", [(None, None), (12, None), (12, 20)])  # full; sliding; sliding on a ring
@pytest.mark.parametrize("whole_d", [False, True])  # scores in head-dim chunks, or one product (queries loaded once)
def test_interpreted_cache_attention_matches_masked_attention_over_each_querys_positions(dtype, b, t, hq, hkv, d,
                                                                                         window, ring, whole_d):
    """Each query sees the positions [key_start, key_end): all before its bound on full layers, a window on sliding
    ones. Rows are read from the cache rows the batch names; on a ring, position p from slot p % S."""
    from dgemma.kernels.cache_attention import cache_attention_triton

    q, cache_keys, cache_values, rows, key_start, key_end, expected = cache_attention_case(
        dtype, b, t, hq, hkv, d, window, ring, seed=d + t)
    tile = dict(block_m=16, block_n=16, block_d=d) if whole_d else dict(block_m=16, block_n=16)
    got = cache_attention_triton(q, cache_keys, cache_values, rows, key_start, key_end, ring, **tile)
    # float32: 512-term dot products and an average over up to 50 values of random sign round to ~1e-6 relative
    # on either side (measured 6e-7); a wrong bound, slot, row or head is off by order 1.
    assert rel_err(got.float(), expected) < max(ULPS * torch.finfo(dtype).eps, 1e-5)


@pytest.mark.parametrize("switch,tokens,expected", [(0, 1, False), (1, 1, True), (1, 2, False)])
def test_decoded_tokens_take_the_split_kernel_only_when_switched_on(monkeypatch, switch, tokens, expected):
    """`CACHE_ATTENTION_DECODE_TOKENS` routes rows of at most that many queries (autoregressive decoding) to
    `cache_attention` on every layer, sliding ones in the full layout included; 0 keeps the masked paths."""
    from dgemma.model import attention
    from dgemma.model.kv_cache import KVCache

    cfg = preset("tiny")
    monkeypatch.setattr(attention, "CACHE_ATTENTION_DECODE_TOKENS", switch)
    cache = KVCache(cfg, 1, 100, torch.float16, torch.device("cpu"))
    assert not cache.ring
    batch = attention.AttentionBatch.for_encoder([0], [60], [tokens], cfg.sliding_window, cache)
    for kind, spec in (("sliding_attention", cfg.sliding), ("full_attention", cfg.full)):
        q = torch.zeros(1, tokens, cfg.num_attention_heads, spec.head_dim, dtype=torch.float16)
        with torch.no_grad():  # inference only
            assert attention.use_cache_attention(q, batch, kind, cache, ("cpu",)) is expected
            assert not attention.use_cache_attention(q, batch, kind, cache, ())  # never off a kernel device
        assert not attention.use_cache_attention(q, batch, kind, cache, ("cpu",))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,d", [(2, 16, 2, 64), (3, 4, 2, 32)])
@pytest.mark.parametrize("window,ring", [(None, None), (12, None), (12, 20)])
@pytest.mark.parametrize("splits", [2, 8])  # 8 slices of 4 key tiles: some slices see nothing
def test_interpreted_decoded_token_over_a_split_key_range_matches_one_pass(dtype, b, hq, hkv, d, window, ring,
                                                                           splits):
    """Flash decoding: one query per row, the key range cut into slices attended separately and merged through
    each slice's softmax max and sum, is the same attention as one pass over all keys (the grid of one query is
    otherwise one program per KV head). Same bounds, rows and ring as the test above."""
    from dgemma.kernels.cache_attention import cache_attention_triton

    q, cache_keys, cache_values, rows, key_start, key_end, expected = cache_attention_case(
        dtype, b, 1, hq, hkv, d, window, ring, seed=d + splits)
    tile = dict(block_m=16, block_n=16, block_d=d, block_dv=d)
    one_pass = cache_attention_triton(q, cache_keys, cache_values, rows, key_start, key_end, ring, splits=1, **tile)
    split = cache_attention_triton(q, cache_keys, cache_values, rows, key_start, key_end, ring, splits=splits, **tile)
    # The merge adds each slice's float32 partials after rescaling: a few roundings more than one pass, no more.
    assert rel_err(split.float(), expected) < max(ULPS * torch.finfo(dtype).eps, 1e-5)
    assert rel_err(split.float(), one_pass.float()) < max(ULPS * torch.finfo(dtype).eps, 1e-5)


def test_split_key_range_must_be_a_power_of_two():
    pytest.importorskip("triton")
    from dgemma.kernels.cache_attention import cache_attention_triton

    q, keys = torch.zeros(1, 1, 2, 16), torch.zeros(1, 8, 1, 16)
    with pytest.raises(ValueError, match="power of two"):
        cache_attention_triton(q, keys, keys, torch.tensor([0]), None, torch.tensor([[8]]), splits=3)


@interpreted
@pytest.mark.parametrize("layer", [0, 5])  # a sliding layer (the window moves past position 0); a full one
def test_interpreted_decoded_token_attends_through_the_split_kernel(tiny_fp16, layer, monkeypatch):
    """Autoregressive mode's single token per row takes `cache_attention` on every layer, ragged prefixes on
    both sides of the sliding window and rows not contiguous, and matches masked attention."""
    calls = spy_on_kernels(monkeypatch)
    w = tiny_fp16.config.sliding_window
    masked, kernel = decode_attention_kernel_off_and_on(tiny_fp16, layer, [2, 0], [w + 37, 5])
    assert calls["cache_attention"] == 1
    assert rel_err(kernel, masked) < ULPS * torch.finfo(torch.float16).eps


@interpreted
def test_a_decoded_token_through_the_kernels_builds_no_attention_mask(tiny_fp16):
    """The kernels read each query's bounds, so a forward whose every layer takes them builds no mask (~15 small
    kernels); eager attention builds each layer type's mask once, on first use."""
    from dgemma.model.kv_cache import KVCache

    model = copy.deepcopy(tiny_fp16)
    cfg = model.config
    built = []
    for devices in (("cpu",), ()):
        set_kernel_devices(model, devices)
        cache = KVCache(cfg, 1, 40, model.dtype, torch.device("cpu"))
        batch = AttentionBatch.for_encoder([0], [30], [1], cfg.sliding_window, cache)
        with torch.no_grad():
            model.encode(torch.tensor([[5]]), batch, cache)
        built.append(sorted(batch._masks))
    assert built == [[], sorted({FULL, SLIDING})]


@interpreted
def test_interpreted_canvas_attention_over_a_sliding_ring_matches_masked_attention(tiny_fp16, monkeypatch):
    """The wiring of `cache_attention` (tests/test_gpu.py runs the same on a GPU): a long context keeps a ring on
    sliding layers, a decoder canvas there reads its window through the kernel, and ragged rows keep their bounds."""
    model = copy.deepcopy(tiny_fp16)
    set_kernel_devices(model, ())
    prefix = 200
    cache, attend = ring_canvas(model, prefix, 64)  # a ring of W - 1 + 64 slots
    assert cache.ring and cache.sliding_slots < prefix
    calls = spy_on_kernels(monkeypatch)
    outs = [attend(()), attend(("cpu",))]
    assert calls["cache_attention"] == 1
    assert rel_err(outs[1], outs[0]) < ULPS * torch.finfo(torch.float16).eps
