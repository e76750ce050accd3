"""The tensor side of one denoising step, in two implementations behind one small interface.

`EagerDenoiser` (CPU, and any GPU): the model's float32 logits, then the reference-order sampler with one
`torch.Generator` per request, so a lone request reproduces the Hugging Face reference token for token.
`GraphDenoiser` (CUDA, bfloat16): the whole step replayed as a CUDA graph with the fused Triton sampler and
counter-based randomness; same distribution, different random stream, no per-row Python work.
The engine picks one in `make_denoiser` and is otherwise the same on every device.
"""

from __future__ import annotations

import secrets

import torch

from dgemma.engine.request import Request
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.entropy_bound import EntropyBoundSampler, initial_canvas, stable_and_confident


def step_temperature(r: Request) -> float:
    return r.params.temperature_at(r.remaining_steps) * (r.params.temperature or 1.0)


def must_read(requests: list[Request]) -> bool:
    """Whether the host needs this step's results: a row that may stop early (adaptive stopping), a canvas's last
    step (its argmax is committed), or drafts. Otherwise the step is only queued: the host goes on to schedule and
    launch the next one while the device computes it, so a canvas's steps run back to back without a host gap (a
    canvas of fixed steps syncs once, at its last)."""
    return any(r.params.adaptive_stopping or r.remaining_steps == 1 or r.want_drafts for r in requests)


class EagerDenoiser:
    def __init__(self, model: DiffusionGemma, cache: KVCache):
        self.model, self.cache = model, cache
        self.sampler = EntropyBoundSampler()

    def start_canvas(self, r: Request) -> None:
        cfg = self.model.config
        if r.generator is None:
            r.generator = torch.Generator(device=self.model.device).manual_seed(r.seed)
        r.canvas = initial_canvas(cfg.vocab_size, cfg.canvas_length, r.generator, self.model.device)[0]
        r.soft, r.history = None, []

    def end_canvas(self, r: Request) -> None:
        r.canvas, r.soft, r.history = None, None, []

    def step(self, requests: list[Request], committed: torch.Tensor | None = None
             ) -> tuple[list[bool], list[list[int] | None]]:
        """One step for `requests` (sorted by row). Returns per request: stopped, and the argmax canvas
        (as a list) for those that stopped or asked for drafts.

        `committed` [B, C] ids: the canvas each request committed just before its current one (counted in its
        cached_len, at the C positions before the canvas), encoded by this step's forward instead of its own."""
        cfg, device = self.model.config, self.model.device
        c, rows = cfg.canvas_length, [r.row for r in requests]
        canvas = torch.stack([r.canvas for r in requests])  # [B, C]
        soft = None
        if any(r.soft is not None for r in requests):
            zeros = torch.zeros(c, cfg.hidden_size, dtype=self.model.dtype, device=device)
            soft = torch.stack([zeros if r.soft is None else r.soft for r in requests])  # [B, C, H]
        if committed is None:
            batch = AttentionBatch.for_decoder(rows, [r.cached_len for r in requests], c, cfg.sliding_window,
                                               self.cache)
            logits = self.model.decode(canvas, batch, self.cache, soft)  # [B, C, V] float32
        else:
            batch = AttentionBatch.for_encode_and_decode(rows, [r.cached_len - c for r in requests], c,
                                                         cfg.sliding_window, self.cache)
            hidden = self.model.encode_and_decode_hidden(committed.to(device), canvas, batch, self.cache, soft)
            logits = self.model.logits(hidden)  # [B, C, V] float32
        temperature = torch.tensor([step_temperature(r) for r in requests], device=device)
        bound = torch.tensor([r.params.entropy_bound for r in requests], device=device)
        result = self.sampler.step(logits, temperature, [r.params.temperature == 0 for r in requests], bound,
                                   [r.generator for r in requests], soft_embedding=self.model.soft_embedding)
        del logits
        stop = [False] * len(requests)
        if any(r.params.adaptive_stopping for r in requests):
            never = torch.zeros((), dtype=torch.bool, device=device)
            stop = torch.stack([
                stable_and_confident(r.history, result.argmax[i], result.mean_entropy[i],
                                     r.params.stability_threshold, r.params.confidence_threshold)
                if r.params.adaptive_stopping else never
                for i, r in enumerate(requests)
            ]).tolist()  # the one host sync of a step: the scheduler must know which rows stopped
        argmax_lists: list[list[int] | None] = []
        for i, r in enumerate(requests):
            argmax = result.argmax[i]
            r.history.append(argmax)
            del r.history[: -max(r.params.stability_threshold, 1)]
            r.canvas, r.soft = result.canvas[i], result.soft[i]
            last = stop[i] or r.remaining_steps == 1
            argmax_lists.append(argmax.tolist() if (last or r.want_drafts) else None)
        return stop, argmax_lists


class GraphDenoiser:
    def __init__(self, model: DiffusionGemma, cache: KVCache, max_rows: int, pool=None,
                 fuse_canvas_encode: bool = False):
        from dgemma.engine.cuda_graphs import GraphedDenoiser, buckets_up_to

        self.model = model
        self.graph = GraphedDenoiser(model, cache, buckets_up_to(max_rows), pool, fuse_canvas_encode)

    def start_canvas(self, r: Request) -> None:
        if r.generator is None:
            r.generator = torch.Generator(device=self.model.device).manual_seed(r.seed)
        self.graph.start_canvas(r.row, r.cached_len, r.generator)

    def end_canvas(self, r: Request) -> None:
        self.graph.end_canvas(r.row)

    def step(self, requests: list[Request], committed: torch.Tensor | None = None
             ) -> tuple[list[bool], list[list[int] | None]]:
        """As `EagerDenoiser.step`."""
        from dgemma.engine.cuda_graphs import step_seed

        knobs = []
        for r in requests:
            p = r.params
            canvas_index = len(r.stats.forwards_per_canvas)
            # Adaptive stopping off: a confidence threshold of 0 can never be undercut by a mean entropy.
            confidence = p.confidence_threshold if p.adaptive_stopping else 0.0
            knobs.append((step_temperature(r), p.entropy_bound, confidence,
                          step_seed(r.seed, canvas_index, r.canvas_forwards), int(p.temperature == 0),
                          p.stability_threshold))
        rows = [r.row for r in requests]
        b = self.graph.step(rows, knobs, committed)
        if not must_read(requests):  # no row can stop (the graph's `stop` stays false): nothing to wait for
            return [False] * len(requests), [None] * len(requests)
        stop_all = self.graph.stop[:b].tolist()  # the one host sync of a step
        stop = [stop_all[row] for row in rows]
        wanted = [i for i, r in enumerate(requests) if stop[i] or r.remaining_steps == 1 or r.want_drafts]
        argmax_lists: list[list[int] | None] = [None] * len(requests)
        if wanted:
            index = torch.tensor([rows[i] for i in wanted], device=self.model.device)
            for i, tokens in zip(wanted, self.graph.argmax.index_select(0, index).tolist()):
                argmax_lists[i] = tokens
        return stop, argmax_lists


def use_cuda_graphs(model: DiffusionGemma) -> bool:
    from dgemma.model.moe import grouped_mm_supported

    return (model.device.type == "cuda" and model.dtype == torch.bfloat16
            and grouped_mm_supported(model.device, model.dtype))


def make_denoiser(model: DiffusionGemma, cache: KVCache, max_rows: int, cuda_graphs: bool | None, pool=None,
                  fuse_canvas_encode: bool = False):
    """`fuse_canvas_encode`: whether steps may be given committed canvases to encode (the graphed denoiser then
    captures a second graph set; the eager one needs nothing)."""
    if cuda_graphs is None:
        cuda_graphs = use_cuda_graphs(model)
    if cuda_graphs:
        return GraphDenoiser(model, cache, max_rows, pool, fuse_canvas_encode)
    return EagerDenoiser(model, cache)


def resolve_seed(r: Request) -> None:
    if r.seed is None:
        r.seed = r.params.seed if r.params.seed is not None else secrets.randbits(62)
