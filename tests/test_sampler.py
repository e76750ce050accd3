"""The Entropy Bound sampler's rules, on crafted inputs."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from dgemma.errors import RequestError
from dgemma.sampling.entropy_bound import (
    EntropyBoundSampler,
    entropy_bound_accept,
    stable_and_confident,
    token_entropy,
)
from dgemma.sampling.params import SamplingParams


def brute_force_accept(entropy: list[float], bound: float) -> set[int]:
    """The definition: sort ascending, accept the first k with sum(H_1..H_k) - H_k <= bound."""
    order = sorted(range(len(entropy)), key=lambda i: entropy[i])
    accepted = set()
    total = 0.0
    for i in order:
        total += entropy[i]
        if total - entropy[i] <= bound:
            accepted.add(i)
    return accepted


def test_token_entropy_equals_categorical_entropy():
    z = torch.randn(3, 5, 11) * 4
    expected = torch.distributions.Categorical(logits=z).entropy()
    assert torch.equal(token_entropy(z), expected)


@pytest.mark.parametrize("bound", [1e-3, 0.1, 0.5, 2.0])
def test_acceptance_set_equals_the_bound_formula(bound):
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(8, 16, generator=gen) * torch.rand(8, 1, generator=gen)
    mask = entropy_bound_accept(entropy, torch.full((8,), bound))
    for row in range(8):
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == brute_force_accept(entropy[row].tolist(), bound)


def test_lowest_entropy_position_is_always_accepted():
    entropy = torch.tensor([[5.0, 3.0, 9.0, 4.0]])
    mask = entropy_bound_accept(entropy, torch.tensor([1e-9]))
    assert mask.tolist() == [[False, True, False, False]]


def test_each_row_uses_its_own_bound():
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2)
    mask = entropy_bound_accept(entropy, torch.tensor([0.15, 10.0]))
    assert mask.sum(-1).tolist() == [2, 4]


def test_renoising_touches_exactly_the_rejected_positions():
    b, c, v = 2, 32, 50
    logits = torch.randn(b, c, v) * 6
    canvas_before = torch.randint(0, v, (b, c))
    sampler = EntropyBoundSampler()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    result = sampler.step(logits.clone(), torch.tensor([0.5, 0.5]), [False, False], torch.tensor([0.3, 0.3]), gens)
    # Replay the same draws: per row multinomial then randint, from the row's own generator.
    replay = [torch.Generator().manual_seed(s) for s in (1, 2)]
    probs = torch.softmax(logits / 0.5, dim=-1)
    for row in range(b):
        sampled = torch.multinomial(probs[row], 1, generator=replay[row]).squeeze(-1)
        noise = torch.randint(0, v, (1, c), generator=replay[row])[0]
        accepted = result.accepted[row]
        assert torch.equal(result.canvas[row][accepted], sampled[accepted])
        assert torch.equal(result.canvas[row][~accepted], noise[~accepted])
        assert 0 < accepted.sum() < c  # the crafted logits make both sets non-empty
    del canvas_before


def test_greedy_rows_accept_the_argmax():
    logits = torch.randn(1, 16, 20) * 3
    result = EntropyBoundSampler().step(logits.clone(), torch.tensor([0.6]), [True], torch.tensor([1.0]),
                                        [torch.Generator().manual_seed(0)])
    assert torch.equal(result.canvas[0][result.accepted[0]], logits.argmax(-1)[0][result.accepted[0]])


def test_temperature_schedule_runs_from_t_max_to_t_min():
    params = SamplingParams(max_denoising_steps=4, t_min=0.4, t_max=0.8)
    # n counts the steps remaining: N at the first step, 1 at the last.
    assert [params.temperature_at(n) for n in (4, 3, 2, 1)] == pytest.approx([0.8, 0.7, 0.6, 0.5])


def test_self_conditioning_sees_logits_over_the_step_temperature():
    logits = torch.randn(2, 4, 7)
    seen = []
    EntropyBoundSampler().step(logits.clone(), torch.tensor([0.5, 0.8]), [False, False], torch.tensor([0.1, 0.1]),
                               [torch.Generator().manual_seed(0)] * 2, soft_embedding=lambda z: seen.append(z.clone()) or z)
    assert torch.allclose(seen[0], logits[0] / 0.5)
    assert torch.allclose(seen[1], logits[1] / 0.8)


def test_stopping_needs_both_a_stable_argmax_and_low_mean_entropy():
    a = torch.tensor([1, 2, 3])
    b = torch.tensor([1, 2, 4])
    low, high = torch.tensor(0.001), torch.tensor(0.5)
    assert stable_and_confident([a], a, low, stability=1, confidence=0.005)
    assert not stable_and_confident([b], a, low, stability=1, confidence=0.005)  # changed
    assert not stable_and_confident([a], a, high, stability=1, confidence=0.005)  # not confident
    assert not stable_and_confident([], a, low, stability=1, confidence=0.005)  # no history yet
    assert not stable_and_confident([b, a], a, low, stability=2, confidence=0.005)  # must match every one
    assert stable_and_confident([a, a], a, low, stability=2, confidence=0.005)
    assert stable_and_confident([], a, low, stability=0, confidence=0.005)  # threshold 0: confidence alone


@pytest.mark.parametrize("field,value,fragment", [
    ("max_denoising_steps", 0, "max_denoising_steps must be an integer >= 1"),
    ("entropy_bound", 0.0, "entropy_bound must be > 0"),
    ("t_min", -1.0, "t_min must be > 0"),
    ("temperature", math.inf, "temperature must be a finite number"),
    ("max_new_tokens", True, "max_new_tokens must be an integer"),
    ("seed", -5, "seed must be an integer in [0, 2**63)"),
])
def test_invalid_knobs_are_rejected_with_the_parameter_named(field, value, fragment):
    with pytest.raises(RequestError, match=re.escape(fragment)):
        SamplingParams(**{field: value})


def test_t_max_below_t_min_is_rejected():
    with pytest.raises(RequestError, match=r"t_max \(0.3\) must be >= t_min \(0.4\)"):
        SamplingParams(t_min=0.4, t_max=0.3)


def test_defaults_come_from_generation_config_json():
    params = SamplingParams.from_generation_config({
        "max_denoising_steps": 16, "sampler_config": {"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": 0.3, "t_max": 0.9, "eos_token_id": [1, 106], "confidence_threshold": None,
    })
    assert (params.max_denoising_steps, params.entropy_bound, params.t_min, params.t_max) == (16, 0.2, 0.3, 0.9)
    assert params.eos_token_ids == (1, 106)
    assert params.confidence_threshold == SamplingParams().confidence_threshold  # null keeps the default


def test_all_accept_masks_of_a_small_canvas_match_brute_force():
    for values in itertools.product([0.0, 0.05, 0.2, 1.0], repeat=4):
        mask = entropy_bound_accept(torch.tensor([values]), torch.tensor([0.1]))
        assert set(torch.nonzero(mask[0]).flatten().tolist()) == brute_force_accept(list(values), 0.1)
