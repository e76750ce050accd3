"""CUDA graphs of the engine's fixed-shape steps, one per batch-size bucket, over cache rows [0, B).

On a GPU the eager step is bound by Python launching ~3000 kernels; a replayed graph launches them at once.
Three steps have fixed shapes and are captured:
  * `GraphedDenoiser`: a whole denoising step: decoder forward, LM head in bf16, the fused Triton sampler
    (entropy, argmax, Gumbel sample, noise, self-conditioning probabilities), Entropy Bound acceptance,
    renoising, and the stable-and-confident stop test. Each request's denoising state lives in the static
    buffers at its cache row, so a step moves nothing but a few per-row scalars host -> device. A second set of
    graphs runs the first step of a canvas with the encoding of the canvas committed before it in the same forward.
  * `GraphedEncoder(T)`: the encoder over T tokens per row: T = canvas length encodes committed canvases,
    T = 1 is autoregressive decoding.
Rows in [0, B) that take no part in a step (free, or encoding a prompt) still run, on garbage, with their cache
writes sent to the trash slot; keeping busy rows low (the scheduler hands out the lowest free row) keeps B small.
Shapes are fixed, so attention reads fixed slot ranges: full layers the whole capacity, sliding layers their whole
ring (kv_cache.py; as long as the capacity in the full layout), masked on the device from per-row bounds.
Static tensors are updated in place (`copy_`, `fill_`) because the graphs read their addresses.
"""

from __future__ import annotations

import torch

from dgemma.model.attention import AttentionBatch, visible_positions
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.entropy_bound import entropy_bound_accept

MASK62 = (1 << 62) - 1


def step_seed(seed: int, canvas: int, step: int) -> int:
    """A per-row, per-step seed for the counter-based sampler (splitmix64 over the three numbers)."""
    x = seed & MASK62
    for v in (canvas + 1, step + 1):
        x = (x ^ (v * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & MASK62


def buckets_up_to(n: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to n (always included)."""
    return sorted({b for b in (1, 2, 4) if b < n} | set(range(8, n, 8)) | {n})


class _Captured:
    """Capture `fn(b)` for each bucket b (largest first, one shared memory pool) and replay by bucket.

    With `capture=False` (any device) `replay` just calls `fn(b)`: the static-buffer logic around the graphs then
    runs, and is tested, on a CPU.
    """

    def __init__(self, fn, buckets: list[int], pool=None, capture: bool = True):
        self.buckets = sorted(buckets)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.fn = None if capture else fn
        if not capture:
            return
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                fn(b)  # warm up: lazy initialisation (cuBLAS handles, Triton compilation) must not be captured
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def bucket(self, rows_needed: int) -> int:
        for b in self.buckets:
            if b >= rows_needed:
                return b
        raise ValueError(f"{rows_needed} rows exceed the largest captured bucket {self.buckets[-1]}")

    def replay(self, rows_needed: int) -> int:
        b = self.bucket(rows_needed)
        if self.fn is not None:
            self.fn(b)
        else:
            self.graphs[b].replay()
        return b


class _RowBounds:
    """Static per-row attention inputs for T tokens per row: positions, write slots and key bounds."""

    def __init__(self, rows: int, tokens: int, device: torch.device, trash_slot: int):
        self.tokens = tokens
        self.trash_slot = trash_slot
        # positions, write slots, first and one past the last visible position (sliding layers): [4, rows, T], one
        # tensor so that `advance` moves them all in one kernel
        self.table = torch.zeros(4, rows, tokens, dtype=torch.long, device=device)
        self.positions, self.write_slots, self.key_start, self.key_end = self.table.unbind(0)  # [rows, T] each
        self.write_slots.fill_(trash_slot)
        self.key_end.fill_(1)
        # One past the row's last written position (places a sliding ring's slots). 1, not 0, before a row is first
        # set: a garbage row then still sees one key (position 0), so it computes finite values, as in the full layout.
        self.written_end = torch.ones(rows, dtype=torch.long, device=device)
        self.offsets = torch.arange(tokens, device=device)

    def set_row(self, row: int, prefix_len: int, window: int, causal: bool) -> None:
        """All the row's tokens are encoder tokens (`causal`) or all one decoder canvas."""
        self.set_split_row(row, prefix_len, window, self.tokens if causal else 0)

    def set_split_row(self, row: int, prefix_len: int, window: int, causal_tokens: int) -> None:
        """The row's first `causal_tokens` tokens are encoder tokens, the rest one decoder canvas after them; what
        each sees is `visible_positions`'s rule, the one the eager `AttentionBatch` builders use."""
        pos, key_start, key_end = visible_positions(prefix_len, self.offsets, causal_tokens, window)  # [T] each
        self.positions[row].copy_(pos)
        self.write_slots[row].copy_(pos)
        self.written_end[row] = prefix_len + self.tokens
        self.key_start[row].copy_(key_start)
        self.key_end[row].copy_(key_end)

    def deactivate(self, row: int) -> None:
        self.write_slots[row].fill_(self.trash_slot)

    def advance(self, b: int) -> None:
        """Rows [0, b), each set by `set_row(causal=True)` with one token, move on to the next position: what
        `set_row(row, prefix_len + 1, ...)` would write, in two kernels and no host value (autoregressive decoding;
        every bound of a causal token is its position plus a constant)."""
        self.table[:, :b] += 1
        self.written_end[:b] += 1

    def batch(self, b: int, cache: KVCache, rows: torch.Tensor | None = None, canvas: bool = False) -> AttentionBatch:
        """Rows [0, b) read in place, or (with `rows`, a static [b] tensor) the cache rows it names, gathered.
        Full layers scan the whole capacity, sliding layers their ring (the capacity too in the full layout)."""
        if rows is None:
            rows, row_range = torch.arange(b, device=self.positions.device), (0, b)
        else:
            row_range = None
        return AttentionBatch.from_bounds(rows, self.positions[:b], self.write_slots[:b], self.key_start[:b],
                                          self.key_end[:b], self.written_end[:b], cache.capacity, cache,
                                          row_range=row_range, canvas=canvas)

    def set_prompt_chunk(self, prefix_len: int, n: int, window: int) -> None:
        """Row 0 holds a chunk of n <= tokens prompt tokens; the padding after it writes to the trash slot."""
        self.set_row(0, prefix_len, window, causal=True)
        self.written_end[0] = prefix_len + n
        if n < self.tokens:
            self.write_slots[0, n:].fill_(self.trash_slot)


class GraphedDenoiser:
    """A denoising step per bucket; with `fuse_canvas_encode`, a second graph per bucket whose forward also encodes
    the canvas each row committed just before (`DiffusionGemma.encode_and_decode_hidden`), for the first step of
    the next canvas. Both sets share the memory pool: they never run at once, and their outputs are static.

    Memory: a fused forward over b rows holds the activations of 2bC tokens, as a plain step over 2b rows would
    (the LM head and sampler still see bC). Where the full layers' attention scores dominate (long capacities:
    b x 2C x heads x capacity float32 scores), the pool's peak is about twice the plain set's."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, buckets: list[int], pool=None,
                 fuse_canvas_encode: bool = False, capture: bool = True):
        cfg, device = model.config, model.device
        self.model, self.cache = model, cache
        n, c = max(buckets), cfg.canvas_length
        cache.check_write(c)
        self.bounds = _RowBounds(n, c, device, cache.trash_slot)
        self.canvas_start = [0] * n  # per row: the prefix length its current canvas follows
        self.canvas = torch.zeros(n, c, dtype=torch.long, device=device)  # [N, C] current noisy canvas
        self.soft = torch.zeros(n, c, cfg.hidden_size, dtype=model.dtype, device=device)  # [N, C, H]
        self.prev_argmax = torch.full((n, c), -1, dtype=torch.long, device=device)
        self.stable_steps = torch.zeros(n, dtype=torch.int32, device=device)  # steps the argmax stayed the same
        # Per-row knobs, refreshed every step from one packed host copy.
        self.temperature = torch.ones(n, dtype=torch.float32, device=device)
        self.bound = torch.full((n,), 0.1, dtype=torch.float32, device=device)
        self.confidence = torch.zeros(n, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(n, dtype=torch.int64, device=device)
        self.greedy = torch.zeros(n, dtype=torch.int32, device=device)
        self.stability = torch.zeros(n, dtype=torch.int32, device=device)
        # Outputs.
        self.argmax = torch.zeros(n, c, dtype=torch.long, device=device)
        self.stop = torch.zeros(n, dtype=torch.bool, device=device)
        self.graphs = _Captured(self._step, buckets, pool, capture)
        self.fused_graphs = None
        if fuse_canvas_encode:
            cache.check_write(2 * c)
            # Bounds of the committed canvas and the new canvas after it, live only for the rows of the last fused
            # step (the others write to the trash slot).
            self.fused_bounds = _RowBounds(n, 2 * c, device, cache.trash_slot)
            self.fused_live: set[int] = set()
            self.committed = torch.zeros(n, c, dtype=torch.long, device=device)  # [N, C] ids the fused step encodes
            self.fused_graphs = _Captured(lambda b: self._step(b, fused=True), buckets, pool, capture)

    def _step(self, b: int, fused: bool = False) -> None:
        from dgemma.kernels.fused_sampler import fused_sample  # Triton: imported only where a GPU step runs

        model, cfg = self.model, self.model.config
        if fused:
            batch = self.fused_bounds.batch(b, self.cache)
            hidden = model.encode_and_decode_hidden(self.committed[:b], self.canvas[:b], batch, self.cache,
                                                    self.soft[:b])  # [b, C, H]
        else:
            batch = self.bounds.batch(b, self.cache, canvas=True)
            hidden = model.decode_hidden(self.canvas[:b], batch, self.cache, self.soft[:b])  # [b, C, H]
        logits = hidden @ model.embed_tokens.weight.T  # [b, C, V] bf16: softcapping happens in the sampler
        entropy, argmax, sample, noise = fused_sample(
            logits, self.temperature[:b], self.seeds[:b], self.greedy[:b], cfg.final_logit_softcapping
        )
        self.soft[:b].copy_((logits @ model.embed_tokens.weight) * model.embed_scale_t)  # logits now hold probs
        accepted = entropy_bound_accept(entropy, self.bound[:b])
        self.canvas[:b].copy_(torch.where(accepted, sample, noise))
        same = (argmax == self.prev_argmax[:b]).all(dim=-1)
        self.stable_steps[:b].copy_(torch.where(same, self.stable_steps[:b] + 1, 0))
        confident = entropy.mean(dim=-1) < self.confidence[:b]
        self.stop[:b].copy_((self.stable_steps[:b] >= self.stability[:b]) & confident)
        self.prev_argmax[:b].copy_(argmax)
        self.argmax[:b].copy_(argmax)

    def start_canvas(self, row: int, prefix_len: int, generator: torch.Generator) -> None:
        cfg = self.model.config
        self.canvas[row].copy_(torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=generator,
                                             device=self.canvas.device))
        self.soft[row].zero_()
        self.prev_argmax[row].fill_(-1)
        self.stable_steps[row] = 0
        self.bounds.set_row(row, prefix_len, cfg.sliding_window, causal=False)
        self.canvas_start[row] = prefix_len

    def end_canvas(self, row: int) -> None:
        self.bounds.deactivate(row)

    def step(self, rows: list[int], knobs: list[tuple[float, float, float, int, int, int]],
             committed: torch.Tensor | None = None) -> int:
        """Run one step for `rows`; knobs per row: (temperature, bound, confidence, seed, greedy, stability).
        `committed` [len(rows), C]: the canvas each row committed just before its current one, at the C positions
        before it, encoded by this step's forward (the fused graphs). Returns the bucket that ran; results are in
        `stop` and `argmax`."""
        floats = torch.tensor([[k[0], k[1], k[2]] for k in knobs], dtype=torch.float32)
        ints = torch.tensor([[k[3], k[4], k[5]] for k in knobs], dtype=torch.int64)
        index = torch.tensor(rows)
        dev = self.canvas.device
        index_d = index.to(dev, non_blocking=True)
        floats_d, ints_d = floats.to(dev, non_blocking=True), ints.to(dev, non_blocking=True)
        self.temperature.index_copy_(0, index_d, floats_d[:, 0])
        self.bound.index_copy_(0, index_d, floats_d[:, 1])
        self.confidence.index_copy_(0, index_d, floats_d[:, 2])
        self.seeds.index_copy_(0, index_d, ints_d[:, 0])
        self.greedy.index_copy_(0, index_d, ints_d[:, 1].to(torch.int32))
        self.stability.index_copy_(0, index_d, ints_d[:, 2].to(torch.int32))
        if committed is None:
            return self.graphs.replay(max(rows) + 1)
        if self.fused_graphs is None:
            raise ValueError("this denoiser was built without fuse_canvas_encode: it has no fused graphs")
        c = self.model.config.canvas_length
        for row in self.fused_live - set(rows):
            self.fused_bounds.deactivate(row)
        for row in rows:
            self.fused_bounds.set_split_row(row, self.canvas_start[row] - c, self.model.config.sliding_window, c)
        self.fused_live = set(rows)
        self.committed.index_copy_(0, index_d, committed.to(dev, non_blocking=True))
        return self.fused_graphs.replay(max(rows) + 1)


class GraphedPrefill:
    """Prompt chunks of one request at a time, at any cache row, padded up to a captured chunk length."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, chunk_lengths: list[int], pool=None,
                 capture: bool = True):
        self.model, self.cache = model, cache
        device = model.device
        self.row = torch.zeros(1, dtype=torch.long, device=device)  # the cache row this replay writes
        self.lengths = sorted(chunk_lengths)
        self.bounds = {t: _RowBounds(1, t, device, cache.trash_slot) for t in self.lengths}
        self.ids = {t: torch.zeros(1, t, dtype=torch.long, device=device) for t in self.lengths}
        self.graphs = {t: _Captured(lambda _b, t=t: self._step(t), [1], pool, capture) for t in self.lengths}

    def _step(self, t: int) -> None:
        self.model.encode(self.ids[t], self.bounds[t].batch(1, self.cache, self.row), self.cache)

    @property
    def max_chunk(self) -> int:
        return self.lengths[-1]

    def run(self, row: int, ids: list[int], prefix_len: int) -> None:
        n = len(ids)
        self.cache.check_write(n)  # padding writes to the trash slot: only the n real tokens count
        t = next(t for t in self.lengths if t >= n)
        self.row.fill_(row)
        self.bounds[t].set_prompt_chunk(prefix_len, n, self.model.config.sliding_window)
        padded = ids + [self.model.config.pad_token_id] * (t - n)
        self.ids[t].copy_(torch.tensor([padded]), non_blocking=True)
        self.graphs[t].replay(1)


class GraphedEncoder:
    """The encoder over `tokens` tokens per row for rows [0, B); with `next_token`, also the greedy next token of
    each row's last position (autoregressive decoding)."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, tokens: int, buckets: list[int], pool=None,
                 next_token: bool = False, capture: bool = True):
        n = max(buckets)
        cache.check_write(tokens)
        self.model, self.cache, self.next_token = model, cache, next_token
        self.bounds = _RowBounds(n, tokens, model.device, cache.trash_slot)
        self.ids = torch.zeros(n, tokens, dtype=torch.long, device=model.device)
        self.out_token = torch.zeros(n, dtype=torch.long, device=model.device)
        self.live: set[int] = set()  # rows whose write slots are real (the others write to the trash slot)
        self.graphs = _Captured(self._step, buckets, pool, capture)

    def _step(self, b: int) -> None:
        hidden = self.model.encode(self.ids[:b], self.bounds.batch(b, self.cache), self.cache)
        if self.next_token:
            self.out_token[:b].copy_(self.model.logits(hidden[:, -1]).argmax(dim=-1))

    def run(self, rows: list[int], ids: torch.Tensor, prefix_lens: list[int]) -> int:
        """Encode ids [len(rows), T] after each row's prefix; other rows write nothing."""
        cfg = self.model.config
        for row in self.live - set(rows):
            self.bounds.deactivate(row)
        for i, row in enumerate(rows):
            self.bounds.set_row(row, prefix_lens[i], cfg.sliding_window, causal=True)
        self.live = set(rows)
        # non_blocking: a plain host-to-device copy would wait for the forward queued before this one (generate_ar
        # queues the next token's forward while the GPU still runs the current one).
        index = torch.tensor(rows).to(self.ids.device, non_blocking=True)
        self.ids.index_copy_(0, index, ids.to(self.ids.device, non_blocking=True))
        return self.graphs.replay(max(rows) + 1)

    def run_next(self, b: int) -> int:
        """Autoregressive decoding after a `run` of rows [0, b) with one token each: every row's next token, the
        greedy one the last forward wrote to `out_token`, at the next position. Three kernels before the replay and
        no host-to-device copy, where `run` takes ~17 small ops a token."""
        if not self.next_token or self.bounds.tokens != 1 or self.live != set(range(b)):
            raise ValueError(f"run_next decodes rows [0, {b}) after a run of them, one token each (next_token "
                             f"graphs), not rows {sorted(self.live)} of {self.bounds.tokens} tokens")
        self.bounds.advance(b)
        self.ids[:b, 0].copy_(self.out_token[:b])
        return self.graphs.replay(b)
