"""A second CUDA stream on which each layer's dense MLP runs beside its router and routed experts, and its new keys
and values are normalised into the cache beside the queries' norm.

The dense MLP and the mixture of experts read the same residual and meet only in the layer's output norms, so
nothing orders one after the other. On one stream they still run in turn, and neither fills the GPU alone: at a
batch-1 denoising step the experts stream 1.5 GB of weights a layer through kernels that keep memory busy, while
the MLP's GEMMs over 256 rows occupy a fraction of the SMs, and the router's kernels are a chain of tiny launches;
at batch 8 the MLP is compute-bound beside memory-bound experts. On two streams the MLP fills what the other
branch leaves idle. In attention the keys' and values' norm kernels (which write the cache) and the queries' norm
read one GEMM's output and meet only at the attention kernel: at one decoded token they are two short chains.

Fork and join are stream waits. Eager, they order the two streams. Inside CUDA graph capture the side stream joins
the capture at the fork and leaves it at the join, so the captured step holds the two branches as parallel paths
that replay concurrently. Memory stays safe without `record_stream`: the fork's input is freed only after the
join, and the side stream's own allocations are reused only by the side stream, after a later fork.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class SideStream:
    def __init__(self, device: torch.device, priority: int = 0):
        # priority: 0 is the default streams' (the lowest); negative numbers are higher (for A/B runs).
        self.stream = torch.cuda.Stream(device, priority=priority)

    @staticmethod
    def usable() -> bool:
        """Inference only: a training step (gradients, torch.compile) keeps one stream."""
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def fork(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) queued on the side stream after all the work queued so far on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            return fn(*args)

    def join(self) -> None:
        """Later work on the current stream waits for everything queued on the side stream."""
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
