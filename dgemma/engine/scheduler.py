"""The step-level scheduler: plain Python over requests, no tensors. Requests in, step plans out.

Every engine step runs at most one encoder batch and one decoder batch. The plan for a step:
  1. admit waiting requests (FIFO) into free cache rows, up to `max_num_seqs` at once;
  2. encode pending tokens within a token budget: committed canvases of running requests first (they block a
     denoising request), then prompts, long prompts in chunks, so prefill never stalls running requests for
     more than one budget's worth of encoder work;
  3. denoise every request that has a canvas, including those whose last pending tokens are encoded in
     this same step, each at its own step and canvas.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from dgemma.engine.request import Phase, Request
from dgemma.errors import DgemmaError, RequestError


class QueueFull(DgemmaError):
    """The waiting queue is at its limit: the caller should answer 503/429 and let the client retry."""


# Big enough that one chunk keeps a GPU busy (in the 26B model each of 128 experts gets ~8192 * 8 / 128 = 512 rows),
# small enough that the sliding layers' rings (W - 1 + this many slots per row) stay far below long contexts.
DEFAULT_MAX_CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16  # requests holding a cache row (being encoded or denoised) at once
    max_queue_len: int = 256  # requests waiting for a row; more are refused
    max_prefill_tokens: int = 2048  # encoder tokens per step
    # Encoder tokens of one request per step: a longer prompt takes several steps even if the budget allows more,
    # because the sliding layers' ring caches are sized for the most tokens one forward writes (`max_write_tokens`).
    max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS
    max_model_len: int = 4096  # prompt + generated canvases, per request
    canvas_length: int = 256

    def __post_init__(self):
        for name in ("max_num_seqs", "max_prefill_tokens", "max_chunk_tokens", "max_model_len", "canvas_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_queue_len, int) or self.max_queue_len < 0:
            raise RequestError(f"max_queue_len must be an integer >= 0, got {self.max_queue_len!r}")
        if self.max_model_len <= self.canvas_length:
            raise RequestError(
                f"max_model_len ({self.max_model_len}) must exceed the canvas length ({self.canvas_length})"
            )

    @property
    def max_write_tokens(self) -> int:
        """The most tokens one engine forward writes into a cache row: a canvas, or one encode work."""
        return max_write_tokens(self.canvas_length, self.max_prefill_tokens, self.max_chunk_tokens)


def max_write_tokens(canvas_length: int, max_prefill_tokens: int,
                     max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS) -> int:
    """`SchedulerConfig.max_write_tokens` from plain numbers (to size a cache before the config exists)."""
    return max(canvas_length, min(max_prefill_tokens, max_chunk_tokens))


@dataclass
class EncodeWork:
    request: Request
    num_tokens: int  # the first num_tokens of request.pending_ids
    is_prompt: bool


@dataclass
class StepPlan:
    encode: list[EncodeWork] = field(default_factory=list)
    start_canvas: list[Request] = field(default_factory=list)  # begin a new canvas this step (after encoding)
    decode: list[Request] = field(default_factory=list)  # one denoising step each, in one batch

    @property
    def empty(self) -> bool:
        return not (self.encode or self.decode)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order
        # A heap: the lowest free row goes first, so busy rows stay packed at the bottom of the cache (CUDA-graph
        # steps run over rows [0, B)).
        self.free_rows: list[int] = list(range(config.max_num_seqs))
        self._ids: set[str] = set()

    # ------------------------------------------------------------------------------------------------------
    def tokens_needed(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache positions a request can use: its prompt plus every canvas it may denoise."""
        canvases = -(-max_new_tokens // self.config.canvas_length)
        return prompt_len + canvases * self.config.canvas_length

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestError("the prompt is empty: at least one token is needed")
        if prompt_len + self.config.canvas_length > self.config.max_model_len:
            raise RequestError(
                f"the prompt has {prompt_len} tokens; with one canvas of {self.config.canvas_length} it exceeds "
                f"max_model_len ({self.config.max_model_len})"
            )
        needed = self.tokens_needed(prompt_len, max_new_tokens)
        if needed > self.config.max_model_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}, rounded up to whole canvases "
                f"of {self.config.canvas_length}) needs {needed} positions, more than max_model_len "
                f"({self.config.max_model_len}); lower max_tokens to at most "
                f"{(self.config.max_model_len - prompt_len) // self.config.canvas_length * self.config.canvas_length}"
            )

    def add(self, request: Request) -> None:
        if request.request_id in self._ids:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        self.check_fits(len(request.prompt_ids), request.params.max_new_tokens)
        # Free rows are taken only at the next schedule(): a burst added between two steps may fill them, then
        # the queue, and no more.
        if len(self.waiting) >= self.config.max_queue_len + len(self.free_rows):
            raise QueueFull(
                f"server busy: {len(self.running)} requests running and {len(self.waiting)} waiting "
                f"(max_num_seqs={self.config.max_num_seqs}, max_queue_len={self.config.max_queue_len}); retry later"
            )
        self._ids.add(request.request_id)
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Mark finished and release its row (a no-op for a request already finished)."""
        if request.phase is Phase.FINISHED:
            return
        request.phase = Phase.FINISHED
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.row is not None:
            heapq.heappush(self.free_rows, request.row)
            request.row = None
        self._ids.discard(request.request_id)

    def abort(self, request_id: str) -> Request | None:
        for request in list(self.running) + list(self.waiting):
            if request.request_id == request_id:
                self.finish(request, "abort")
                return request
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        while self.waiting and self.free_rows:
            request = self.waiting.popleft()
            request.row = heapq.heappop(self.free_rows)
            request.phase = Phase.ENCODING
            request.stats.admitted_s = time.perf_counter()
            self.running.append(request)

        plan = StepPlan()
        budget = self.config.max_prefill_tokens
        needs_encoding = [r for r in self.running if r.phase is Phase.ENCODING and r.pending]
        # Committed canvases first: each blocks a request that is otherwise ready to denoise.
        needs_encoding.sort(key=lambda r: r.in_prompt)
        for request in needs_encoding:
            if budget == 0:
                break
            n = min(request.pending, budget, self.config.max_chunk_tokens)
            budget -= n
            plan.encode.append(EncodeWork(request, n, is_prompt=request.in_prompt))
            if n == request.pending:
                plan.start_canvas.append(request)
        plan.decode = [r for r in self.running if r.phase is Phase.DENOISING] + plan.start_canvas
        return plan
