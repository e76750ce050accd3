"""A second CUDA stream on which each layer's dense MLP runs beside its router and routed experts, and its new keys
and values are normalised into the cache beside the queries' norm.

The dense MLP and the mixture of experts read the same residual and meet only in the layer's output norms, so
nothing orders one after the other. On one stream they still run in turn, and neither fills the GPU alone: at a
batch-1 denoising step the experts stream 1.5 GB of weights a layer through kernels that keep memory busy, while
the MLP's GEMMs over 256 rows occupy a fraction of the SMs, and the router's kernels are a chain of tiny launches;
at batch 8 the MLP is compute-bound beside memory-bound experts. On two streams the MLP fills what the other
branch leaves idle. In attention the keys' and values' norm kernels (which write the cache) and the queries' norm
read one GEMM's output and meet only at the attention kernel: at one decoded token they are two short chains.

Fork and join are stream waits, used only inside CUDA graph capture (the engine's denoising steps, canvas encodes,
prompt chunks and AR tokens): the side stream joins the capture at the fork and leaves it at the join, so the
captured step holds the two branches as parallel paths that replay concurrently. Memory stays safe without
`record_stream`: the fork's input is freed only after the join, and the side stream's own allocations are reused
only by the side stream, after a later fork.

Measured on an H200 (`scripts/side_stream_ab.py`, docs/benchmarks.md): an AR token 4.29 -> 3.79 ms (+13% tok/s);
the batch-1 and batch-8 denoising steps moved within their noise (about 0.3 ms).
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
    def active(side: "SideStream | None") -> "SideStream | None":
        """`side` where a fork pays now, else None: inside CUDA graph capture, for inference. A captured fork and
        join are edges of the graph and cost nothing at replay; eager, each is an event recorded and waited on from
        the host, which a launch-bound forward pays every layer (a batch-1 decoder forward, eager, on an H200: 33-36
        ms on one stream, 37.6 ms with the forks), while a GPU-bound one gains nothing (an 8192-token prefill: 317
        ms either way). A training step (gradients, torch.compile) keeps one stream."""
        if side is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return side if torch.cuda.is_current_stream_capturing() else None

    def fork(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) queued on the side stream after all the work queued so far on the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            return fn(*args)

    def join(self) -> None:
        """Later work on the current stream waits for everything queued on the side stream."""
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
