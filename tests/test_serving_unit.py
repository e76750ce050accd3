"""Specification of the serving layer without a model: scripted engine outputs in, OpenAI answers out.

A random-weight model never writes a tool call or a thought, so the parsing and streaming of those is
specified here: a fake engine replays token ids (the tiny checkpoint's tokenizer encodes the model's "output")
canvas by canvas, and the answers are checked in both the streaming and the non-streaming shape.
"""

import asyncio
import json

import pytest

from dgemma.engine.scheduler import Scheduler, SchedulerConfig
from dgemma.llm import GenerationStats
from dgemma.sampling.params import SamplingParams
from dgemma.server.async_engine import EngineDeadError, RequestGroup, Update
from dgemma.server.errors import APIError
from dgemma.server.outputs import TextAssembler
from dgemma.server.serving import OpenAIServing, ServingConfig

CANVAS = 8

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}
CALL_TEXT = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
THOUGHT_TEXT = "<|channel>thought\nThe user greets me.<channel|>Hello there, friend!"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from dgemma.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_checkpoint)


class FakeEngine:
    """Stands in for AsyncEngine: each submitted request 'generates' the scripted text, CANVAS ids at a time."""

    def __init__(self, tokenizer, script: str, reason: str = "stop", die: bool = False):
        self.engine = type("E", (), {})()
        self.engine.scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=4096, canvas_length=CANVAS))
        self.ids = tokenizer.encode(script)
        self.reason = reason
        self.die = die
        self.submitted = []
        self.aborted = []

    async def submit(self, requests):
        self.submitted.extend(requests)
        group = RequestGroup(self, requests)
        for index in range(len(requests)):
            canvases = [self.ids[k:k + CANVAS] for k in range(0, len(self.ids), CANVAS)] or [[]]
            for c, chunk in enumerate(canvases):
                last = c == len(canvases) - 1
                if requests[index].want_drafts:
                    group._put(Update(index, [], False, list(chunk), c, 1, False, None, None))
                if self.die and last:
                    group._put(EngineDeadError("boom"))
                    break
                stats = GenerationStats(5, len(self.ids), len(canvases), [3] * len(canvases), 2.0, 0, 0, 0, 0) \
                    if last else None
                group._put(Update(index, list(chunk), True, None, c + 1, 0, last, self.reason if last else None,
                                  stats))
        return group

    def abort(self, request_id):
        self.aborted.append(request_id)


def serving_for(tokenizer, script, **kw) -> tuple[OpenAIServing, FakeEngine]:
    engine = FakeEngine(tokenizer, script, **kw)
    config = ServingConfig(served_model_names=["m"], max_model_len=4096, canvas_length=CANVAS, vocab_size=512,
                           default_params=SamplingParams(eos_token_ids=(1, 5)))
    return OpenAIServing(engine, tokenizer, config), engine


async def _never():
    await asyncio.Event().wait()


def chat(serving, body) -> dict:
    async def go():
        return await serving.chat(body, _never)
    return asyncio.run(go())


def events(endpoint, body) -> list[dict]:
    """The events a streamed call of `endpoint` (serving.chat or serving.completions) sends before [DONE]."""
    async def go():
        stream = await endpoint({**body, "stream": True}, _never)
        try:
            return [line async for line in stream.lines]
        finally:
            stream.close()
    lines = asyncio.run(go())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def chat_stream(serving, body) -> list[dict]:
    return events(serving.chat, body)


def completion_stream(serving, body) -> list[dict]:
    return events(serving.completions, body)


USER = [{"role": "user", "content": "Weather in Paris?"}]


# ---------------------------------------------------------------------------------------------- tool calls


def test_tool_call_becomes_openai_tool_calls_with_schema_typed_arguments(tokenizer):
    serving, _ = serving_for(tokenizer, CALL_TEXT)
    answer = chat(serving, {"messages": USER, "tools": [WEATHER]})
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}


def test_streamed_tool_call_arrives_whole_in_one_delta(tokenizer):
    serving, _ = serving_for(tokenizer, "Let me check. " + CALL_TEXT)
    chunks = chat_stream(serving, {"messages": USER, "tools": [WEATHER]})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me check. "
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_without_tools_a_call_is_not_parsed(tokenizer):
    serving, _ = serving_for(tokenizer, CALL_TEXT)
    answer = chat(serving, {"messages": USER})
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"]["tool_calls"] == []
    assert "get_weather" in answer["choices"][0]["message"]["content"]


def test_tool_choice_none_leaves_tools_out_of_the_prompt_and_unparsed(tokenizer):
    serving, engine = serving_for(tokenizer, CALL_TEXT)
    answer = chat(serving, {"messages": USER, "tools": [WEATHER], "tool_choice": "none"})
    assert answer["choices"][0]["message"]["tool_calls"] == []
    prompt = tokenizer.decode(engine.submitted[0].prompt_ids, skip_special_tokens=False)
    assert "declaration:get_weather" not in prompt


def test_named_tool_choice_writes_the_call_opening_into_the_prompt(tokenizer):
    # The model only completes the arguments; the parser sees the whole call.
    serving, engine = serving_for(tokenizer, 'city:<|"|>Oslo<|"|>}<tool_call|>')
    answer = chat(serving, {"messages": USER, "tools": [WEATHER],
                            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    prompt = tokenizer.decode(engine.submitted[0].prompt_ids, skip_special_tokens=False)
    assert prompt.endswith("<|turn>model\n<|tool_call>call:get_weather{")
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_required_tool_choice_lets_the_model_pick_the_name(tokenizer):
    serving, engine = serving_for(tokenizer, 'get_weather{city:<|"|>Rome<|"|>}<tool_call|>')
    answer = chat(serving, {"messages": USER, "tools": [WEATHER], "tool_choice": "required"})
    assert tokenizer.decode(engine.submitted[0].prompt_ids, skip_special_tokens=False).endswith("<|tool_call>call:")
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    serving, _ = serving_for(tokenizer, CALL_TEXT + CALL_TEXT.replace("Paris", "Lyon"))
    both = chat(serving, {"messages": USER, "tools": [WEATHER]})
    assert len(both["choices"][0]["message"]["tool_calls"]) == 2
    serving, _ = serving_for(tokenizer, CALL_TEXT + CALL_TEXT.replace("Paris", "Lyon"))
    one = chat(serving, {"messages": USER, "tools": [WEATHER], "parallel_tool_calls": False})
    assert len(one["choices"][0]["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("choice, message", [
    ("sometimes", "tool_choice must be"),
    ({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
])
def test_invalid_tool_choice_is_a_400(tokenizer, choice, message):
    serving, _ = serving_for(tokenizer, "x")
    with pytest.raises(APIError, match=message) as info:
        chat(serving, {"messages": USER, "tools": [WEATHER], "tool_choice": choice})
    assert info.value.status == 400 and info.value.param == "tool_choice"


# ---------------------------------------------------------------------------------------------- reasoning


def test_thinking_is_returned_apart_from_the_content(tokenizer):
    serving, engine = serving_for(tokenizer, THOUGHT_TEXT)
    answer = chat(serving, {"messages": USER, "chat_template_kwargs": {"enable_thinking": True}})
    message = answer["choices"][0]["message"]
    assert message["reasoning_content"] == "The user greets me."
    assert message["reasoning"] == "The user greets me."
    assert message["content"] == "Hello there, friend!"
    assert "<|think|>" in tokenizer.decode(engine.submitted[0].prompt_ids, skip_special_tokens=False)


def test_streamed_reasoning_and_content_deltas_add_up_to_the_answer(tokenizer):
    serving, _ = serving_for(tokenizer, THOUGHT_TEXT)
    chunks = chat_stream(serving, {"messages": USER, "reasoning_effort": "high"})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there, friend!"
    assert all("<|channel>" not in (d.get("content") or "") for d in deltas)


def test_reasoning_effort_none_switches_thinking_off(tokenizer):
    serving, engine = serving_for(tokenizer, "Hi")
    chat(serving, {"messages": USER, "reasoning_effort": "none"})
    assert "<|think|>" not in tokenizer.decode(engine.submitted[0].prompt_ids, skip_special_tokens=False)


def test_include_reasoning_false_drops_the_thoughts(tokenizer):
    serving, _ = serving_for(tokenizer, THOUGHT_TEXT)
    message = chat(serving, {"messages": USER, "include_reasoning": False})["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] == "Hello there, friend!"


# ---------------------------------------------------------------------------------------------- text, stops, drafts


def test_stop_string_cuts_the_text_and_sets_finish_reason_stop(tokenizer):
    serving, _ = serving_for(tokenizer, "one two three four five six", reason="length")
    answer = chat(serving, {"messages": USER, "stop": ["four"]})
    assert answer["choices"][0]["message"]["content"] == "one two three "
    assert answer["choices"][0]["finish_reason"] == "stop"
    serving, _ = serving_for(tokenizer, "one two three four five six", reason="length")
    answer = chat(serving, {"messages": USER, "stop": "four", "include_stop_str_in_output": True})
    assert answer["choices"][0]["message"]["content"] == "one two three four"


def test_partial_stop_string_is_held_back_until_decided():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731 - one character per id
    text = TextAssembler(decode, stops=("STOP",))
    assert text.add([ord(c) for c in "abc ST"], final=False) == "abc "
    assert text.add([ord(c) for c in "OP more"], final=False) == ""
    assert text.stopped


def test_held_back_text_is_released_when_it_is_no_stop():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    text = TextAssembler(decode, stops=("STOP",))
    assert text.add([ord(c) for c in "abc ST"], final=False) == "abc "
    assert text.add([ord(c) for c in "ART"], final=False) == "START"
    assert text.add([ord(c) for c in " S"], final=True) == " S"


def test_streaming_and_non_streaming_answers_agree(tokenizer):
    script = "A longer answer, split over several canvases of the fake engine."
    serving, _ = serving_for(tokenizer, script)
    whole = chat(serving, {"messages": USER})["choices"][0]["message"]["content"]
    serving, _ = serving_for(tokenizer, script)
    chunks = chat_stream(serving, {"messages": USER})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole == script


def test_drafts_carry_the_canvas_guess_and_are_cleared_at_commit(tokenizer):
    serving, _ = serving_for(tokenizer, "Hello there, friend!")
    chunks = chat_stream(serving, {"messages": USER, "stream_options": {"include_drafts": True}})
    entries = [c["choices"][0] for c in chunks[1:]]
    drafts = [e["draft"] for e in entries if not e["delta"]]
    commits = [e for e in entries if e["delta"]]
    assert drafts and drafts[0]["canvas"] == 0 and drafts[0]["text"]
    assert all(e["draft"]["text"] == "" for e in commits)
    assert all("draft" in e for e in entries)


def test_usage_chunk_has_diffusion_statistics(tokenizer):
    serving, _ = serving_for(tokenizer, "Hello")
    chunks = chat_stream(serving, {"messages": USER, "n": 2, "stream_options": {"include_usage": True}})
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 2 * len(tokenizer.encode("Hello"))
    assert usage["canvases"] == 2 and usage["denoising_steps"] == 6 and usage["tokens_per_forward"] == 2.0


def test_n_choices_get_consecutive_seeds(tokenizer):
    serving, engine = serving_for(tokenizer, "x")
    chat(serving, {"messages": USER, "n": 3, "seed": 7})
    assert [r.params.seed for r in engine.submitted] == [7, 8, 9]


def test_completion_echo_puts_the_prompt_first(tokenizer):
    serving, _ = serving_for(tokenizer, " world")
    chunks = completion_stream(serving, {"prompt": "hello", "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello world"


def test_engine_death_mid_stream_ends_with_an_error_event(tokenizer):
    serving, _ = serving_for(tokenizer, "Some text that spans canvases", die=True)
    chunks = chat_stream(serving, {"messages": USER})
    assert chunks[-1]["error"]["code"] == "engine_dead"
    serving, _ = serving_for(tokenizer, "Some text that spans canvases", die=True)
    with pytest.raises(APIError) as info:
        chat(serving, {"messages": USER})
    assert info.value.status == 503


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("field, value", [
    ("top_p", 0.9), ("top_k", 40), ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logprobs", True),
    ("logit_bias", {"5": 1.0}), ("response_format", {"type": "json_object"}), ("min_tokens", 3),
    ("repetition_penalty", 1.2), ("best_of", 3), ("functions", [{"name": "f"}]), ("min_p", 0.1),
])
def test_unsupported_parameters_are_refused_by_name(tokenizer, field, value):
    serving, engine = serving_for(tokenizer, "x")
    with pytest.raises(APIError) as info:
        chat(serving, {"messages": USER, field: value})
    assert info.value.status == 400 and info.value.param == field and field in info.value.message
    assert engine.submitted == []


@pytest.mark.parametrize("field, value", [("top_p", 1.0), ("top_k", -1), ("presence_penalty", 0),
                                          ("logprobs", False), ("response_format", {"type": "text"}),
                                          ("user", "u1"), ("metadata", {"a": "b"}), ("store", False)])
def test_neutral_values_of_unsupported_parameters_are_accepted(tokenizer, field, value):
    serving, _ = serving_for(tokenizer, "x")
    assert chat(serving, {"messages": USER, field: value})["choices"]


def test_unknown_fields_are_refused_by_name(tokenizer):
    serving, _ = serving_for(tokenizer, "x")
    with pytest.raises(APIError, match="unknown field 'temprature'") as info:
        chat(serving, {"messages": USER, "temprature": 0.5})
    assert info.value.param == "temprature"


@pytest.mark.parametrize("field, value, message", [
    ("max_denoising_steps", 0, "max_denoising_steps must be an integer >= 1"),
    ("max_denoising_steps", 10**6, "max_denoising_steps must be at most"),
    ("entropy_bound", -1, "entropy_bound must be > 0"),
    ("t_min", 2.0, r"t_max \(0.8\) must be >= t_min \(2.0\)"),
    ("temperature", -0.5, "temperature must be >= 0"),
    ("seed", -1, "seed must be an integer in"),
    ("stop", [""], "stop must be"),
])
def test_invalid_diffusion_knobs_are_a_400_with_the_reason(tokenizer, field, value, message):
    serving, _ = serving_for(tokenizer, "x")
    with pytest.raises(APIError, match=message) as info:
        chat(serving, {"messages": USER, field: value})
    assert info.value.status == 400


def test_chat_template_kwargs_cannot_override_request_fields(tokenizer):
    serving, _ = serving_for(tokenizer, "x")
    with pytest.raises(APIError, match="may not set messages"):
        chat(serving, {"messages": USER, "chat_template_kwargs": {"messages": []}})


# ---------------------------------------------------------------------------------------------- engine thread


class ExplodingEngine:
    """An Engine whose first step raises, as a bug or a device error would."""

    def __init__(self):
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_model_len=4096, canvas_length=CANVAS))
        self.last_step = None

    @property
    def has_work(self):
        return self.scheduler.has_work

    def add_request(self, request):
        self.scheduler.add(request)

    def abort(self, request_id):
        return None

    def step(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_engine_thread_crash_fails_pending_requests_and_refuses_new_ones():
    from dgemma.engine.request import Request
    from dgemma.server.async_engine import AsyncEngine

    async def go():
        engine = AsyncEngine(ExplodingEngine())
        engine.start()
        group = await engine.submit([Request("a", [1, 2, 3], SamplingParams(max_new_tokens=4))])
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            async for _ in group:
                pass
        assert not engine.alive
        with pytest.raises(EngineDeadError):
            await engine.submit([Request("b", [1, 2, 3], SamplingParams(max_new_tokens=4))])

    asyncio.run(asyncio.wait_for(go(), 10))


def test_health_is_503_once_the_engine_died(tokenizer):
    from fastapi.testclient import TestClient

    from dgemma.server.app import build_app
    from dgemma.server.async_engine import AsyncEngine
    from dgemma.server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    engine = AsyncEngine(ExplodingEngine(), metrics)
    config = ServingConfig(served_model_names=["m"], max_model_len=4096, canvas_length=CANVAS, vocab_size=512,
                           default_params=SamplingParams(eos_token_ids=(1, 5)))
    app = build_app(OpenAIServing(engine, tokenizer, config), engine, metrics)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert response.status_code == 503 and "illegal memory access" in response.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}).status_code == 503
        assert "dgemma_engine_alive" in http.get("/metrics").text


def test_each_app_has_its_own_metrics_registry():
    from dgemma.server.metrics import ServerMetrics

    a, b = ServerMetrics("m"), ServerMetrics("m")  # a global registry would refuse the second
    a.on_http("GET", "/health", 200)
    assert b"dgemma_http_requests_total" in a.render()
    assert b'route="/health"' not in b.render()


def test_an_sse_event_is_one_line_whatever_the_text():
    from dgemma.server.serving import sse

    text = "a\x85b\u2028c\u2029d\x1ce\nf"  # characters that str.splitlines() (httpx's iter_lines) breaks on
    line = sse({"t": text})
    assert line.endswith("\n\n") and len(line[:-2].splitlines()) == 1
    assert json.loads(line[len("data: "):]) == {"t": text}
