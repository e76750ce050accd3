"""What `dgemma bench` measures. Each function returns plain numbers; the CLI prints and saves them.

Protocol of the concurrency runs (vLLM's, by default): random prompts of `prompt_len` tokens, `output_len` output
tokens with EOS ignored, a fixed number of denoising steps per canvas with adaptive stopping off (random weights
never become confident, which would otherwise make the work depend on the seed), all requests submitted at once
and served `concurrency` at a time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from dgemma.engine.autoregressive import ARResult, generate_ar
from dgemma.engine.denoisers import use_cuda_graphs
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request
from dgemma.engine.scheduler import SchedulerConfig, max_write_tokens
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.entropy_bound import EntropyBoundSampler
from dgemma.sampling.params import SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn() in ms, the device drained before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_us(fn, copies: int = 1, replays: int = 20) -> float:
    """Microseconds per call of fn() on a CUDA GPU: `copies` calls captured into one CUDA graph, replayed `replays`
    times, so launch costs drop out (a kernel's own time, as inside the engine's graphs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes) off the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(copies):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / copies * 1e3


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    if device.type != "cuda":
        nbytes = 1 << 27
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * nbytes / (ms / 1e3) / 1e9


def weight_bytes(model: DiffusionGemma) -> int:
    """Bytes of every parameter and buffer (FP8 weights count one byte each, their scales four)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


@torch.no_grad()
def encoded_prefix(model: DiffusionGemma, rows: int, prefix_len: int, capacity: int, max_write: int | None = None,
                   generator: torch.Generator | None = None) -> KVCache:
    """A cache of `rows` rows, each holding a random prompt of `prefix_len` tokens encoded in chunks of at most
    `max_write` tokens (one forward when None; a cache with `max_write` keeps sliding rings sized for it)."""
    device, cfg = model.device, model.config
    cache = KVCache(cfg, rows, capacity, model.dtype, device, max_write_tokens=max_write)
    ids = torch.randint(3, cfg.vocab_size, (rows, prefix_len), device=device, generator=generator)
    chunk = max_write or prefix_len
    for start in range(0, prefix_len, chunk):
        n = min(chunk, prefix_len - start)
        model.encode(ids[:, start : start + n],
                     AttentionBatch.for_encoder(list(range(rows)), [start] * rows, [n] * rows, cfg.sliding_window,
                                                cache), cache)
    return cache


@torch.no_grad()
def decoder_step_ms(model: DiffusionGemma, batch: int, prefix_len: int, repeats: int = 5,
                    forward_only: bool = False, chunk: int = SchedulerConfig.max_prefill_tokens,
                    queued: int = 0) -> float:
    """One whole denoising step (decoder forward, sampler, self-conditioning input) for `batch` canvases, its
    results read as after a step of adaptive stopping (launch, device time, the host's wait); with `queued` (CUDA
    graphs), that many steps launched back to back and read once, per step: a canvas of fixed steps as the engine
    runs it (`denoisers.must_read`), the host's work hidden behind the device's. With `forward_only`, the decoder
    forward alone (what the reference's step time measures).

    The cache is the engine's for an encoder budget of `chunk` tokens per step (the serving default): the prefix
    is encoded in chunks of that many tokens, and sliding layers keep a ring sized for them."""
    device, cfg = model.device, model.config
    cache = encoded_prefix(model, batch, prefix_len, prefix_len + cfg.canvas_length,
                           max_write_tokens(cfg.canvas_length, chunk))
    rows = list(range(batch))
    canvas = torch.randint(0, cfg.vocab_size, (batch, cfg.canvas_length), device=device)
    soft = torch.zeros(batch, cfg.canvas_length, cfg.hidden_size, dtype=model.dtype, device=device)
    attn = AttentionBatch.for_decoder(rows, [prefix_len] * batch, cfg.canvas_length, cfg.sliding_window, cache)
    if use_cuda_graphs(model) and not forward_only:
        from dgemma.engine.cuda_graphs import GraphedDenoiser

        graph = GraphedDenoiser(model, cache, [batch])
        gen = torch.Generator(device=device).manual_seed(0)
        for row in rows:
            graph.start_canvas(row, prefix_len, gen)
        knobs = [(0.6, 0.1, 0.0, 1234 + i, 0, 1) for i in rows]

        def graphed_step():
            b = graph.step(rows, knobs)
            graph.stop[:b].tolist()  # the engine's sync after a step whose results it reads (adaptive stopping)

        def queued_steps():
            for _ in range(queued - 1):
                graph.step(rows, knobs)
            graphed_step()

        if queued:
            return timed_ms(queued_steps, device, repeats=repeats) / queued
        return timed_ms(graphed_step, device, repeats=repeats)
    sampler = EntropyBoundSampler()
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    temperature = torch.full((batch,), 0.6, device=device)
    bound = torch.full((batch,), 0.1, device=device)

    def step():
        logits = model.decode(canvas, attn, cache, soft)
        if forward_only:
            logits.sum().item()
            return
        result = sampler.step(logits, temperature, [False] * batch, bound, gens, soft_embedding=model.soft_embedding)
        result.mean_entropy.tolist()  # the engine's sync after a step whose results it reads (adaptive stopping)

    return timed_ms(step, device, repeats=repeats)


@torch.no_grad()
def prefill_ms(model: DiffusionGemma, length: int, chunk: int = 8192, repeats: int = 3) -> float:
    """Encoder time for one prompt of `length` tokens, encoded in chunks of at most `chunk` (as the engine does)."""
    device, cfg = model.device, model.config
    write = max_write_tokens(cfg.canvas_length, chunk)  # the engine's: sliding layers keep a ring sized for it
    chunk = min(chunk, write)  # the engine never encodes more of one request in one forward
    cache = KVCache(cfg, 1, length + cfg.canvas_length, model.dtype, device, max_write_tokens=write)
    ids = torch.randint(3, cfg.vocab_size, (1, length), device=device)
    if use_cuda_graphs(model) and length <= 2048:  # what the engine does: replay a captured chunk
        from dgemma.engine.cuda_graphs import GraphedPrefill

        prefill = GraphedPrefill(model, cache, [t for t in (128, 512, 1024, 2048) if t >= length][:1])
        tokens = ids[0].tolist()

        def graphed():
            for start in range(0, length, prefill.max_chunk):
                prefill.run(0, tokens[start : start + prefill.max_chunk], start)

        return timed_ms(graphed, device, warmup=1, repeats=repeats)

    def run():
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            batch = AttentionBatch.for_encoder([0], [start], [n], cfg.sliding_window, cache)
            model.encode(ids[:, start : start + n], batch, cache)

    return timed_ms(run, device, warmup=1, repeats=repeats)


def ar_decode(model: DiffusionGemma, prompt_len: int, output_len: int, seed: int = 0) -> ARResult:
    """One greedy AR request over a random prompt, EOS ignored, timed after a short run that captures its graph."""
    prompt = random_prompts(1, prompt_len, model.config.vocab_size, seed)
    generate_ar(model, prompt, 8, ignore_eos=True)
    return generate_ar(model, prompt, output_len, ignore_eos=True)[0]


@dataclass
class ConcurrencyResult:
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    output_tok_s: float  # output tokens over wall time, prefill included
    decode_tok_s: float  # canvas tokens over the time between two canvases of a request (mean over requests)
    ttfc_ms_p50: float  # time to the first committed canvas
    ttfc_ms_p99: float
    latency_ms_p50: float
    latency_ms_p99: float
    mean_decode_batch: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@torch.no_grad()
def run_concurrency(
    model: DiffusionGemma, concurrency: int, requests: int, prompt_len: int, output_len: int, steps: int,
    seed: int = 0, max_prefill_tokens: int = 8192, fuse_canvas_encode: bool = True,
) -> ConcurrencyResult:
    cfg = model.config
    canvases = -(-output_len // cfg.canvas_length)
    engine = Engine(model, SchedulerConfig(
        max_num_seqs=concurrency, max_queue_len=requests, max_prefill_tokens=max_prefill_tokens,
        max_model_len=prompt_len + canvases * cfg.canvas_length, canvas_length=cfg.canvas_length,
    ), fuse_canvas_encode=fuse_canvas_encode)
    params = SamplingParams(max_new_tokens=output_len, max_denoising_steps=steps, ignore_eos=True,
                            adaptive_stopping=False)
    prompts = random_prompts(requests, prompt_len, cfg.vocab_size, seed)
    sync(model.device)
    start = time.perf_counter()
    reqs = []
    for i, p in enumerate(prompts):
        r = Request(str(i), p, params.with_overrides(seed=seed + i))
        r.stats.arrival_s = start
        engine.add_request(r)
        reqs.append(r)
    batches = []
    while engine.has_work:
        engine.step()
        if engine.last_step.decode_batch:
            batches.append(engine.last_step.decode_batch)
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in reqs)
    decode_speeds = []
    for r in reqs:
        commits = r.stats.commit_s
        if len(commits) >= 2:
            gaps = [b - a for a, b in zip(commits, commits[1:])]
            decode_speeds.append(cfg.canvas_length / statistics.mean(gaps))
    # Measured from admission, as vLLM's benchmark measures from sending: with --max-concurrency its client
    # holds a request back until a slot frees, so queueing is not part of TTFT or latency.
    ttfc = [(r.stats.first_canvas_s - r.stats.admitted_s) * 1e3 for r in reqs]
    latency = [(r.stats.finish_s - r.stats.admitted_s) * 1e3 for r in reqs]
    return ConcurrencyResult(
        concurrency=concurrency, requests=requests, output_tokens=tokens, wall_s=wall, output_tok_s=tokens / wall,
        decode_tok_s=statistics.mean(decode_speeds) if decode_speeds else float("nan"),
        ttfc_ms_p50=percentile(ttfc, 0.5), ttfc_ms_p99=percentile(ttfc, 0.99),
        latency_ms_p50=percentile(latency, 0.5), latency_ms_p99=percentile(latency, 0.99),
        mean_decode_batch=statistics.mean(batches) if batches else 0.0,
    )


@torch.no_grad()
def reference_generate_tok_s(reference, prompt_len: int, output_len: int, steps: int, vocab: int, seed: int = 0) -> dict:
    """The transformers reference, eager, on the same weights: one request, the same protocol."""
    device = next(p.device for p in reference.parameters() if not p.is_meta)
    ids = torch.tensor(random_prompts(1, prompt_len, vocab, seed), device=device)
    kwargs = dict(max_new_tokens=output_len, max_denoising_steps=steps, t_min=0.4, t_max=0.8,
                  stability_threshold=1, confidence_threshold=1e-30, eos_token_id=None)  # never stops early
    reference.generate(ids, **dict(kwargs, max_new_tokens=min(output_len, 2 * reference.config.canvas_length)))
    sync(device)
    start = time.perf_counter()
    out = reference.generate(ids, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    tokens = out.sequences.shape[1] - prompt_len
    return {"output_tokens": int(tokens), "wall_s": wall, "output_tok_s": tokens / wall}


@torch.no_grad()
def reference_decoder_step_ms(reference, prefix_len: int, vocab: int, repeats: int = 5) -> float:
    from transformers.cache_utils import DynamicCache

    device = next(p.device for p in reference.parameters() if not p.is_meta)
    ids = torch.randint(3, vocab, (1, prefix_len), device=device)
    cache = DynamicCache(config=reference.config.get_text_config())
    reference.model.encoder(input_ids=ids, past_key_values=cache)
    canvas = torch.randint(0, vocab, (1, reference.config.canvas_length), device=device)
    return timed_ms(lambda: reference(decoder_input_ids=canvas, past_key_values=cache).logits.sum().item(),
                    device, repeats=repeats)
