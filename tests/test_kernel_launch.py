"""`dgemma.kernels.launch`: a tile tuned for Hopper that needs more shared memory than the GPU has (an A100, an Ada
card) launches as the first smaller tile that fits, and that choice is remembered. A fake kernel stands in for the
GPU: it refuses, as Triton does, any tile whose pipeline needs more than its shared memory."""

from __future__ import annotations

import pytest

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
