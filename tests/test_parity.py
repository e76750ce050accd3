"""dgemma computes what the Hugging Face reference computes (transformers 5.23, float32, CPU).

Tolerance: float32 logits within 1e-4 absolute. Both sides do the same float32 operations in a different
order (grouped experts, fused attention), so differences are rounding: about 1e-6 relative, i.e. ~1e-5 on
logits of magnitude ~10.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from reference import SPECS, build_reference, decoder_logits, our_prefix, reference_prefix

from dgemma.checkpoint.loader import load_model
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request
from dgemma.engine.scheduler import SchedulerConfig
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache
from dgemma.sampling.params import SamplingParams

LOGIT_TOL = 1e-4
KV_TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore")


def _pair(spec, tmp_path_factory, eos_boost=1.0):
    reference = build_reference(spec)
    with torch.no_grad():
        reference.model.decoder.embed_tokens.weight[1] *= eos_boost  # EOS (id 1) wins more argmaxes
    path = tmp_path_factory.mktemp(spec.name)
    reference.save_pretrained(path)
    ours, _, report = load_model(path, dtype="float32", device="cpu")
    assert report.skipped_vision, "the reference saves a vision tower; the loader must skip it"
    return spec, reference, ours


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def pair(request, tmp_path_factory):
    """(spec, reference model, dgemma model) on the same random weights, saved and reloaded from disk."""
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=SPECS, ids=[s.name for s in SPECS])
def confident_pair(request, tmp_path_factory):
    """Like `pair`, with a large embedding (the LM head), so logits are peaked: the sampler accepts many
    tokens per step, canvases stop early and EOS appears. (Its logits reach ~30, where float32 rounding in
    the reference alone exceeds 1e-4, so logit tolerances are checked on `pair`.)"""
    return _pair(replace(request.param, embed_std=3.0), tmp_path_factory, eos_boost=1.6)


def random_ids(spec, length, seed):
    return torch.randint(3, spec.vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_encoder_kv_cache_matches_reference_on_every_layer(pair):
    spec, reference, ours = pair
    ids = random_ids(spec, 3 * spec.window + 5, 1)  # longer than the sliding window
    ref_cache = reference_prefix(reference, [ids])
    cache, length = our_prefix(ours, [ids])
    for layer in range(len(spec.layer_types)):
        ref_k, ref_v = ref_cache.layers[layer].keys[0], ref_cache.layers[layer].values[0]  # [Hkv, S, D]
        kept = ref_k.shape[1]  # sliding layers keep the last W-1 positions, full layers all
        assert kept == (spec.window - 1 if spec.layer_types[layer] == "sliding_attention" else length)
        ours_k = cache.keys[layer][0, length - kept : length].transpose(0, 1)
        ours_v = cache.values[layer][0, length - kept : length].transpose(0, 1)
        assert (ours_k - ref_k).abs().max() < KV_TOL, f"layer {layer} keys"
        assert (ours_v - ref_v).abs().max() < KV_TOL, f"layer {layer} values"


@pytest.mark.parametrize("self_conditioning", [False, True], ids=["first-step", "self-conditioned"])
def test_decoder_logits_match_reference_after_two_encoded_chunks(pair, self_conditioning):
    spec, reference, ours = pair
    # A prompt, then a committed canvas encoded as a second chunk: positions and windows continue correctly.
    chunks = [random_ids(spec, 2 * spec.window + 3, 2), random_ids(spec, spec.canvas, 3)]
    canvas = random_ids(spec, spec.canvas, 4)
    sc_logits = 4 * torch.randn(1, spec.canvas, spec.vocab, generator=torch.Generator().manual_seed(5))
    logits, ref = decoder_logits(ours, reference, chunks, canvas, sc_logits if self_conditioning else None)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits - ref).abs().max() < LOGIT_TOL


def test_padded_batch_equals_unpadded_single_rows(pair):
    spec, reference, ours = pair
    lengths = [3, spec.window + 2, 3 * spec.window + 1]
    prompts = [random_ids(spec, n, 10 + i) for i, n in enumerate(lengths)]
    canvases = torch.cat([random_ids(spec, spec.canvas, 20 + i) for i in range(3)])
    sc_logits = 4 * torch.randn(3, spec.canvas, spec.vocab, generator=torch.Generator().manual_seed(6))
    width = max(lengths)
    padded = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[1]] = p[0]
    cache = KVCache(ours.config, 3, 256, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ours.encode(padded, AttentionBatch.for_encoder([0, 1, 2], [0, 0, 0], lengths, spec.window, cache), cache)
        batch = AttentionBatch.for_decoder([0, 1, 2], lengths, spec.canvas, spec.window, cache)
        logits = ours.decode(canvases, batch, cache, ours.soft_embedding(sc_logits))
        for i, p in enumerate(prompts):
            ref = reference(decoder_input_ids=canvases[i : i + 1], past_key_values=reference_prefix(reference, [p]),
                            self_conditioning_logits=sc_logits[i : i + 1]).logits
            assert (logits[i : i + 1] - ref).abs().max() < LOGIT_TOL, f"row {i} (prompt of {lengths[i]} tokens)"


def test_a_subset_of_cache_rows_decodes_like_the_whole_batch(pair):
    """The engine denoises any subset of rows: gathering rows must not change the result."""
    spec, _, ours = pair
    lengths = [4, 2 * spec.window, 7]
    cache = KVCache(ours.config, 3, 256, torch.float32, torch.device("cpu"))
    padded = torch.randint(3, spec.vocab, (3, max(lengths)), generator=torch.Generator().manual_seed(8))
    canvases = torch.randint(3, spec.vocab, (3, spec.canvas), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours.encode(padded, AttentionBatch.for_encoder([0, 1, 2], [0, 0, 0], lengths, spec.window, cache), cache)
        full = ours.decode(canvases, AttentionBatch.for_decoder([0, 1, 2], lengths, spec.canvas, spec.window, cache), cache)
        sub = ours.decode(canvases[[2, 0]], AttentionBatch.for_decoder([2, 0], [lengths[2], lengths[0]], spec.canvas,
                                                                        spec.window, cache), cache)
    assert (sub - full[[2, 0]]).abs().max() < LOGIT_TOL  # batch shape changes the BLAS blocking: rounding only


CONFIDENCE = 1.0  # mean entropy below which a stable canvas stops: loose enough for random weights to reach
# (seed, prompt tokens, denoising steps, max new tokens, stability threshold); with random weights the argmax
# rarely repeats over a whole canvas, so threshold 0 (confidence alone) is what makes canvases stop early.
GENERATION_CASES = [(0, 5, 8, 24, 1), (1, 19, 12, 16, 0), (2, 30, 6, 40, 1), (3, 11, 16, 24, 0), (4, 3, 10, 20, 2)]


@pytest.fixture(scope="module")
def packed_ours(confident_pair):
    """Our model with packed projections, as `dgemma.llm.LLM` runs it."""
    packed = copy.deepcopy(confident_pair[2])
    packed.pack_projections()
    return packed


@pytest.mark.parametrize("packed", [False, True], ids=["separate-projections", "packed-projections"])
@pytest.mark.parametrize("seed,prompt_len,steps,max_new,stability", GENERATION_CASES)
def test_whole_generation_equals_reference_token_for_token(confident_pair, packed_ours, seed, prompt_len, steps,
                                                           max_new, stability, packed):
    spec, reference, ours = confident_pair
    ours = packed_ours if packed else ours
    ids = random_ids(spec, prompt_len, 100 + seed)
    knobs = dict(max_denoising_steps=steps, t_min=0.4, t_max=0.8, stability_threshold=stability,
                 confidence_threshold=CONFIDENCE)
    torch.manual_seed(seed)
    with torch.no_grad():
        ref = reference.generate(ids, max_new_tokens=max_new, eos_token_id=[1], **knobs).sequences[0, prompt_len:].tolist()
    ref_new = ref[: ref.index(1)] if 1 in ref[:max_new] else ref[:max_new]

    engine = Engine(ours, SchedulerConfig(max_num_seqs=1, max_model_len=256, canvas_length=spec.canvas))
    request = Request("r", ids[0].tolist(), SamplingParams(max_new_tokens=max_new, eos_token_ids=(1,), seed=seed, **knobs))
    engine.add_request(request)
    while engine.has_work:
        engine.step()
    assert request.output_ids == ref_new
    assert request.finish_reason == ("stop" if 1 in ref[:max_new] else "length")


def test_reference_cases_cover_eos_early_stopping_and_several_canvases(confident_pair):
    """The cases above are only meaningful if they exercise EOS, adaptive stopping and multi-canvas output."""
    spec, _, ours = confident_pair
    saw = {"eos": False, "early_stop": False, "multi_canvas": False}
    for seed, prompt_len, steps, max_new, stability in GENERATION_CASES:
        engine = Engine(ours, SchedulerConfig(max_num_seqs=1, max_model_len=256, canvas_length=spec.canvas))
        params = SamplingParams(max_new_tokens=max_new, eos_token_ids=(1,), seed=seed, max_denoising_steps=steps,
                                confidence_threshold=CONFIDENCE, stability_threshold=stability)
        request = Request("r", random_ids(spec, prompt_len, 100 + seed)[0].tolist(), params)
        engine.add_request(request)
        while engine.has_work:
            engine.step()
        saw["eos"] |= request.stop_token is not None
        saw["early_stop"] |= any(f < steps for f in request.stats.forwards_per_canvas)
        saw["multi_canvas"] |= len(request.stats.forwards_per_canvas) >= 2
    assert saw == {"eos": True, "early_stop": True, "multi_canvas": True}, saw


def test_autoregressive_mode_decodes_like_the_reference_encoder_as_a_causal_lm(pair):
    """`--mode ar`: the encoder with its cache, one token per forward, gives the logits of re-running the
    reference's encoder over the whole sequence (tied, softcapped head), at every step, past the window."""
    from dgemma.engine.autoregressive import generate_ar

    spec, reference, ours = pair
    prompt = random_ids(spec, spec.window + 1, 50)
    continuation = random_ids(spec, spec.window + 4, 51)  # teacher-forced tokens, one per forward
    sequence = torch.cat([prompt, continuation], dim=1)
    with torch.no_grad():
        hidden = reference.model.encoder(input_ids=sequence).last_hidden_state  # [1, L, H]
        expected = 30 * torch.tanh(reference.lm_head(hidden).float() / 30)
        cache = KVCache(ours.config, 1, sequence.shape[1], torch.float32, torch.device("cpu"))
        n = prompt.shape[1]
        ours.encode(prompt, AttentionBatch.for_encoder([0], [0], [n], spec.window, cache), cache)
        for i in range(continuation.shape[1]):
            h = ours.encode(continuation[:, i : i + 1],
                            AttentionBatch.for_encoder([0], [n + i], [1], spec.window, cache), cache)
            assert (ours.logits(h[:, 0]) - expected[:, n + i]).abs().max() < LOGIT_TOL, f"step {i}"
        # And the greedy loop itself follows the reference's greedy choices.
        greedy = prompt
        for _ in range(6):
            h = reference.model.encoder(input_ids=greedy).last_hidden_state[:, -1]
            greedy = torch.cat([greedy, (30 * torch.tanh(reference.lm_head(h).float() / 30)).argmax(-1, keepdim=True)], 1)
    [result] = generate_ar(ours, [prompt[0].tolist()], 6)
    assert result.token_ids == greedy[0, prompt.shape[1]:].tolist()
