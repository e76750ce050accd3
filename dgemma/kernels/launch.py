"""Launching a Triton kernel with a tile that fits the GPU it runs on.

The tiles in this package were tuned on Hopper GPUs, which give a block up to 227 KB of shared memory. An A100 gives
163 KB and Ada GPUs 99 KB, so a tuned tile (deep pipelines, a 512-wide head dimension) can fail to launch there
with Triton's OutOfResources. `launch` then tries smaller tiles, fewer pipeline stages first, then halved block
sizes, and remembers the first that fits for that kernel, tile and device: later calls, and the CUDA graphs that
capture them, launch it directly. Every tile computes the same function (blocks only split the same loops), so
nothing but speed changes.

It also holds the one switch of programmatic dependent launch (PDL, Hopper and later): a kernel launched with
`pdl_options` may have its programs scheduled while the kernel before it on the stream finishes, and waits in
`wait_for_inputs` until that kernel's writes are visible. An autoregressive token runs ~20 small kernels a layer
back to back; each otherwise pays its launch and ramp after the previous one has drained (measured in
`scripts/pdl_probe.py`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
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


def launch(kernel, grid: Callable[[dict], tuple], tile: dict, blocks: tuple[str, ...], *args,
           per_tile: Callable[[dict], dict] | None = None, **constants) -> dict:
    """kernel[grid(t)](*args, **per_tile(t), **constants, **t) with t = `tile` or, if that does not fit in this
    GPU's shared memory, the first of `smaller_tiles(tile, blocks)` that does. `per_tile`: the arguments that follow
    the tile (tensor descriptors, whose boxes are the tile's blocks). Returns the tile that ran; raises the first
    OutOfResources if none fits."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    key = (id(kernel), device, tuple(sorted(tile.items())))

    def run(t: dict) -> None:
        kernel[grid(t)](*args, **(per_tile(t) if per_tile else {}), **constants, **t)

    fitted = _FITTED.get(key)
    if fitted is not None:
        run(fitted)
        return fitted
    first_error = None
    for candidate in (tile, *smaller_tiles(tile, blocks)):
        try:
            run(candidate)
        except OutOfResources as exc:
            first_error = first_error or exc
            continue
        if candidate is not tile:
            name = getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
            log.warning("%s: tile %s needs more shared memory than this GPU has; using %s", name, tile, candidate)
        _FITTED[key] = candidate
        return candidate
    raise first_error


# Programmatic dependent launch for the kernels that take `pdl_options` (False: plain launches, for A/Bs), in
# forwards of at most PDL_MAX_ROWS tokens. Read at launch time: a CUDA graph keeps what was on when captured.
# `python scripts/flags_ab.py`, one H100, one process, two rounds (2026-12-07), PDL at every size: AR 241.8 / 241.7
# -> 256.7 / 256.9 tok/s (with the few-row products), step b1 21.94 / 22.03 -> 21.89 / 21.88 ms, but b8 53.55 /
# 53.42 -> 54.31 / 54.51 ms: there the next kernel's waiting programs hold SMs that the side stream's dense MLP
# would use. Hence the row limit: a batch-1 canvas (256 rows) and decoded tokens, not larger batches.
PDL = True
PDL_MAX_ROWS = 256


@functools.cache
def _capability_9(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def hopper_or_later(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9.0 or later: programmatic dependent launch, the
    tensor-memory accelerator (TMA)."""
    if device.type != "cuda":
        return False
    return _capability_9(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(device: torch.device, rows: int) -> dict:
    """The PDL constant and launch option of a kernel that calls `wait_for_inputs(PDL)` before it reads another
    kernel's output or stores anything, for a call over `rows` tokens: on for CUDA devices of compute capability 9.0
    and later (while `PDL`, up to PDL_MAX_ROWS rows), off elsewhere (the Triton interpreter included)."""
    if PDL and rows <= PDL_MAX_ROWS and hopper_or_later(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Let the next kernel's programs be scheduled, then wait until every write of the kernel before has landed.
    A PDL kernel calls it before it reads another kernel's output or stores anything (a store could overwrite what
    the previous kernel still reads); only data no kernel writes, such as weights, may be read earlier."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
