"""A generation request as the engine tracks it: what the scheduler reads, and the sampler's state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma.sampling.params import SamplingParams


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, no cache row yet
    ENCODING = "encoding"  # has tokens (prompt or committed canvas) not yet in the cache
    DENOISING = "denoising"  # a canvas is being denoised
    FINISHED = "finished"


@dataclass
class RequestStats:
    arrival_s: float = field(default_factory=time.perf_counter)
    admitted_s: float | None = None  # when it got a cache row (queueing ends)
    prefill_ms: float = 0.0  # encoder time of the steps that encoded this prompt
    # Encoder time of the steps that encoded committed canvases in a forward of their own (a canvas encoded by the
    # next canvas's first denoising forward costs no separate time: it is in denoise_ms).
    encode_ms: float = 0.0
    denoise_ms: float = 0.0  # decoder + sampler time of the steps this request took part in
    first_canvas_s: float | None = None  # when the first canvas was committed
    commit_s: list[float] = field(default_factory=list)  # when each canvas was committed
    finish_s: float | None = None
    forwards_per_canvas: list[int] = field(default_factory=list)

    @property
    def forwards(self) -> int:
        return sum(self.forwards_per_canvas)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    want_drafts: bool = False
    # Called with the output ids after each commit; True ends the request (stop strings live above the engine).
    stop_fn: Callable[[list[int]], bool] | None = None

    phase: Phase = Phase.WAITING
    row: int | None = None  # cache row while admitted
    cached_len: int = 0  # tokens of this request in the cache
    pending_ids: list[int] = field(default_factory=list)  # tokens to encode before the next canvas
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort"
    stop_token: int | None = None  # the EOS id that ended the output, if one did (not part of output_ids)
    stats: RequestStats = field(default_factory=RequestStats)

    # Denoising state of the current canvas (tensors on the model's device; with CUDA graphs it lives in the
    # graph's static buffers at this request's row instead).
    seed: int | None = None  # params.seed, or a random one drawn when the first canvas starts
    generator: torch.Generator | None = None
    canvas: torch.Tensor | None = None  # [C] current (noisy) canvas
    soft: torch.Tensor | None = None  # [C, H] self-conditioning input; None on a canvas's first step
    history: list[torch.Tensor] = field(default_factory=list)  # recent argmax canvases [C], oldest first
    remaining_steps: int = 0  # n in the temperature schedule: N at a canvas's first step
    canvas_forwards: int = 0

    def __post_init__(self):
        self.pending_ids = list(self.prompt_ids)

    @property
    def pending(self) -> int:
        return len(self.pending_ids)

    @property
    def in_prompt(self) -> bool:
        """Still encoding the prompt (no canvas committed yet)."""
        return not self.stats.forwards_per_canvas

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED


@dataclass
class RequestOutput:
    """What one engine step reports about one request."""

    request_id: str
    new_token_ids: list[int]  # committed this step (a canvas, cut at EOS / max_new_tokens)
    draft_ids: list[int] | None  # argmax of the canvas being denoised, if drafts were asked for
    finished: bool
    finish_reason: str | None
    request: Request
