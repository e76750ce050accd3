"""Launching a Triton kernel with a tile that fits the GPU it runs on.

The tiles in this package were tuned on Hopper GPUs, which give a block up to 227 KB of shared memory. An A100 gives
163 KB and Ada GPUs 99 KB, so a tuned tile (deep pipelines, a 512-wide head dimension) can fail to launch there
with Triton's OutOfResources. `launch` then tries smaller tiles, fewer pipeline stages first, then halved block
sizes, and remembers the first that fits for that kernel, tile and device: later calls, and the CUDA graphs that
capture them, launch it directly. Every tile computes the same function (blocks only split the same loops), so
nothing but speed changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from triton.runtime.errors import OutOfResources

log = logging.getLogger(__name__)

# (kernel, device index, tile as given) -> the tile that launched. A memo of facts about the hardware, like
# functools.cache: the same key always gets the same answer.
_FITTED: dict[tuple, dict] = {}

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def smaller_tiles(tile: dict, blocks: tuple[str, ...]) -> Iterator[dict]:
    """Tiles after `tile`, each smaller than the one before: one pipeline stage fewer (down to 1); then the largest
    of `blocks` halved (at least MIN_BLOCK) with the stages reset, and so on, until nothing can shrink."""
    stages = tile.get("num_stages", 1)
    current = dict(tile)
    while True:
        while current.get("num_stages", 1) > 1:
            current = dict(current, num_stages=current["num_stages"] - 1)
            yield current
        halvable = [k for k in blocks if current.get(k, 0) >= 2 * MIN_BLOCK]
        if not halvable:
            return
        largest = max(halvable, key=lambda k: current[k])
        current = dict(current, **{largest: current[largest] // 2})
        if "num_stages" in tile:
            current["num_stages"] = stages
        yield current


def launch(kernel, grid: Callable[[dict], tuple], tile: dict, blocks: tuple[str, ...], *args, **constants) -> dict:
    """kernel[grid(t)](*args, **constants, **t) with t = `tile` or, if that does not fit in this GPU's shared
    memory, the first of `smaller_tiles(tile, blocks)` that does. Returns the tile that ran; raises the first
    OutOfResources if none fits."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    key = (id(kernel), device, tuple(sorted(tile.items())))
    fitted = _FITTED.get(key)
    if fitted is not None:
        kernel[grid(fitted)](*args, **constants, **fitted)
        return fitted
    first_error = None
    for candidate in (tile, *smaller_tiles(tile, blocks)):
        try:
            kernel[grid(candidate)](*args, **constants, **candidate)
        except OutOfResources as exc:
            first_error = first_error or exc
            continue
        if candidate is not tile:
            name = getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
            log.warning("%s: tile %s needs more shared memory than this GPU has; using %s", name, tile, candidate)
        _FITTED[key] = candidate
        return candidate
    raise first_error
