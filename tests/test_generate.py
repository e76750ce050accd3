"""Block-diffusion generation through the engine and the Python API."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma.checkpoint.random_init import InitScale, build_random_model
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request
from dgemma.engine.scheduler import SchedulerConfig
from dgemma.errors import RequestError
from dgemma.llm import LLM
from dgemma.sampling.params import SamplingParams

CANVAS = 32  # the tiny preset's canvas


@pytest.fixture(scope="module")
def model():
    # A confident random model (large embedding = peaked logits) so canvases stop early and EOS appears.
    return build_random_model("tiny", dtype="float32", seed=3, scale=InitScale(embed_std=3.0, perturb=0.1))


def prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (int(length),), generator=gen).tolist()
            for length in torch.randint(3, 80, (n,), generator=gen)]


def run(model, requests, **config):
    engine = Engine(model, SchedulerConfig(canvas_length=CANVAS, max_model_len=512, **config))
    for r in requests:
        engine.add_request(r)
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    return steps


# Random weights are never as confident as a trained model: a loose threshold lets canvases stop early.
PARAMS = dict(max_new_tokens=96, max_denoising_steps=10, confidence_threshold=3.0, stability_threshold=0,
              eos_token_ids=(1, 5))


def test_a_batch_gives_each_row_what_it_gets_alone(model):
    """Rows of different lengths stop on their own; batching changes nothing (per-request randomness)."""
    ps = prompts(5)
    together = [Request(str(i), p, SamplingParams(seed=40 + i, **PARAMS)) for i, p in enumerate(ps)]
    run(model, together, max_num_seqs=5)
    for i, p in enumerate(ps):
        alone = Request("x", p, SamplingParams(seed=40 + i, **PARAMS))
        run(model, [alone], max_num_seqs=1)
        assert alone.output_ids == together[i].output_ids
        assert alone.stats.forwards_per_canvas == together[i].stats.forwards_per_canvas  # stopped rows don't count
    lengths = {len(r.output_ids) for r in together}
    assert len(lengths) > 1, "rows should finish at different lengths"


def test_requests_admitted_mid_flight_get_the_same_output(model):
    """A request admitted while others are denoising (fewer rows than requests) is unaffected by them."""
    ps = prompts(4, seed=1)
    queued = [Request(str(i), p, SamplingParams(seed=i, **PARAMS)) for i, p in enumerate(ps)]
    run(model, queued, max_num_seqs=2, max_prefill_tokens=16)  # chunked prefill, 2 rows for 4 requests
    for i, p in enumerate(ps):
        alone = Request("x", p, SamplingParams(seed=i, **PARAMS))
        run(model, [alone], max_num_seqs=1)
        assert alone.output_ids == queued[i].output_ids


def test_same_seed_same_output_other_seed_other_output(model):
    p = prompts(1, seed=2)[0]
    params = dict(PARAMS, ignore_eos=True)
    a, b, c = (Request(k, p, SamplingParams(seed=s, **params)) for k, s in (("a", 7), ("b", 7), ("c", 8)))
    run(model, [a, b, c], max_num_seqs=3)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


def test_output_stops_before_eos_and_at_max_new_tokens(model):
    found = {"stop": False, "length": False}
    for seed in range(12):
        r = Request("r", prompts(1, seed)[0], SamplingParams(seed=seed, **dict(PARAMS, max_new_tokens=45)))
        run(model, [r], max_num_seqs=1)
        found[r.finish_reason] = True
        assert len(r.output_ids) <= 45
        assert not set(r.output_ids) & {1, 5}
        if r.finish_reason == "length":
            assert len(r.output_ids) == 45  # a partial last canvas is cut, not rounded up
        else:
            assert r.stop_token in (1, 5)
    assert found == {"stop": True, "length": True}


def test_ignore_eos_generates_exactly_max_new_tokens(model):
    r = Request("r", prompts(1)[0], SamplingParams(seed=0, **dict(PARAMS, max_new_tokens=70, ignore_eos=True)))
    run(model, [r], max_num_seqs=1)
    assert len(r.output_ids) == 70 and r.finish_reason == "length"
    assert len(r.stats.forwards_per_canvas) == 3


def test_fixed_steps_when_adaptive_stopping_is_off(model):
    r = Request("r", prompts(1)[0], SamplingParams(seed=0, **dict(PARAMS, adaptive_stopping=False, ignore_eos=True)))
    run(model, [r], max_num_seqs=1)
    assert r.stats.forwards_per_canvas == [10, 10, 10]


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_canvas_of_fixed_steps_reads_the_device_once_at_its_last_step(model, monkeypatch, adaptive):
    """With adaptive stopping off no row can stop early, so the host reads nothing until a canvas's last step (its
    argmax): the steps before are only queued, and on a GPU they run back to back. The tokens are the same as when
    every step is read; with adaptive stopping on, every step is read."""
    from dgemma.engine import denoisers

    params = SamplingParams(seed=0, **dict(PARAMS, adaptive_stopping=adaptive, ignore_eos=True))
    prompt = prompts(1)[0]
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(tuple(t.shape)) or tolist(t))
    r = Request("r", prompt, params)
    steps = run(model, [r], max_num_seqs=1)
    denoised = sum(r.stats.forwards_per_canvas)
    if adaptive:
        assert len(reads) >= denoised
    else:
        assert r.stats.forwards_per_canvas == [10, 10, 10] and steps >= denoised
        assert reads == [(CANVAS,)] * 3  # one argmax per canvas, nothing else
        monkeypatch.setattr(denoisers, "must_read", lambda requests: True)
        every = Request("r", prompt, params)
        run(model, [every], max_num_seqs=1)
        assert every.output_ids == r.output_ids


def test_the_graphed_step_reads_its_results_only_when_the_host_needs_them():
    """`GraphDenoiser.step` (CUDA graphs; a stand-in graph here): rows of fixed steps before their canvas's last
    step return at once, with nothing read from the device; a canvas's last step, a row that may stop early, or a
    row that wants drafts reads the stop flags (and the argmax of the rows that need it)."""
    from dgemma.engine.denoisers import GraphDenoiser

    class Graph:  # the GraphedDenoiser's interface: step() queues a replay; stop and argmax are device results
        def __init__(self):
            self.stop, self.argmax = Spied(torch.zeros(4, dtype=torch.bool)), Spied(torch.zeros(4, CANVAS).long())

        def step(self, rows, knobs, committed=None):
            return max(rows) + 1

    class Spied:  # a device tensor whose reads are counted
        def __init__(self, t):
            self.t, self.reads = t, 0

        def __getitem__(self, index):
            self.reads += 1
            return self.t[index]

        def index_select(self, dim, index):
            self.reads += 1
            return self.t.index_select(dim, index)

    denoiser = object.__new__(GraphDenoiser)
    denoiser.model, denoiser.graph = build_random_model("tiny", dtype="float32"), Graph()

    def request(row, remaining, adaptive_stopping=False, want_drafts=False):
        r = Request(str(row), [3, 4], SamplingParams(seed=row, adaptive_stopping=adaptive_stopping), want_drafts)
        r.row, r.remaining_steps, r.seed = row, remaining, row  # as the engine sets them on admission
        return r

    stop, argmax = denoiser.step([request(0, 5), request(1, 3)])
    assert stop == [False, False] and argmax == [None, None]
    assert denoiser.graph.stop.reads == denoiser.graph.argmax.reads == 0
    for needs in (request(1, 1), request(1, 3, adaptive_stopping=True), request(1, 3, want_drafts=True)):
        denoiser.graph = Graph()
        stop, argmax = denoiser.step([request(0, 5), needs])
        assert denoiser.graph.stop.reads == 1 and stop == [False, False]
        assert argmax[0] is None and (argmax[1] is not None) == (needs.remaining_steps == 1 or needs.want_drafts)


def test_the_wait_for_queued_steps_counts_as_their_denoising_not_as_the_next_prefill(model, monkeypatch):
    """A prompt encoded while another request's steps are queued first waits for those steps: that wait is the queued
    request's denoising time, and the new request's prefill time is its encode alone. (A sleep stands in for the
    device finishing its work: each wait takes 100 ms.)"""
    import time

    engine = Engine(model, SchedulerConfig(canvas_length=CANVAS, max_model_len=512, max_num_seqs=2))
    monkeypatch.setattr(engine, "_sync", lambda: time.sleep(0.1))
    fixed = SamplingParams(seed=0, **dict(PARAMS, adaptive_stopping=False, ignore_eos=True))
    first, second = Request("a", prompts(1)[0], fixed), Request("b", prompts(1, seed=1)[0], fixed)
    engine.add_request(first)
    for _ in range(3):  # the prompt's encode, then two queued steps
        engine.step()
    assert engine._queued == {first}
    denoised = first.stats.denoise_ms
    engine.add_request(second)
    engine.step()  # the second prompt's encode (after the wait), then a queued step of both
    assert first.stats.denoise_ms - denoised >= 100  # the wait for its queued steps
    assert 100 <= second.stats.prefill_ms < 190  # its encode's own wait only
    assert engine._queued == {first, second}


def test_adaptive_stopping_ends_canvases_early(model):
    r = Request("r", prompts(1)[0], SamplingParams(seed=0, **dict(PARAMS, ignore_eos=True)))
    run(model, [r], max_num_seqs=1)
    assert min(r.stats.forwards_per_canvas) < 10


def test_prompt_too_long_for_max_model_len_names_both_numbers(model):
    engine = Engine(model, SchedulerConfig(canvas_length=CANVAS, max_model_len=128))
    with pytest.raises(RequestError, match=r"prompt \(80 tokens\) \+ max_new_tokens \(64.*needs 144 positions, more than max_model_len \(128\)"):
        engine.add_request(Request("r", list(range(10, 90)), SamplingParams(max_new_tokens=64)))


def test_llm_generate_reports_statistics(model):
    llm = LLM.from_model(model)
    [result] = llm.generate(prompts(1)[0], **dict(PARAMS, ignore_eos=True, seed=1))
    s = result.stats
    assert s.completion_tokens == 96 and s.canvases == 3
    assert s.tokens_per_forward == pytest.approx(96 / sum(s.forwards_per_canvas))
    assert s.prefill_ms > 0 and s.denoise_ms > 0 and s.total_ms >= s.denoise_ms
    assert result.text is None  # no tokenizer


def test_llm_seed_gives_rows_distinct_reproducible_streams(model):
    llm = LLM.from_model(model)
    p = prompts(1)[0]
    first = llm.generate([p, p], **dict(PARAMS, ignore_eos=True, seed=5))
    again = llm.generate([p, p], **dict(PARAMS, ignore_eos=True, seed=5))
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert first[0].token_ids != first[1].token_ids  # row i uses seed + i


def test_drafts_are_the_argmax_of_every_step(model):
    llm = LLM.from_model(model)
    [result] = llm.generate(prompts(1)[0], want_drafts=True, **dict(PARAMS, ignore_eos=True, seed=1, max_new_tokens=32))
    assert len(result.drafts) == result.stats.forwards_per_canvas[0]
    assert result.drafts[-1] == result.token_ids  # the committed canvas is the last draft


def test_text_generation_end_to_end(tiny_checkpoint):
    llm = LLM(tiny_checkpoint)
    [result] = llm.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=40, seed=0)
    assert isinstance(result.text, str)
    assert result.stats.prompt_tokens == len(llm.chat_prompt([{"role": "user", "content": "Hello there"}]))
    [thinking] = llm.chat([{"role": "user", "content": "Hi"}], enable_thinking=True, max_new_tokens=8, seed=0)
    assert thinking.stats.prompt_tokens > result.stats.prompt_tokens - 5


def test_cli_generate_json(tiny_checkpoint, capsys):
    from dgemma.cli import main

    code = main(["generate", "--model", str(tiny_checkpoint), "Hello", "--json", "--max-new-tokens", "40",
                 "--seed", "3", "--max-denoising-steps", "6"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion_tokens"] <= 40 and out["canvases"] >= 1 and out["seed"] == 3
    assert set(out) >= {"text", "token_ids", "finish_reason", "tokens_per_forward", "prefill_ms", "denoise_ms"}


def test_cli_streams_text_then_a_statistics_line(tiny_checkpoint, capsys):
    from dgemma.cli import main

    assert main(["generate", "--model", str(tiny_checkpoint), "Hello", "--max-new-tokens", "64", "--seed", "1",
                 "--ignore-eos", "--max-denoising-steps", "4"]) == 0
    captured = capsys.readouterr()
    assert "tokens/forward" in captured.err and "canvases" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["generate"], "nothing to do: give a PROMPT or --messages"),
    (["generate", "--messages", "/no/such.json"], "--messages file /no/such.json does not exist"),
    (["generate", "hi", "--max-denoising-steps", "0"], "max_denoising_steps must be an integer >= 1"),
    (["generate", "hi", "--raw", "--think"], "--raw sends plain text"),
])
def test_cli_errors_are_one_clear_line(tiny_checkpoint, capsys, argv, message):
    from dgemma.cli import main

    assert main(argv[:1] + ["--model", str(tiny_checkpoint)] + argv[1:]) == 2
    assert message in capsys.readouterr().err


def test_llm_reuses_its_engine_and_gets_the_same_results(model):
    llm = LLM.from_model(model)
    ps = prompts(3, seed=4)
    knobs = dict(PARAMS, seed=9)
    first = llm.generate(ps, **knobs)
    engine = llm._engine
    again = llm.generate(ps, **knobs)
    one = llm.generate(ps[:1], **knobs)
    assert llm._engine is engine  # no new KV cache, no new CUDA graphs for calls that fit
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert one[0].token_ids == first[0].token_ids
