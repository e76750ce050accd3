"""The engine: each `step()` runs what the scheduler planned, one encoder batch then one decoder batch.

    plan = scheduler.schedule()
    encode pending tokens (prompts, committed canvases)  -> cache
    start new canvases (uniform random tokens)
    one batched denoising step over every active canvas (a `denoisers` implementation: eager, or a CUDA graph)
    commit the rows that stopped; report committed tokens, drafts and finished requests

When every canvas of the step is the first after a canvas committed by the previous step (batch 1, or requests
in lock-step), the committed canvases are encoded by the denoising forward itself (`_fusable`): one read of the
weights instead of two.

The same code runs on CPU and GPU; requests come and go between steps. A step whose results the host does not need
(no row can stop early, none ends its canvas, none wants drafts: `denoisers.must_read`) is only queued, so the host
schedules the next one while the device computes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dgemma.engine import denoisers
from dgemma.engine.denoisers import GraphDenoiser, make_denoiser, resolve_seed
from dgemma.engine.request import Phase, Request, RequestOutput
from dgemma.engine.scheduler import EncodeWork, Scheduler, SchedulerConfig, StepPlan
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache


@dataclass
class StepStats:
    encode_tokens: int = 0  # encoder tokens, fused ones included
    encode_batch: int = 0  # encode works, fused ones included
    fused_encodes: int = 0  # encode works done by the denoising forward (their time is in decode_ms)
    decode_batch: int = 0
    encode_ms: float = 0.0  # the separate encoder forwards
    decode_ms: float = 0.0
    committed_canvases: int = 0


class Engine:
    # No gradient while the CUDA graphs are captured: the fused kernels and packed projections are chosen only
    # without grad, and a graph keeps the ops it was captured with.
    @torch.no_grad()
    def __init__(self, model: DiffusionGemma, config: SchedulerConfig | None = None, cuda_graphs: bool | None = None,
                 fuse_canvas_encode: bool = True):
        """`cuda_graphs`: None picks them on a CUDA device in bfloat16 (see `denoisers.make_denoiser`).
        `fuse_canvas_encode`: encode a committed canvas in the next canvas's first denoising forward where the
        step allows it (off: always a separate encoder forward; the results are the same up to rounding)."""
        self.model = model
        self.model_config = model.config
        self.config = config or SchedulerConfig(canvas_length=model.config.canvas_length)
        if self.config.canvas_length != model.config.canvas_length:
            raise ValueError(
                f"scheduler canvas_length {self.config.canvas_length} != model canvas_length "
                f"{model.config.canvas_length}"
            )
        self.scheduler = Scheduler(self.config)
        # Sliding layers keep a ring sized for the most tokens one forward writes per row (a canvas, or one encode
        # work: the scheduler caps a request's chunk at max_chunk_tokens); the cache refuses any larger write.
        self.cache = KVCache(model.config, self.config.max_num_seqs, self.config.max_model_len, model.dtype,
                             model.device, max_write_tokens=self.config.max_write_tokens)
        # A fused forward writes 2C tokens per row. The ring is not grown for it: the default encoder budgets (2048
        # tokens and up; 2C = 512) already size it for 2C, and growing it for a smaller budget would cost C more
        # slots per row on every sliding layer; an engine whose ring cannot take 2C keeps the separate forward.
        self.fuse_canvas_encode = fuse_canvas_encode and self.cache.fits_write(2 * model.config.canvas_length)
        pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None
        self.denoiser = make_denoiser(model, self.cache, self.config.max_num_seqs, cuda_graphs, pool,
                                      self.fuse_canvas_encode)
        self.canvas_encoder = self.prefill = None
        if isinstance(self.denoiser, GraphDenoiser):
            from dgemma.engine.cuda_graphs import GraphedEncoder, GraphedPrefill, buckets_up_to

            self.canvas_encoder = GraphedEncoder(model, self.cache, model.config.canvas_length,
                                                 buckets_up_to(self.config.max_num_seqs), pool)
            chunks = [t for t in (128, 512, 1024, 2048) if t <= self.config.max_prefill_tokens]
            self.prefill = GraphedPrefill(model, self.cache, chunks, pool) if chunks else None
        self.last_step = StepStats()
        self.total_steps = 0
        # Requests of the steps queued since the host last waited for the device (`denoisers.must_read`): the
        # device time a wait then spends finishing those steps is theirs, not the wait's caller's.
        self._queued: set[Request] = set()

    # ------------------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        for r in self.scheduler.running:
            if r.request_id == request_id and r.phase is Phase.DENOISING:
                self.denoiser.end_canvas(r)
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return RequestOutput(request_id, [], None, True, "abort", request)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.last_step = StepStats()
        outputs: list[RequestOutput] = []
        fused = self._fusable(plan)
        separate = [w for w in plan.encode if all(w is not f for f in fused)]
        if separate:
            self._encode(separate)
        committed = {w.request: w.request.pending_ids[: w.num_tokens] for w in fused}  # request -> [C] ids
        for w in fused:  # counted as cached from here on: the new canvas starts after them
            self._advance(w)
        self.last_step.encode_tokens += sum(w.num_tokens for w in fused)
        self.last_step.encode_batch += len(fused)
        self.last_step.fused_encodes = len(fused)
        for request in plan.start_canvas:
            self._start_canvas(request)
        if plan.decode:
            outputs = self._denoise(plan.decode, committed)
        self.total_steps += 1
        return outputs

    # ------------------------------------------------------------------------------------------------------
    def _fusable(self, plan: StepPlan) -> list[EncodeWork]:
        """The encode works this step's denoising forward does itself (none: a separate encoder forward).

        One forward has one shape, so every request it denoises must be starting its canvas after a committed
        canvas of exactly C tokens encoded this step: batch 1, and requests in lock-step. A request mid-canvas
        (or one whose prompt or a piece of a canvas is encoded) keeps the step unfused. Encode works of requests
        that do not denoise this step (prompt chunks) touch other cache rows: they run first, separately."""
        if not (self.fuse_canvas_encode and plan.decode):
            return []
        c = self.model_config.canvas_length
        canvases = {w.request: w for w in plan.encode if not w.is_prompt and w.num_tokens == c}
        starting = set(plan.start_canvas)
        if all(r in canvases and r in starting for r in plan.decode):
            return [canvases[r] for r in plan.decode]
        return []

    def _sync(self) -> None:
        # Timing needs the device to be done; on CPU this is free.
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _finish_queued_steps(self) -> None:
        """Wait for the queued steps, and count the wait as their requests' denoising time."""
        if not self._queued:
            return
        start = time.perf_counter()
        self._sync()
        waited_ms = (time.perf_counter() - start) * 1e3
        for r in self._queued:
            r.stats.denoise_ms += waited_ms
        self._queued.clear()

    def _encode(self, works: list[EncodeWork]) -> None:
        self._finish_queued_steps()  # so that the encode's time below is the encode's alone
        start = time.perf_counter()
        c = self.model_config.canvas_length
        graphed = [w for w in works if self.canvas_encoder is not None and not w.is_prompt and w.num_tokens == c]
        prompts = [w for w in works if self.prefill is not None and w.is_prompt
                   and w.num_tokens <= self.prefill.max_chunk]
        eager = [w for w in works if w not in graphed and w not in prompts]
        if graphed:
            graphed.sort(key=lambda w: w.request.row)
            ids = torch.tensor([w.request.pending_ids[:c] for w in graphed])
            self.canvas_encoder.run([w.request.row for w in graphed], ids, [w.request.cached_len for w in graphed])
        for w in prompts:  # one replay per prompt chunk: a chunk is long enough to fill the GPU alone
            self.prefill.run(w.request.row, w.request.pending_ids[: w.num_tokens], w.request.cached_len)
        if eager:
            self._encode_eager(sorted(eager, key=lambda w: w.request.row))
        self._sync()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        for w in works:
            self._advance(w)
            if w.is_prompt:
                w.request.stats.prefill_ms += elapsed_ms
            else:
                w.request.stats.encode_ms += elapsed_ms
        self.last_step.encode_tokens += sum(w.num_tokens for w in works)
        self.last_step.encode_batch += len(works)
        self.last_step.encode_ms = elapsed_ms

    @staticmethod
    def _advance(work: EncodeWork) -> None:
        """The work's tokens are (or, fused, are about to be) in the cache."""
        work.request.cached_len += work.num_tokens
        del work.request.pending_ids[: work.num_tokens]

    def _encode_eager(self, works: list[EncodeWork]) -> None:
        width = max(w.num_tokens for w in works)
        ids = torch.full((len(works), width), self.model_config.pad_token_id, dtype=torch.long)
        for i, w in enumerate(works):
            ids[i, : w.num_tokens] = torch.tensor(w.request.pending_ids[: w.num_tokens])
        batch = AttentionBatch.for_encoder(
            [w.request.row for w in works], [w.request.cached_len for w in works], [w.num_tokens for w in works],
            self.model_config.sliding_window, self.cache,
        )
        self.model.encode(ids.to(self.model.device), batch, self.cache)

    def _start_canvas(self, request: Request) -> None:
        resolve_seed(request)
        request.remaining_steps = request.params.max_denoising_steps
        request.canvas_forwards = 0
        request.phase = Phase.DENOISING
        self.denoiser.start_canvas(request)

    def _denoise(self, requests: list[Request], committed: dict[Request, list[int]]) -> list[RequestOutput]:
        """One denoising step; `committed`: the ids of the canvas each request committed before, for a step that
        encodes them too (empty, or one entry per request)."""
        start = time.perf_counter()
        requests = sorted(requests, key=lambda r: r.row)  # contiguous rows are read in place, without a gather
        fused_ids = torch.tensor([committed[r] for r in requests]) if committed else None  # [B, C]
        stop, argmaxes = self.denoiser.step(requests, fused_ids)
        if denoisers.must_read(requests):  # its results were read: the device is done with every step before
            self._queued.clear()
        else:
            self._queued.update(requests)
        outputs = []
        now = time.perf_counter()
        elapsed_ms = (now - start) * 1e3
        for i, r in enumerate(requests):
            r.stats.denoise_ms += elapsed_ms
            r.canvas_forwards += 1
            r.remaining_steps -= 1
            draft = argmaxes[i] if r.want_drafts else None
            if stop[i] or r.remaining_steps == 0:
                self.denoiser.end_canvas(r)
                outputs.append(self._commit(r, argmaxes[i], now))
            else:
                outputs.append(RequestOutput(r.request_id, [], draft, False, None, r))
        self.last_step.decode_batch = len(requests)
        self.last_step.decode_ms = elapsed_ms
        return outputs

    def _commit(self, r: Request, tokens: list[int], now: float) -> RequestOutput:
        """Keep the argmax canvas: cut at the first EOS or at max_new_tokens, then finish or queue its encoding."""
        params = r.params
        r.stats.forwards_per_canvas.append(r.canvas_forwards)
        r.stats.commit_s.append(now)
        if r.stats.first_canvas_s is None:
            r.stats.first_canvas_s = now
        self.last_step.committed_canvases += 1
        room = params.max_new_tokens - len(r.output_ids)
        eos = None
        if not params.ignore_eos and params.eos_token_ids:
            eos = next((k for k, t in enumerate(tokens) if t in params.eos_token_ids), None)
        reason = None
        if eos is not None and eos <= room:
            new, reason = tokens[:eos], "stop"
            r.stop_token = tokens[eos]
        elif len(tokens) >= room:
            new, reason = tokens[:room], "length"
        else:
            new = tokens
        r.output_ids.extend(new)
        if reason is None and r.stop_fn is not None and r.stop_fn(r.output_ids):
            reason = "stop"
        if reason is not None:
            r.stats.finish_s = now
            self.scheduler.finish(r, reason)
        else:
            r.phase = Phase.ENCODING
            r.pending_ids = list(tokens)
        return RequestOutput(r.request_id, new, tokens if r.want_drafts else None, reason is not None, reason, r)
