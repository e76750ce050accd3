"""A committed canvas is encoded by the next canvas's first denoising forward (one read of the weights, not two).

The fused pass must compute what the encoder then the decoder compute: the same cache contents and the same
hidden states up to float32 rounding, hence the same generated tokens. A tiny model with a window of 8 and
canvases of 4 puts prefixes several windows long, and sliding rings that wrap, within a few steps.

TOL: the fused pass runs the same float32 operations over 2C tokens at once, with more (masked) keys per softmax
and other matmul shapes, so sums are accumulated in another order. Values here are O(1) (at most ~4), and a
layer's rounding differences stay near 1e-6 (measured: at most 4e-6 after six layers), a few float32 ulps per
layer; 1e-5 leaves room, while a wrong scalar, position or mask gives errors of order 1.
"""

from __future__ import annotations

import sys
import types

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

from dgemma.engine.cuda_graphs import GraphedDenoiser, GraphedEncoder
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request
from dgemma.engine.scheduler import SchedulerConfig
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.params import SamplingParams

TOL = 1e-5


@pytest.fixture(scope="module")
def config():
    return small_window_config()


@pytest.fixture(scope="module")
def model(config):
    return small_window_model(config)


def assert_caches_close(a: KVCache, b: KVCache, rows) -> None:
    """Every slot of the rows but the trash slot: the committed canvas, the prefix, the new canvas's scratch."""
    for layer in range(len(a.keys)):
        for row in rows:
            assert (a.keys[layer][row, :-1] - b.keys[layer][row, :-1]).abs().max() < TOL, (layer, row)
            assert (a.values[layer][row, :-1] - b.values[layer][row, :-1]).abs().max() < TOL, (layer, row)


# ---------------------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("max_write", [None, 2 * C], ids=["full-layout", "ring"])
def test_one_pass_gives_the_encoder_then_the_decoder(config, model, max_write):
    """Rows out of order (a gather), prefixes longer than the window and of different lengths, a soft input."""
    prompts = {2: random_ids(21, 1), 0: random_ids(13, 2)}
    rows, prefixes = list(prompts), [len(p) for p in prompts.values()]
    gen = torch.Generator().manual_seed(3)
    committed = torch.randint(10, 500, (2, C), generator=gen)  # [B, C]
    canvas = torch.randint(0, config.vocab_size, (2, C), generator=gen)  # [B, C]
    soft = torch.randn(2, C, config.hidden_size, generator=gen)  # [B, C, H]

    separate = encode_in_pieces(config, model, prompts.items(), max_write)
    assert separate.ring == (max_write is not None)
    model.encode(committed, AttentionBatch.for_encoder(rows, prefixes, [C, C], W, separate), separate)
    expected = model.decode_hidden(canvas, AttentionBatch.for_decoder(rows, [p + C for p in prefixes], C, W, separate),
                                   separate, soft)  # [B, C, H]

    fused = encode_in_pieces(config, model, prompts.items(), max_write)
    batch = AttentionBatch.for_encode_and_decode(rows, prefixes, C, W, fused)
    hidden = model.encode_and_decode_hidden(committed, canvas, batch, fused, soft)  # [B, C, H]

    assert hidden.shape == expected.shape
    assert (hidden - expected).abs().max() < TOL
    assert_caches_close(fused, separate, rows)


def test_a_ring_sized_for_one_canvas_refuses_the_fused_pass(config):
    cache = KVCache(config, 1, 96, torch.float32, CPU, max_write_tokens=2 * C - 1)
    AttentionBatch.for_decoder([0], [20], C, W, cache)
    with pytest.raises(ValueError, match=f"a forward writes {2 * C} tokens"):
        AttentionBatch.for_encode_and_decode([0], [20], C, W, cache)


# ---------------------------------------------------------------------------------------------------------------
# The engine


def generate(model, prompts, params, sched: SchedulerConfig, fuse: bool):
    """Outputs per request and, per step, what the engine reports about it."""
    engine = Engine(model, sched, fuse_canvas_encode=fuse)
    requests = [Request(str(i), p, params[i]) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add_request(r)
    steps = []
    while engine.has_work:
        engine.step()
        steps.append(engine.last_step)
    outputs = [(r.output_ids, r.stats.forwards_per_canvas, r.cached_len) for r in requests]
    return engine, requests, outputs, steps


def counts(step):
    """What a step did, fused or not: the same for both runs."""
    return step.encode_tokens, step.encode_batch, step.decode_batch, step.committed_canvases


FIXED = {"max_new_tokens": 3 * C, "max_denoising_steps": 5, "ignore_eos": True, "adaptive_stopping": False}


@pytest.mark.parametrize("max_chunk_tokens", [2048, 2 * C], ids=["full-layout", "ring"])
@pytest.mark.parametrize("n", [1, 3], ids=["batch-1", "lock-step-3"])
def test_fused_generation_gives_the_unfused_tokens(config, model, n, max_chunk_tokens):
    """Requests with prompts of one length and fixed steps commit together: every later canvas starts fused."""
    prompts = [random_ids(19, 10 + i) for i in range(n)]
    params = [SamplingParams(seed=70 + i, **FIXED) for i in range(n)]
    sched = SchedulerConfig(max_num_seqs=n, max_chunk_tokens=max_chunk_tokens, max_model_len=128, canvas_length=C)
    fused_engine, fused_requests, fused, fused_steps = generate(model, prompts, params, sched, fuse=True)
    _, plain_requests, plain, plain_steps = generate(model, prompts, params, sched, fuse=False)
    assert fused_engine.cache.ring == (max_chunk_tokens == 2 * C) and fused_engine.fuse_canvas_encode

    assert fused == plain
    assert all(len(out) == 3 * C for out, _, _ in fused)
    assert [counts(s) for s in fused_steps] == [counts(s) for s in plain_steps]
    assert [s.fused_encodes for s in fused_steps if s.fused_encodes] == [n, n]  # canvases 2 and 3
    assert not any(s.fused_encodes for s in plain_steps)
    for f, p in zip(fused_requests, plain_requests):
        assert f.stats.encode_ms == 0.0 < p.stats.encode_ms  # the fused encodes' time is the denoising step's


def test_requests_committing_at_different_steps_are_denoised_unfused(config, model):
    """Requests taking 3, 4 and 5 steps per canvas fall out of step: a step that starts one request's canvas also
    denoises others mid-canvas, and one forward cannot do both; the committed canvas then has a forward of its own
    (until the others have finished)."""
    prompts = [random_ids(n, 20 + n) for n in (19, 11, 30)]
    params = [SamplingParams(seed=80 + i, **{**FIXED, "max_new_tokens": 4 * C, "max_denoising_steps": 3 + i})
              for i in range(3)]
    sched = SchedulerConfig(max_num_seqs=3, max_model_len=128, canvas_length=C)
    _, requests, fused, fused_steps = generate(model, prompts, params, sched, fuse=True)
    _, _, plain, _ = generate(model, prompts, params, sched, fuse=False)
    assert fused == plain
    assert [r.stats.forwards_per_canvas for r in requests] == [[3] * 4, [4] * 4, [5] * 4]
    assert sum(s.encode_batch - s.fused_encodes for s in fused_steps[1:]) > 0  # canvases (prompts: step 1)
    assert all(s.fused_encodes in (0, s.decode_batch) for s in fused_steps)  # all of a step's canvases, or none


def test_a_prompt_chunk_of_another_request_is_encoded_before_the_fused_step(config, model):
    """Request 0 denoises alone while request 1's long prompt is encoded in chunks, in the same steps."""
    prompts = [random_ids(5, 30), random_ids(60, 31)]
    params = [SamplingParams(seed=90 + i, max_new_tokens=3 * C, max_denoising_steps=2, ignore_eos=True,
                             adaptive_stopping=False) for i in range(2)]
    sched = SchedulerConfig(max_num_seqs=2, max_chunk_tokens=2 * C, max_model_len=128, canvas_length=C)
    _, _, fused, fused_steps = generate(model, prompts, params, sched, fuse=True)
    _, _, plain, _ = generate(model, prompts, params, sched, fuse=False)
    assert fused == plain
    assert any(s.fused_encodes == 1 and s.encode_batch == 2 for s in fused_steps)


def test_fusion_is_off_when_the_ring_has_no_room_for_two_canvases(config, model, monkeypatch):
    """A ring sized for encoder chunks shorter than 2C cannot take a fused forward: the engine never fuses."""
    calls = []
    real = model.encode_and_decode_hidden
    monkeypatch.setattr(model, "encode_and_decode_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    sched = SchedulerConfig(max_num_seqs=1, max_prefill_tokens=2 * C - 1, max_model_len=128, canvas_length=C)
    engine, _, outputs, steps = generate(model, [random_ids(19, 40)], [SamplingParams(seed=1, **FIXED)], sched,
                                         fuse=True)
    assert engine.cache.ring and not engine.fuse_canvas_encode
    assert not calls and not any(s.fused_encodes for s in steps)
    assert len(outputs[0][0]) == 3 * C


def test_fused_steps_are_used_by_default_and_call_the_fused_pass(config, model, monkeypatch):
    calls = []
    real = model.encode_and_decode_hidden
    monkeypatch.setattr(model, "encode_and_decode_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(model, SchedulerConfig(max_num_seqs=1, max_model_len=128, canvas_length=C))
    assert engine.fuse_canvas_encode
    engine.add_request(Request("r", random_ids(9, 41), SamplingParams(seed=2, **FIXED)))
    while engine.has_work:
        engine.step()
    assert len(calls) == 2  # the first steps of canvases 2 and 3


# ---------------------------------------------------------------------------------------------------------------
# The CUDA-graph step's static buffers, run without capture


def torch_sampler(logits, temperature, seeds, greedy, softcap, write_probs=True):
    """A stand-in for the Triton sampler (greedy, deterministic noise): this test is about the forward's inputs."""
    z = softcap * torch.tanh(logits.float() / softcap) / temperature[:, None, None]  # [B, C, V]
    probs = torch.softmax(z, dim=-1)
    entropy = -(probs * torch.log_softmax(z, dim=-1)).sum(-1)  # [B, C]
    argmax = z.argmax(-1)  # [B, C]
    if write_probs:
        logits.copy_(probs)
    return entropy, argmax, argmax, (argmax * 7 + 3) % logits.shape[-1]


def test_the_fused_graph_step_gives_the_encoder_graph_then_the_denoiser_graph(config, model, monkeypatch):
    """Rows 0 and 2 start a canvas after committing one; row 1 is mid-prompt and, run in bucket 3 on garbage, must
    keep its cache. A later fused step of row 2 alone must leave row 0 alone (its fused bounds are retired)."""
    # The Triton module is replaced whole, not patched: CPU CI installs no triton, so it could not even be imported.
    monkeypatch.setitem(sys.modules, "dgemma.kernels.fused_sampler",
                        types.SimpleNamespace(fused_sample=torch_sampler))
    prompts = {0: random_ids(19, 50), 1: random_ids(7, 51), 2: random_ids(26, 52)}
    committed = torch.tensor([random_ids(C, 53), random_ids(C, 54)])  # [2, C] for rows 0 and 2
    knobs = [(0.7, 0.1, 0.0, 5, 0, 1), (0.6, 0.1, 0.0, 6, 0, 1)]
    rows, starts = [0, 2], [len(prompts[0]) + C, len(prompts[2]) + C]  # each new canvas follows its committed one
    results = {}
    for fused in (False, True):
        cache = encode_in_pieces(config, model, prompts.items(), 2 * C)
        row1 = [k[1, :-1].clone() for k in cache.keys]
        denoiser = GraphedDenoiser(model, cache, [1, 2, 3], fuse_canvas_encode=fused, capture=False)
        if not fused:
            GraphedEncoder(model, cache, C, [1, 2, 3], capture=False).run(rows, committed, [s - C for s in starts])
        for row, start in zip(rows, starts):
            denoiser.start_canvas(row, start, torch.Generator().manual_seed(row))
        assert denoiser.step(rows, knobs, committed if fused else None) == 3
        assert all(torch.equal(k[1, :-1], before) for k, before in zip(cache.keys, row1))
        results[fused] = (cache, denoiser.argmax[rows].clone(), denoiser.canvas[rows].clone(),
                          denoiser.soft[rows].clone())
    (plain_cache, *plain), (fused_cache, *fused) = results[False], results[True]
    assert_caches_close(fused_cache, plain_cache, rows)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])  # argmax, next canvas
    assert (fused[2] - plain[2]).abs().max() < TOL * config.hidden_size**0.5  # soft: sums of embeddings * sqrt(H)

    row0 = [k[0, :-1].clone() for k in fused_cache.keys]
    denoiser.start_canvas(2, starts[1] + C, torch.Generator().manual_seed(7))
    denoiser.step([2], knobs[1:], committed[1:])
    assert all(torch.equal(k[0, :-1], before) for k, before in zip(fused_cache.keys, row0))
