"""The static-buffer steps that run as CUDA graphs on a GPU, run eagerly here (capture=False): they must write the
same KV cache as the plain encoder, and rows outside a step must be left untouched (their writes go to the trash
slot). On a GPU the same code is captured and replayed (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from dgemma.checkpoint.random_init import InitScale, build_random_model
from dgemma.engine.autoregressive import generate_ar
from dgemma.engine.cuda_graphs import GraphedEncoder, GraphedPrefill
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache

TOL = 1e-5  # the same float32 operations on differently padded batches: rounding only


@pytest.fixture(scope="module")
def model():
    return build_random_model("tiny", dtype="float32", seed=5, scale=InitScale(embed_std=1.0, perturb=0.1))


def eager_cache(model, rows_and_ids, capacity):
    cfg = model.config
    cache = KVCache(cfg, 3, capacity, torch.float32, torch.device("cpu"))
    for row, ids in rows_and_ids:
        model.encode(torch.tensor([ids]), AttentionBatch.for_encoder([row], [0], [len(ids)], cfg.sliding_window, cache),
                     cache)
    return cache


def assert_rows_equal(a, b, row, upto):
    for layer in range(len(a.keys)):
        assert (a.keys[layer][row, :upto] - b.keys[layer][row, :upto]).abs().max() < TOL, f"layer {layer} keys"
        assert (a.values[layer][row, :upto] - b.values[layer][row, :upto]).abs().max() < TOL, f"layer {layer} values"


def test_padded_prompt_chunks_write_the_cache_the_encoder_writes(model):
    cfg = model.config
    ids = torch.randint(5, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = eager_cache(model, [(2, ids)], 512)
    cache = KVCache(cfg, 3, 512, torch.float32, torch.device("cpu"))
    prefill = GraphedPrefill(model, cache, [128, 512], capture=False)
    for start in range(0, 300, 128):  # chunks of 128, 128 and a padded 44
        prefill.run(2, ids[start : start + 128], start)
    assert_rows_equal(cache, expected, 2, 300)
    for other in (0, 1):  # rows outside the step: untouched (their trash slots included: the step ran one row)
        assert all(not cache.keys[layer][other].any() for layer in range(cfg.num_layers))


def test_canvas_encoder_writes_only_its_rows(model):
    cfg = model.config
    c = cfg.canvas_length
    gen = torch.Generator().manual_seed(2)
    prompts = {0: torch.randint(5, cfg.vocab_size, (40,), generator=gen).tolist(),
               2: torch.randint(5, cfg.vocab_size, (70,), generator=gen).tolist()}
    canvases = {row: torch.randint(5, cfg.vocab_size, (c,), generator=gen).tolist() for row in prompts}
    expected = eager_cache(model, [(row, prompts[row] + canvases[row]) for row in prompts], 256)
    cache = eager_cache(model, [(row, prompts[row]) for row in prompts], 256)
    before_row1 = [k[1, : cache.capacity].clone() for k in cache.keys]  # all but the trash slot
    encoder = GraphedEncoder(model, cache, c, [1, 2, 3], capture=False)
    encoder.run([0, 2], torch.tensor([canvases[0], canvases[2]]), [40, 70])
    assert_rows_equal(cache, expected, 0, 40 + c)
    assert_rows_equal(cache, expected, 2, 70 + c)
    # Bucket 3 ran row 1 too, on garbage: only its trash slot may change.
    assert all(torch.equal(k[1, : cache.capacity], b) for k, b in zip(cache.keys, before_row1))


def test_one_token_steps_give_the_greedy_tokens_of_eager_decoding(model):
    cfg = model.config
    prompt = torch.randint(5, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    [eager] = generate_ar(model, [prompt], 10)
    cache = KVCache(cfg, 1, 64, torch.float32, torch.device("cpu"))
    hidden = model.encode(torch.tensor([prompt]), AttentionBatch.for_encoder([0], [0], [50], cfg.sliding_window, cache),
                          cache)
    token = model.logits(hidden[:, -1]).argmax(-1)
    step = GraphedEncoder(model, cache, 1, [1], next_token=True, capture=False)
    tokens = [token.item()]
    for i in range(9):
        step.run([0], token[:, None], [50 + i])
        token = step.out_token[:1].clone()
        tokens.append(token.item())
    assert tokens == eager.token_ids


def test_next_token_steps_advance_on_the_device_as_steps_set_from_the_host(model):
    """`run_next` (the next position of every row, its input the last forward's greedy token, no host values) gives
    the tokens and the KV cache of `run` with the positions and tokens passed from the host, for two rows of
    different lengths over a sliding ring; and it refuses rows that were not all set by the last `run`."""
    cfg = model.config
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, cfg.vocab_size, (n,), generator=gen).tolist() for n in (50, 37)]
    results = []
    for advance in (False, True):
        cache = KVCache(cfg, 2, 200, torch.float32, torch.device("cpu"), max_write_tokens=50)  # a ring of 81 slots
        assert cache.ring
        for row, p in enumerate(prompts):
            model.encode(torch.tensor([p]), AttentionBatch.for_encoder([row], [0], [len(p)], cfg.sliding_window,
                                                                       cache), cache)
        step = GraphedEncoder(model, cache, 1, [2], next_token=True, capture=False)
        token = torch.tensor([3, 4])
        tokens = []
        for i in range(40):  # row 0 runs past the ring's last slot: positions 81-89 wrap to slots 0-8
            if advance and i > 0:
                step.run_next(2)
            else:
                step.run([0, 1], token[:, None], [50 + i, 37 + i])
            token = step.out_token[:2].clone()
            tokens.append(token.tolist())
        results.append((tokens, cache))
    assert results[0][0] == results[1][0]
    for row, n in ((0, 50 + 40), (1, 37 + 40)):  # every slot written (sliding layers: the ring's)
        assert_rows_equal(results[0][1], results[1][1], row, n)
    with pytest.raises(ValueError, match="after a run of them"):
        step.run_next(1)


def test_the_engine_builds_its_steps_without_gradient_whatever_the_caller_left_on(monkeypatch):
    # CUDA graphs keep the ops they were captured with, and the fused kernels are chosen only without gradient:
    # an engine built by a caller with grad enabled (the server, LLM) must still capture the kernel path.
    import dgemma.engine.engine as engine_module

    seen = []
    real = engine_module.make_denoiser

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "make_denoiser", spy)
    model = build_random_model("tiny", "float32", "cpu", seed=0)
    assert torch.is_grad_enabled()
    engine_module.Engine(model)
    assert seen == [False]
