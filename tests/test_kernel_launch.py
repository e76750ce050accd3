"""`dgemma.kernels.launch`: a tile tuned for Hopper that needs more shared memory than the GPU has (an A100, an Ada
card) launches as the first smaller tile that fits, and that choice is remembered. A fake kernel stands in for the
GPU: it refuses, as Triton does, any tile whose pipeline needs more than its shared memory. Under TRITON_INTERPRET=1
the real MoE and attention kernels run on such a pretend GPU and compute the same with the smallest tiles."""

from __future__ import annotations

import pytest
import torch
from kernel_wiring import interpreted, rel_err

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from dgemma.kernels import launch as launching  # noqa: E402



class FakeKernel:
    """A kernel on a GPU with `limit` bytes of shared memory per block: a bf16 [M, K] x [K, N] pipeline of
    num_stages stages needs stages * (M*K + K*N) * 2 bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.attempts = 0
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.attempts += 1
            need = meta["num_stages"] * (meta["BLOCK_M"] * meta["BLOCK_K"] + meta["BLOCK_K"] * meta["BLOCK_N"]) * 2
            if need > self.limit:
                raise OutOfResources(need, self.limit, "shared memory")
            self.launches.append((grid, args, meta))

        return run


TUNED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)  # 128 KB: a Hopper tile
BLOCKS = ("BLOCK_K", "BLOCK_N", "BLOCK_M")


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(launching, "_FITTED", {})


def grid(tile):
    return (2, 1024 // tile["BLOCK_N"])


def test_a_tile_that_fits_launches_as_given():
    kernel = FakeKernel(limit=227 * 1024)
    assert launching.launch(kernel, grid, TUNED, BLOCKS, "x", "y", EVEN=True) == TUNED
    assert kernel.launches == [((2, 16), ("x", "y"), dict(TUNED, EVEN=True))] and kernel.attempts == 1


def test_a_tile_too_big_for_the_gpu_runs_as_the_first_smaller_tile_that_fits_and_is_remembered():
    kernel = FakeKernel(limit=99 * 1024)  # an Ada GPU
    ran = launching.launch(kernel, grid, TUNED, BLOCKS, "x", EVEN=True)
    assert ran == dict(TUNED, num_stages=3)  # 96 KB: one stage fewer is enough
    assert kernel.launches == [((2, 16), ("x",), dict(ran, EVEN=True))]
    kernel.attempts = 0
    assert launching.launch(kernel, grid, TUNED, BLOCKS, "x", EVEN=True) == ran
    assert kernel.attempts == 1  # the second call launches the remembered tile directly

    tiny = FakeKernel(limit=20 * 1024)
    ran = launching.launch(tiny, grid, TUNED, BLOCKS)
    assert ran["num_stages"] * (ran["BLOCK_M"] * ran["BLOCK_K"] + ran["BLOCK_K"] * ran["BLOCK_N"]) * 2 <= 20 * 1024
    assert tiny.launches[0][0] == grid(ran)  # the grid follows the tile that ran


def test_arguments_made_from_the_tile_follow_the_tile_that_runs():
    """`per_tile` (a TMA descriptor's box is the tile's blocks): rebuilt for each tile tried, so the launch that
    runs gets the arguments of its own tile, on the first call and from the memo."""
    kernel = FakeKernel(limit=99 * 1024)
    small = dict(TUNED, BLOCK_K=64)  # fits as given: 4 x (64x64 + 64x64) x 2 B = 64 KB
    box = lambda t: {"box": (t["BLOCK_N"], t["BLOCK_K"])}  # noqa: E731
    for _ in range(2):  # 1 x (64x512 + 512x64) x 2 B = 128 KB: runs with K halved
        ran = launching.launch(kernel, grid, dict(TUNED, num_stages=1, BLOCK_K=512), BLOCKS, "x", per_tile=box)
        assert kernel.launches[-1][2]["box"] == (ran["BLOCK_N"], ran["BLOCK_K"]) == (64, 256)
    assert launching.launch(kernel, grid, small, BLOCKS, per_tile=box) == small
    assert kernel.launches[-1][2]["box"] == (64, 64)


def test_when_no_tile_fits_the_first_error_is_raised():
    kernel = FakeKernel(limit=100)
    with pytest.raises(OutOfResources, match="Required: 131072"):
        launching.launch(kernel, grid, TUNED, BLOCKS)
    assert kernel.launches == []


def test_smaller_tiles_drop_stages_first_then_halve_the_largest_block():
    tiles = list(launching.smaller_tiles(dict(BLOCK_K=64, BLOCK_N=32, num_stages=3), ("BLOCK_K", "BLOCK_N")))
    assert tiles == [
        dict(BLOCK_K=64, BLOCK_N=32, num_stages=2), dict(BLOCK_K=64, BLOCK_N=32, num_stages=1),
        dict(BLOCK_K=32, BLOCK_N=32, num_stages=3), dict(BLOCK_K=32, BLOCK_N=32, num_stages=2),
        dict(BLOCK_K=32, BLOCK_N=32, num_stages=1),
        dict(BLOCK_K=16, BLOCK_N=32, num_stages=3), dict(BLOCK_K=16, BLOCK_N=32, num_stages=2),
        dict(BLOCK_K=16, BLOCK_N=32, num_stages=1),
        dict(BLOCK_K=16, BLOCK_N=16, num_stages=3), dict(BLOCK_K=16, BLOCK_N=16, num_stages=2),
        dict(BLOCK_K=16, BLOCK_N=16, num_stages=1),
    ]  # and no block below 16 (tl.dot's smallest)


class TooSmall:
    """A real kernel on a pretend GPU that refuses every tile with more than one stage or a block over `limit`."""

    def __init__(self, kernel, blocks: tuple[str, ...], limit: int = 16):
        self.kernel, self.blocks, self.limit = kernel, blocks, limit

    def __getitem__(self, grid):
        def run(*args, **meta):
            if meta.get("num_stages", 1) > 1 or any(meta[k] > self.limit for k in self.blocks):
                raise OutOfResources(1 << 20, 1 << 16, "shared memory")
            return self.kernel[grid](*args, **meta)

        return run


@interpreted
@pytest.mark.parametrize("tma", [False, True])  # pointer loads; TMA boxes, which must shrink with the tile
@pytest.mark.parametrize("n", [37, 250])  # the small-load tiles; 128-row tiles
def test_interpreted_fused_moe_with_the_smallest_tiles_computes_the_same(monkeypatch, n, tma):
    import dgemma.kernels.fused_moe as fused_moe
    from dgemma.kernels import moe_tiles
    from dgemma.model.moe import experts_loop

    if tma:
        monkeypatch.setattr(moe_tiles, "TMA_GATE_UP_FROM", 0)
        monkeypatch.setattr(moe_tiles, "TMA_DOWN_FROM", 0)

    monkeypatch.setattr(fused_moe, "_gate_up_kernel", TooSmall(fused_moe._gate_up_kernel, ("BLOCK_K", "BLOCK_N")))
    monkeypatch.setattr(fused_moe, "_down_kernel", TooSmall(fused_moe._down_kernel, ("BLOCK_K", "BLOCK_N")))
    gen = torch.Generator().manual_seed(n)
    h, i, e = 64, 32, 4
    x = torch.randn(n, h, generator=gen).half()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).half()
    down = (torch.randn(e, h, i, generator=gen) * i**-0.5).half()
    weights, experts = torch.topk(torch.randn(n, e, generator=gen).softmax(-1), 2)
    got = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down).float()
    assert rel_err(got, experts_loop(x, weights, experts, gate_up, down).float()) < 4 * torch.finfo(torch.float16).eps
    fitted = list(launching._FITTED.values())
    assert len(fitted) == 2 and all(t["BLOCK_K"] == 16 and t["BLOCK_N"] == 16 and t["num_stages"] == 1 for t in fitted)
    assert all(t["TMA"] == tma for t in fitted)


@interpreted
def test_interpreted_cache_attention_with_the_smallest_tiles_computes_the_same(monkeypatch):
    """A 512-wide head on a GPU that takes 32-wide blocks at most: scores in head-dim chunks, output in blocks."""
    import dgemma.kernels.cache_attention as cache_attention
    from dgemma.model.attention import grouped_attention

    monkeypatch.setattr(cache_attention, "_cache_attention_kernel",
                        TooSmall(cache_attention._cache_attention_kernel, ("BLOCK_D", "BLOCK_DV"), limit=32))
    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d, written = 2, 5, 4, 2, 512, 40
    q = (torch.randn(b, t, hq, d, generator=gen) * d**-0.5).half()
    keys, values = (torch.randn(3, written, hkv, d, generator=gen).half() for _ in range(2))
    rows = torch.tensor([2, 0])
    key_end = torch.randint(written - 5, written + 1, (b, t), generator=gen)
    got = cache_attention.cache_attention_triton(q, keys, values, rows, None, key_end, None, block_m=16, block_n=16)
    mask = torch.arange(written) < key_end[..., None]
    expected = grouped_attention(q.float(), keys[rows].float(), values[rows].float(), mask[:, None])
    assert rel_err(got.float(), expected) < 4 * torch.finfo(torch.float16).eps
    [fitted] = launching._FITTED.values()
    assert fitted["BLOCK_D"] == 32 and fitted["BLOCK_DV"] == 32 and fitted["num_stages"] == 1
