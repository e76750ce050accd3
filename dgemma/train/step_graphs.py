"""The forward and backward of a training step as one CUDA graph per batch shape.

A 12 M-parameter model at 512 rows is host-bound in eager PyTorch: a step issues ~28,000 aten calls (three passes
over 8 layers, forward and backward, with many RMSNorms, RoPEs and masks), and the GPU waits on Python, not on
arithmetic. Replaying a captured graph issues the same kernels with one call.

A graph replays fixed shapes and fixed addresses, so:
  - batches come padded to few shapes (`BatchSampler.static_shape`, `pad_batch`): rows x a width rounded up to a
    multiple of 32, with padding rows and columns that change no loss and no gradient;
  - the objective reads every bound from device tensors (`block_diffusion_loss` builds its attention batches with
    `AttentionBatch.from_bounds` over the whole cache) and draws its noise from the default CUDA generator, which
    graphs advance on each replay;
  - the batch is copied into static input buffers, and the gradients land in static tensors that are handed back
    as the parameters' `.grad` after each replay. The optimizer step stays eager: it is a handful of fused kernels.

Each shape is captured the first time it comes (after one warm-up pass on a side stream, whose gradients are
dropped), all shapes in one memory pool: their activations never live at the same time.
With `capture=False` (any device) the same buffers are used and the step just runs, so the logic around the graphs
is tested on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from dgemma.train.dataset import TrainBatch
from dgemma.train.objective import LossParts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Shape:
    inputs: TrainBatch  # static device buffers the graph reads
    parts: LossParts | None = None  # static outputs the graph writes
    grads: list[torch.Tensor | None] = dataclasses.field(default_factory=list)  # one per parameter
    graph: torch.cuda.CUDAGraph | None = None


class GraphedLossStep:
    """`step(batch)`: loss forward and backward for a batch of a static shape; the parameters' `.grad` hold the
    gradients afterwards (as after `loss.backward()`) and the returned parts are the step's own copies."""

    def __init__(self, params: list[torch.nn.Parameter], loss_fn: Callable[[TrainBatch], LossParts],
                 autocast: Callable[[], AbstractContextManager], capture: bool):
        self.params = params
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.shapes: dict[tuple[int, int], _Shape] = {}

    def _forward_backward(self, batch: TrainBatch) -> LossParts:
        with self.autocast():
            parts = self.loss_fn(batch)
        parts.loss.backward()
        return parts

    def _new_shape(self, batch: TrainBatch, device: torch.device) -> _Shape:
        inputs = TrainBatch(*(t.to(device, copy=True) for t in batch.tensors()))  # buffers of its own
        shape = _Shape(inputs)
        if not self.capture:
            log.info("static training step %d: batches of %d x %d tokens", len(self.shapes) + 1, *batch.input_ids.shape)
            return shape
        start = time.perf_counter()
        for p in self.params:
            p.grad = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._forward_backward(shape.inputs)  # warm-up: lazy initialisation must not be captured
        torch.cuda.current_stream(device).wait_stream(stream)
        for p in self.params:
            p.grad = None  # the warm-up's gradients are dropped; backward in the capture allocates in the pool
        shape.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(shape.graph, pool=self.pool):
            shape.parts = self._forward_backward(shape.inputs)
        shape.grads = [p.grad for p in self.params]
        # The time says what a new shape costs (seconds uncompiled; with torch.compile, any recompile shows here).
        log.info("static training step %d: batches of %d x %d tokens (captured in %.1f s)", len(self.shapes) + 1,
                 *batch.input_ids.shape, time.perf_counter() - start)
        return shape

    def prepare(self, batch: TrainBatch, device: torch.device) -> None:
        """Warm up and capture the shape of `batch` now (any tokens of that shape will do), so that the first real
        batch of the shape just replays: the trainer captures every shape while the corpus is being generated,
        and with torch.compile that warm-up is also where the objective compiles."""
        key = tuple(batch.input_ids.shape)
        if key not in self.shapes:
            self.shapes[key] = self._new_shape(batch, device)

    def step(self, batch: TrainBatch, device: torch.device) -> LossParts:
        key = tuple(batch.input_ids.shape)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = self._new_shape(batch, device)
        else:
            for static, new in zip(shape.inputs.tensors(), batch.tensors()):
                static.copy_(new, non_blocking=True)
        if shape.graph is None:
            parts = self._forward_backward(shape.inputs)
        else:
            shape.graph.replay()
            for p, grad in zip(self.params, shape.grads):
                p.grad = grad
            parts = shape.parts  # overwritten by the next replay: copied below
        return LossParts(*(getattr(parts, f.name).detach().clone() for f in dataclasses.fields(parts)))
