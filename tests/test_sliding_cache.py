"""Sliding layers keep only their window: a ring of S = min(capacity, W - 1 + max_write_tokens) slots per row.

A tiny model with a window of 8 and canvases of 4 makes prompts several windows long cheap, so the ring wraps
many times. The ring must change nothing but memory: generation gives the same tokens as the full layout, every
slot a mask opens holds the position the mask assumes, and a forward that would overwrite keys it still needs
is refused.
"""

from __future__ import annotations

import pytest
import torch
from small_window import (
    CPU,
    C,
    W,
    encode_in_pieces,
    random_ids,
    small_window_config,
    small_window_model,
)

import dgemma.engine.autoregressive as autoregressive_module
import dgemma.engine.engine as engine_module
from dgemma.checkpoint.random_init import InitScale, build_random_model, preset
from dgemma.config import FULL, SLIDING
from dgemma.engine.autoregressive import generate_ar
from dgemma.engine.cuda_graphs import GraphedEncoder, GraphedPrefill, _RowBounds
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request
from dgemma.engine.scheduler import SchedulerConfig
from dgemma.model.attention import AttentionBatch, read_slots
from dgemma.model.kv_cache import (
    KVCache,
    bytes_per_position,
    cache_bytes,
    max_positions_that_fit,
    slot_bytes,
    step_workspace_bytes,
)
from dgemma.sampling.params import SamplingParams

TOL = 1e-5  # the same float32 operations with the keys in another order: rounding only


@pytest.fixture(scope="module")
def config():
    return small_window_config()


@pytest.fixture(scope="module")
def model(config):
    return small_window_model(config)


def full_layout(monkeypatch, module) -> None:
    """Make `module` build its caches with the full layout, whatever it asks for."""
    monkeypatch.setattr(module, "KVCache", lambda *args, max_write_tokens=None, **kwargs: KVCache(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Memory


def test_sliding_layers_keep_a_ring_of_window_plus_max_write_slots(config):
    cache = KVCache(config, 3, 100, torch.float32, CPU, max_write_tokens=5)
    assert cache.ring and cache.sliding_slots == W - 1 + 5 and cache.max_write_tokens == 5
    for layer, kind in enumerate(config.layer_types):
        slots = 100 if kind == FULL else W - 1 + 5
        assert cache.keys[layer].shape[1] == cache.values[layer].shape[1] == slots + 1  # one trash slot per row
    per_row = 101 * slot_bytes(config, torch.float32, FULL) + (W - 1 + 5 + 1) * slot_bytes(config, torch.float32, SLIDING)
    assert cache.nbytes == 3 * per_row == cache_bytes(config, torch.float32, 3, 100, 5)
    assert cache.nbytes < KVCache(config, 3, 100, torch.float32, CPU).nbytes


def test_a_cache_no_longer_than_the_ring_keeps_the_full_layout(config):
    """capacity <= W - 1 + max_write: slot = position on every layer, exactly as without max_write_tokens."""
    ring = KVCache(config, 2, W - 1 + 5, torch.float32, CPU, max_write_tokens=5)
    full = KVCache(config, 2, W - 1 + 5, torch.float32, CPU)
    assert not ring.ring and ring.max_write_tokens is None
    assert [k.shape for k in ring.keys] == [k.shape for k in full.keys]
    assert cache_bytes(config, torch.float32, 2, W - 1 + 5, 5) == 2 * (W + 5) * bytes_per_position(config, torch.float32)


@pytest.mark.parametrize("write", [None, 256, 2048])
def test_max_positions_that_fit_is_the_longest_cache_that_fits(write):
    """Checked on the released model's shapes, where the ring matters: the answer fits, one more does not."""
    big = preset("26b-a4b")
    for free_gb in (8, 20, 45, 70):
        free = free_gb << 30
        room = free - step_workspace_bytes(big, 16)
        fit = max_positions_that_fit(big, torch.bfloat16, 16, free, write)
        assert cache_bytes(big, torch.bfloat16, 16, fit, write) <= room < cache_bytes(big, torch.bfloat16, 16, fit + 1, write)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_writing_more_than_the_ring_allows_is_refused(config, model):
    cache = KVCache(config, 2, 100, torch.float32, CPU, max_write_tokens=3)  # ring of W - 1 + 3 slots
    with pytest.raises(ValueError, match="at most 3 tokens per forward"):
        AttentionBatch.for_encoder([0, 1], [0, 0], [2, 4], W, cache)
    with pytest.raises(ValueError, match="ring of 10 slots"):
        AttentionBatch.for_decoder([0], [20], C, W, cache)  # a canvas of 4 > 3
    with pytest.raises(ValueError, match="at most 3 tokens"):
        GraphedEncoder(model, cache, C, [1], capture=False)
    prefill = GraphedPrefill(model, cache, [8], capture=False)  # padding may exceed the ring, tokens may not
    prefill.run(0, random_ids(3, 0), 0)
    with pytest.raises(ValueError, match="a forward writes 4 tokens"):
        prefill.run(0, random_ids(4, 0), 3)
    full = KVCache(config, 2, 100, torch.float32, CPU)  # the full layout takes any forward
    AttentionBatch.for_encoder([0, 1], [0, 0], [50, 4], W, full)


# ---------------------------------------------------------------------------------------------------------------
# Masks


class TagRing:
    """Writes a tag per token instead of its key into sliding layer 0: its position, or position + 0.5 for a
    canvas's scratch. The slots a query may see must then hold exactly the tags of the positions of its window."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        cache.keys[0].fill_(-1000.0)  # what a previous request of the row left behind

    def forward(self, batch: AttentionBatch, valid: torch.Tensor, key_start, key_end, scratch_from=None):
        """valid [B, T]; key_start/key_end [B, T] the window in positions; scratch_from [B]: the canvas start."""
        keys = self.cache.keys[0]
        tag = batch.positions.float() + (0.5 if scratch_from is not None else 0.0)
        keys[batch.rows[:, None], batch.write_slots[SLIDING], 0, 0] = tag  # write, then attend
        seen = read_slots(keys, batch, SLIDING, self.cache)[..., 0, 0]  # [B, K]
        mask = batch.mask(SLIDING)[:, 0]  # [B, T, K]
        for b in range(valid.shape[0]):
            for t in range(valid.shape[1]):
                if not valid[b, t]:
                    continue
                window = range(max(0, int(key_start[b, t])), int(key_end[b, t]))
                expected = [q + (0.5 if scratch_from is not None and q >= scratch_from[b] else 0.0) for q in window]
                assert sorted(seen[b][mask[b, t]].tolist()) == expected, (b, t)


@pytest.mark.parametrize("max_write,piece", [(5, 4), (4, 3), (6, 1)])
def test_open_slots_hold_the_positions_their_masks_assume(config, max_write, piece):
    """An engine-like life of three ragged rows: prompts in chunks, denoising steps that write scratch after the
    prefix, canvases committed in pieces of `piece` tokens, all batched. Eager batches (reading a window of the
    ring) and static-buffer batches of the CUDA-graph steps (reading the whole ring) are both checked."""
    cache = KVCache(config, 3, 400, torch.float32, CPU, max_write_tokens=max_write)
    assert cache.ring
    tags = TagRing(cache)
    prompt_left = [23, 9, 40]
    cached = [0, 0, 0]
    canvas_left = [0, 0, 0]  # committed canvas tokens still to encode
    graph_decoder = _RowBounds(3, C, CPU, cache.trash_slot)
    while min(cached) <= 8 * cache.sliding_slots:  # until every ring wrapped many times
        # Encoder batch: a prompt chunk or a piece of the committed canvas for every row that has one.
        works = []
        for row in range(3):
            if prompt_left[row]:
                works.append((row, min(prompt_left[row], max_write - row % 2)))  # ragged chunk sizes
            elif canvas_left[row]:
                works.append((row, min(canvas_left[row], piece)))
        if works:
            rows, lens = [w[0] for w in works], [w[1] for w in works]
            batch = AttentionBatch.for_encoder(rows, [cached[r] for r in rows], lens, W, cache)
            valid = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
            tags.forward(batch, valid, batch.positions - W + 1, batch.positions + 1)
            for row, n in works:
                cached[row] += n
                if prompt_left[row]:
                    prompt_left[row] -= n
                else:
                    canvas_left[row] -= n
        # Two denoising steps for every row ready to denoise, eager then as the graphed step runs them.
        ready = [r for r in range(3) if not prompt_left[r] and not canvas_left[r]]
        if not ready:
            continue
        prefix = [cached[r] for r in ready]
        eager = AttentionBatch.for_decoder(ready, prefix, C, W, cache)
        start = torch.tensor(prefix)[:, None].expand(-1, C)
        tags.forward(eager, torch.ones(len(ready), C, dtype=torch.bool), start - W + 1, start + C, prefix)
        for row in range(3):
            if row in ready:
                graph_decoder.set_row(row, cached[row], W, causal=False)
            else:
                graph_decoder.deactivate(row)
        graphed = graph_decoder.batch(3, cache)
        start = torch.tensor(cached)[:, None].expand(-1, C)
        valid = torch.tensor([r in ready for r in range(3)])[:, None].expand(-1, C)
        tags.forward(graphed, valid, start - W + 1, start + C, cached)
        for row in ready:
            canvas_left[row] = C  # commit


def test_every_layer_attends_as_in_the_full_layout(config, model):
    """A long ragged batch encoded in chunks, then denoised: each layer's attention output equals the full
    layout's at every real token (padding queries see other garbage). With the window read in position order
    the results are bit-identical, not just close."""
    outputs: dict[str, list[torch.Tensor]] = {"ring": [], "full": []}
    current = []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _i, out: current.append(out)) for layer in model.layers]
    real = []  # per forward: [B, T] bool, the tokens that are not padding
    try:
        lengths = [61, 37]
        ids = [random_ids(n, seed) for seed, n in enumerate(lengths)]
        for name, cache in (("ring", KVCache(config, 2, 80, torch.float32, CPU, max_write_tokens=6)),
                            ("full", KVCache(config, 2, 80, torch.float32, CPU))):
            current, real = outputs[name], []
            for start in range(0, max(lengths), 6):
                rows = [r for r in range(2) if lengths[r] > start]
                lens = [min(6, lengths[r] - start) for r in rows]
                chunk = torch.zeros(len(rows), max(lens), dtype=torch.long)
                for i, r in enumerate(rows):
                    chunk[i, : lens[i]] = torch.tensor(ids[r][start : start + lens[i]])
                model.encode(chunk, AttentionBatch.for_encoder(rows, [start] * len(rows), lens, W, cache), cache)
                real.append(torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None])
            canvas = torch.randint(0, config.vocab_size, (2, C), generator=torch.Generator().manual_seed(9))
            model.decode(canvas, AttentionBatch.for_decoder([0, 1], lengths, C, W, cache), cache)
            real.append(torch.ones(2, C, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs["ring"]) == len(outputs["full"]) == len(real) * config.num_layers == 12 * config.num_layers
    for i, (ring, full) in enumerate(zip(outputs["ring"], outputs["full"])):
        forward, tokens = i // config.num_layers, real[i // config.num_layers]
        if forward < len(real) - 1:  # chunks: the rows' windows fit in the ring together, read in position order
            assert torch.equal(ring[tokens], full[tokens]), f"forward {forward}, layer {i % config.num_layers}"
        else:  # canvases after prefixes 61 and 37 span more than a ring: read whole, the keys in slot order
            assert (ring - full).abs().max() < TOL, f"layer {i % config.num_layers}"


# ---------------------------------------------------------------------------------------------------------------
# Generation


PARAMS = dict(max_new_tokens=24, max_denoising_steps=6, confidence_threshold=3.0, stability_threshold=0,
              eos_token_ids=(1, 5))


def generate(model, prompts, config: SchedulerConfig):
    engine = Engine(model, config)
    requests = [Request(str(i), p, SamplingParams(seed=70 + i, ignore_eos=i % 2 == 0, **PARAMS))
                for i, p in enumerate(prompts)]
    for r in requests:
        engine.add_request(r)
    while engine.has_work:
        engine.step()
    return engine.cache, [(r.output_ids, r.stats.forwards_per_canvas) for r in requests]


@pytest.mark.parametrize("max_num_seqs,max_prefill_tokens,max_chunk_tokens", [(3, 6, 64), (2, 3, 64), (1, 16, 64),
                                                                             (3, 20, 5)])
def test_generation_with_the_ring_gives_the_full_layout_tokens(model, monkeypatch, max_num_seqs, max_prefill_tokens,
                                                               max_chunk_tokens):
    """Batched ragged rows admitted mid-flight, chunked prefill (budgets below a canvas split commits too; a chunk
    cap below the budget spreads a prompt over steps) and several canvases per request, over prompts several
    windows long."""
    prompts = [random_ids(n, 10 + n) for n in (45, 19, 70, 33)]
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                            max_chunk_tokens=max_chunk_tokens, max_model_len=128, canvas_length=C)
    ring_cache, ring = generate(model, prompts, sched)
    write = max(C, min(max_prefill_tokens, max_chunk_tokens))
    assert ring_cache.ring and ring_cache.sliding_slots == W - 1 + write
    full_layout(monkeypatch, engine_module)
    full_cache, full = generate(model, prompts, sched)
    assert not full_cache.ring and full_cache.nbytes > ring_cache.nbytes
    assert ring == full
    assert all(len(out) == PARAMS["max_new_tokens"] for out, _ in ring[::2])  # several canvases each


def test_token_by_token_decoding_with_the_ring_gives_the_full_layout_tokens(model, monkeypatch):
    prompts = [random_ids(13, 1), random_ids(9, 2)]
    ring = generate_ar(model, prompts, 40, ignore_eos=True)  # ring of W - 1 + 13 slots, capacity 53
    full_layout(monkeypatch, autoregressive_module)
    full = generate_ar(model, prompts, 40, ignore_eos=True)
    assert [r.token_ids for r in ring] == [f.token_ids for f in full]


# ---------------------------------------------------------------------------------------------------------------
# The static-buffer steps of the CUDA graphs, run without capture


def test_static_steps_write_the_ring_the_eager_encoder_writes(config, model):
    gen = torch.Generator().manual_seed(4)
    prompts = {0: torch.randint(5, 500, (29,), generator=gen).tolist(),
               2: torch.randint(5, 500, (50,), generator=gen).tolist()}
    canvases = {row: torch.randint(5, 500, (C,), generator=gen).tolist() for row in prompts}
    expected = encode_in_pieces(config, model, [(row, prompts[row] + canvases[row]) for row in prompts], 6)

    cache = KVCache(config, 3, 96, torch.float32, CPU, max_write_tokens=6)
    prefill = GraphedPrefill(model, cache, [4, 8], capture=False)  # 6-token chunks padded to 8
    for row, ids in prompts.items():
        for start in range(0, len(ids), 6):
            prefill.run(row, ids[start : start + 6], start)
    before_row1 = [k[1].clone() for k in cache.keys]
    encoder = GraphedEncoder(model, cache, C, [1, 2, 3], capture=False)
    encoder.run([0, 2], torch.tensor([canvases[0], canvases[2]]), [len(prompts[0]), len(prompts[2])])
    for layer in range(config.num_layers):
        slots = cache.slots_of_kind[config.layer_types[layer]]
        for row in prompts:  # every slot, trash excluded
            assert (cache.keys[layer][row, :slots] - expected.keys[layer][row, :slots]).abs().max() < TOL
            assert (cache.values[layer][row, :slots] - expected.values[layer][row, :slots]).abs().max() < TOL
        # Bucket 3 ran row 1 too, on garbage: only its trash slot may change.
        assert torch.equal(cache.keys[layer][1, :slots], before_row1[layer][:slots])


def test_static_decoder_bounds_over_the_whole_ring_give_the_eager_logits(config, model):
    """The graphed denoiser's attention inputs (whole ring, slot order) against the eager full layout."""
    prompts = {0: random_ids(41, 5), 1: random_ids(26, 6)}
    ring = encode_in_pieces(config, model, list(prompts.items()), 6)
    full = KVCache(config, 3, 96, torch.float32, CPU)
    for row, ids in prompts.items():
        model.encode(torch.tensor([ids]), AttentionBatch.for_encoder([row], [0], [len(ids)], W, full),
                     full)
    canvas = torch.randint(0, config.vocab_size, (3, C), generator=torch.Generator().manual_seed(8))
    bounds = _RowBounds(3, C, CPU, ring.trash_slot)
    for row, ids in prompts.items():
        bounds.set_row(row, len(ids), W, causal=False)
    graphed = model.decode(canvas, bounds.batch(3, ring), ring)[:2]  # row 2 was never set: garbage, but finite
    eager = model.decode(canvas[:2], AttentionBatch.for_decoder([0, 1], [41, 26], C, W, full), full)
    assert (graphed - eager).abs().max() < TOL * config.final_logit_softcapping  # logits reach +-30: relative TOL


def test_one_token_static_steps_on_a_ring_give_the_greedy_tokens(config, model):
    prompt = random_ids(30, 7)
    [eager] = generate_ar(model, [prompt], 12, ignore_eos=True)
    cache = KVCache(config, 1, 48, torch.float32, CPU, max_write_tokens=len(prompt))
    assert cache.ring
    hidden = model.encode(torch.tensor([prompt]), AttentionBatch.for_encoder([0], [0], [30], W, cache),
                          cache)
    token = model.logits(hidden[:, -1]).argmax(-1)
    step = GraphedEncoder(model, cache, 1, [1], next_token=True, capture=False)
    tokens = [token.item()]
    for i in range(11):
        step.run([0], token[:, None], [30 + i])
        token = step.out_token[:1].clone()
        tokens.append(token.item())
    assert tokens == eager.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_ring_steps_replay_exactly_what_they_compute_uncaptured(config):
    """On a GPU the static steps run as CUDA graphs (bfloat16, as the engine runs them). Captured and uncaptured
    runs of the same steps on the same ring must agree exactly: the ring's masks and slot reads are computed
    inside the graph from its static buffers. (That the ring itself gives the full layout's results is checked
    on the CPU in float32 above.)"""
    device = torch.device("cuda")
    model = build_random_model(config, dtype="bfloat16", device=device, seed=3,
                               scale=InitScale(embed_std=3.0, perturb=0.1))
    gen = torch.Generator().manual_seed(4)
    prompts = {0: torch.randint(5, 500, (29,), generator=gen).tolist(),
               2: torch.randint(5, 500, (50,), generator=gen).tolist()}
    canvases = torch.randint(5, 500, (2, C), generator=gen).to(device)
    runs = {}
    for capture in (False, True):
        cache = KVCache(config, 3, 96, torch.bfloat16, device, max_write_tokens=6)
        prefill = GraphedPrefill(model, cache, [4, 8], capture=capture)
        for row, ids in prompts.items():
            for start in range(0, len(ids), 6):
                prefill.run(row, ids[start : start + 6], start)
        encoder = GraphedEncoder(model, cache, C, [1, 2, 3], capture=capture)
        encoder.run([0, 2], canvases, [len(prompts[0]), len(prompts[2])])
        denoise_bounds = _RowBounds(3, C, device, cache.trash_slot)
        for row, ids in prompts.items():
            denoise_bounds.set_row(row, len(ids) + C, W, causal=False)
        canvas = torch.randint(0, config.vocab_size, (3, C), generator=torch.Generator().manual_seed(8)).to(device)
        logits = torch.empty(3, C, config.vocab_size, device=device)
        with torch.no_grad():
            if capture:
                for _ in range(2):  # warm-up outside the graph, as capture requires
                    logits.copy_(model.decode(canvas, denoise_bounds.batch(3, cache), cache))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits.copy_(model.decode(canvas, denoise_bounds.batch(3, cache), cache))
                logits.zero_()
                graph.replay()
            else:
                logits.copy_(model.decode(canvas, denoise_bounds.batch(3, cache), cache))
        step = GraphedEncoder(model, cache, 1, [1], next_token=True, capture=capture)
        token, tokens = canvases[:1, :1], []
        for i in range(6):
            step.run([0], token, [len(prompts[0]) + C + i])
            token = step.out_token[:1, None].clone()
            tokens.append(token.item())
        runs[capture] = ([k.clone() for k in cache.keys], logits[[0, 2]].clone(), tokens)
    (keys_eager, logits_eager, tokens_eager), (keys_graph, logits_graph, tokens_graph) = runs[False], runs[True]
    # Every slot but the trash slot (capture's warm-up runs write garbage there, as padding does).
    assert all(torch.equal(a[[0, 2], :-1], b[[0, 2], :-1]) for a, b in zip(keys_eager, keys_graph))
    assert torch.equal(logits_eager, logits_graph)
    assert tokens_eager == tokens_graph


def test_a_decoder_batch_names_the_key_range_its_masks_open(config):
    """Decoder canvases see one contiguous key range per row on sliding layers, which lets the GPU skip the mask
    (`canvas_attention`): the range a batch names must be exactly the keys its sliding mask opens."""
    cache = KVCache(config, 4, 64, torch.float32, CPU)
    rows, prefixes = [2, 0, 3], [3, 20, 41]  # a window start before 0, and two past it
    batches = [AttentionBatch.for_decoder(rows, prefixes, C, W, cache)]
    bounds = _RowBounds(4, C, CPU, cache.trash_slot)
    for row, prefix in enumerate(prefixes):
        bounds.set_row(row, prefix, W, causal=False)
    batches.append(bounds.batch(3, cache, canvas=True))  # the graphed denoiser's batch
    for batch in batches:
        start, end = batch.canvas_keys
        first, _ = batch.kv_range[SLIDING]
        mask = batch.mask(SLIDING)[:, 0]  # [B, C, K]: slot first + k
        for b, prefix in enumerate(prefixes):
            assert (start[b].item(), end[b].item()) == (max(0, prefix - (W - 1)), prefix + C)
            opened = (mask[b].nonzero()[:, 1] + first).unique().tolist()
            assert opened == list(range(start[b].item(), end[b].item()))
            assert mask[b].all(dim=0).sum() == len(opened)  # every query of the canvas opens the same keys
    assert AttentionBatch.for_encoder([0], [0], [5], W, cache).canvas_keys is None  # causal: per-query ranges


def test_long_query_chunks_attend_in_pieces_with_the_same_result(monkeypatch):
    # A 32k-token prompt's full-layer scores would not fit an 80 GB card in one piece: queries go in chunks.
    import dgemma.model.attention as attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 4, 16, generator=gen)  # [B, T, Hq, D]
    keys, values = torch.randn(2, 50, 2, 16, generator=gen), torch.randn(2, 50, 2, 16, generator=gen)
    mask = torch.rand(2, 1, 37, 50, generator=gen) < 0.7  # [B, 1, T, S]
    mask[..., 0] = True  # every query sees at least one key
    whole = attention.grouped_attention(q, keys, values, mask)
    monkeypatch.setattr(attention, "_SCORES_BUDGET_BYTES", 2 * 4 * 50 * 4 * 5)  # 5 query rows at a time
    chunked = attention.grouped_attention(q, keys, values, mask)
    assert torch.equal(chunked, whole)
