"""The engine: each `step()` runs what the scheduler planned, one encoder batch then one decoder batch.

    plan = scheduler.schedule()
    encode pending tokens (prompts, committed canvases)  -> cache
    start new canvases (uniform random tokens)
    one batched denoising forward over every active canvas, then the sampler per row
    commit the rows that stopped; report committed tokens, drafts and finished requests

The same code runs on CPU and GPU; requests come and go between steps.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch

from dgemma.engine.request import Phase, Request, RequestOutput
from dgemma.engine.scheduler import EncodeWork, Scheduler, SchedulerConfig
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.entropy_bound import EntropyBoundSampler, initial_canvas, stable_and_confident


@dataclass
class StepStats:
    encode_tokens: int = 0
    encode_batch: int = 0
    decode_batch: int = 0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    committed_canvases: int = 0


class Engine:
    def __init__(self, model: DiffusionGemma, config: SchedulerConfig | None = None):
        self.model = model
        self.model_config = model.config
        self.config = config or SchedulerConfig(canvas_length=model.config.canvas_length)
        if self.config.canvas_length != model.config.canvas_length:
            raise ValueError(
                f"scheduler canvas_length {self.config.canvas_length} != model canvas_length "
                f"{model.config.canvas_length}"
            )
        self.scheduler = Scheduler(self.config)
        self.cache = KVCache(model.config, self.config.max_num_seqs, self.config.max_model_len, model.dtype, model.device)
        self.sampler = EntropyBoundSampler()
        self.last_step = StepStats()
        self.total_steps = 0

    # ------------------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
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
        if plan.encode:
            self._encode(plan.encode)
        for request in plan.start_canvas:
            self._start_canvas(request)
        if plan.decode:
            outputs = self._denoise(plan.decode)
        self.total_steps += 1
        return outputs

    # ------------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        # Timing needs the device to be done; on CPU this is free.
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _encode(self, works: list[EncodeWork]) -> None:
        device = self.model.device
        works = sorted(works, key=lambda w: w.request.row)
        width = max(w.num_tokens for w in works)
        ids = torch.full((len(works), width), self.model_config.pad_token_id, dtype=torch.long)
        for i, w in enumerate(works):
            ids[i, : w.num_tokens] = torch.tensor(w.request.pending_ids[: w.num_tokens])
        batch = AttentionBatch.for_encoder(
            [w.request.row for w in works], [w.request.cached_len for w in works], [w.num_tokens for w in works],
            self.model_config.sliding_window, self.cache,
        )
        start = time.perf_counter()
        self.model.encode(ids.to(device), batch, self.cache)
        self._sync()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        for w in works:
            request = w.request
            request.cached_len += w.num_tokens
            del request.pending_ids[: w.num_tokens]
            if w.is_prompt:
                request.stats.prefill_ms += elapsed_ms
            else:
                request.stats.encode_ms += elapsed_ms
        self.last_step.encode_tokens = sum(w.num_tokens for w in works)
        self.last_step.encode_batch = len(works)
        self.last_step.encode_ms = elapsed_ms

    def _start_canvas(self, request: Request) -> None:
        device = self.model.device
        if request.generator is None:
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            request.generator = torch.Generator(device=device).manual_seed(seed)
        cfg = self.model_config
        request.canvas = initial_canvas(cfg.vocab_size, cfg.canvas_length, request.generator, device)[0]
        request.soft = None
        request.history = []
        request.remaining_steps = request.params.max_denoising_steps
        request.canvas_forwards = 0
        request.phase = Phase.DENOISING

    def _denoise(self, requests: list[Request]) -> list[RequestOutput]:
        start = time.perf_counter()
        requests = sorted(requests, key=lambda r: r.row)  # contiguous rows are read in place, without a gather
        canvas = torch.stack([r.canvas for r in requests])  # [B, C]
        soft = None
        if any(r.soft is not None for r in requests):
            zeros = None
            rows = []
            for r in requests:
                if r.soft is None:
                    zeros = zeros if zeros is not None else torch.zeros_like(next(q.soft for q in requests if q.soft is not None))
                    rows.append(zeros)
                else:
                    rows.append(r.soft)
            soft = torch.stack(rows)  # [B, C, H]
        batch = AttentionBatch.for_decoder(
            [r.row for r in requests], [r.cached_len for r in requests], self.model_config.canvas_length,
            self.model_config.sliding_window, self.cache,
        )
        logits = self.model.decode(canvas, batch, self.cache, soft)  # [B, C, V] float32

        device = logits.device
        temperature = torch.tensor(
            [r.params.temperature_at(r.remaining_steps) * (r.params.temperature or 1.0) for r in requests],
            device=device,
        )
        bound = torch.tensor([r.params.entropy_bound for r in requests], device=device)
        result = self.sampler.step(
            logits, temperature, [r.params.temperature == 0 for r in requests], bound, [r.generator for r in requests],
            soft_embedding=self.model.soft_embedding,
        )
        del logits
        never = torch.zeros((), dtype=torch.bool, device=device)
        stop = torch.stack([
            stable_and_confident(r.history, result.argmax[i], result.mean_entropy[i],
                                 r.params.stability_threshold, r.params.confidence_threshold)
            if r.params.adaptive_stopping else never
            for i, r in enumerate(requests)
        ]).tolist()  # the one host sync of a step: the scheduler must know which rows stopped

        outputs = []
        now = time.perf_counter()
        elapsed_ms = (now - start) * 1e3
        for i, r in enumerate(requests):
            r.stats.denoise_ms += elapsed_ms
            r.canvas_forwards += 1
            r.remaining_steps -= 1
            argmax = result.argmax[i]
            r.history.append(argmax)
            del r.history[: -max(r.params.stability_threshold, 1)]
            draft = argmax.tolist() if r.want_drafts else None
            if stop[i] or r.remaining_steps == 0:
                outputs.append(self._commit(r, argmax.tolist() if draft is None else draft, now))
            else:
                r.canvas = result.canvas[i]
                r.soft = result.soft[i]
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
        r.canvas, r.soft, r.history = None, None, []
        if reason is not None:
            r.stats.finish_s = now
            self.scheduler.finish(r, reason)
        else:
            r.phase = Phase.ENCODING
            r.pending_ids = list(tokens)
        return RequestOutput(r.request_id, new, tokens if r.want_drafts else None, reason is not None, reason, r)
