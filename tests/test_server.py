"""Specification of `dgemma serve` against a real server process on a local port.

One server (tiny random checkpoint) serves the whole module; the official `openai` client talks to it, raw
HTTP covers what that client cannot send. Random weights write gibberish, so the tests check the protocol
(shapes, counts, finish reasons, errors, reproducibility), never the answers. A second, deliberately small
server is started for the overload and graceful-shutdown tests because they end it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

KEY = "test-key"
MODEL = "tiny"
FAST = {"max_denoising_steps": 4}  # few steps per canvas keeps every request fast on 2 CPU cores
LONG = {"max_denoising_steps": 32, "adaptive_stopping": False, "ignore_eos": True}  # runs for seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log_path: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DGEMMA_API_KEY", None)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgemma", "serve", str(checkpoint), "--port", str(self.port),
             "--served-model-name", MODEL, "--disable-uvicorn-access-log", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def metrics(self) -> dict:
        """Sample name (with labels but model_name) -> value."""
        out = {}
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY,
                 "--max-model-len", "1024", "--max-body-bytes", "200000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body=None, key=KEY, content=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


HELLO = [{"role": "user", "content": "Hello!"}]


# ---------------------------------------------------------------------------------------------- endpoints


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_health_version_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    assert "dgemma_num_requests_running" in httpx.get(server.url + "/metrics").text


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, extra_body=FAST)
    assert r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.usage.model_extra
    assert extra["canvases"] >= 1 and extra["denoising_steps"] >= extra["canvases"]
    assert extra["tokens_per_forward"] > 0


def test_chat_streaming_sends_committed_text_and_a_usage_chunk(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=96, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={**FAST, "ignore_eos": True}, seed=1)
    # A fixed seed: without one, a canvas of random-weight output can decode to no visible text at all.
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 3  # one chunk per committed canvas of 32 tokens
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 96 and usage.model_extra["canvases"] == 3


def test_completion_and_streamed_completion(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, extra_body=FAST)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64, stream=True,
                                            extra_body={**FAST, "ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) == 2


def test_completion_accepts_token_ids_and_several_prompts(client):
    r = client.completions.create(model=MODEL, prompt=[[2, 40, 41], [2, 50]], max_tokens=8, n=2, extra_body=FAST)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5


def test_system_prompt_is_rendered_into_the_prompt(server, client):
    messages = [{"role": "system", "content": "You are terse."}, *HELLO]
    rendered = post(server, "/tokenize", {"model": MODEL, "messages": messages, "return_token_strs": True}).json()
    alone = post(server, "/tokenize", {"model": MODEL, "messages": HELLO}).json()
    assert rendered["count"] > alone["count"]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body=FAST)
    assert r.usage.prompt_tokens == rendered["count"]


def test_thinking_switch_changes_the_prompt_and_answers_have_reasoning_fields(server, client):
    on = post(server, "/tokenize", {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": True},
                                    "return_token_strs": True}).json()
    assert "<|think|>" in on["token_strs"]
    for thinking in (True, False):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                           extra_body={**FAST, "chat_template_kwargs": {"enable_thinking": thinking}})
        message = r.choices[0].message.model_dump()
        assert "reasoning_content" in message and "reasoning" in message
        assert (r.usage.prompt_tokens == on["count"]) == thinking


def test_tool_call_round_trip_renders_the_call_and_the_result(server, client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    strs = post(server, "/tokenize", {"messages": messages, "tools": tools, "return_token_strs": True}).json()
    text = "".join(strs["token_strs"])
    for marker in ("<|tool>", "<|tool_call>", "<|tool_response>"):
        assert marker in strs["token_strs"]
    assert "Paris" in text.replace("Ġ", " ")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=16, extra_body=FAST)
    assert r.usage.prompt_tokens == strs["count"]
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_earlier_thoughts_are_dropped_from_the_prompt(server):
    def count(assistant):
        messages = [*HELLO, assistant, {"role": "user", "content": "And then?"}]
        return post(server, "/tokenize", {"messages": messages}).json()["count"]
    plain = {"role": "assistant", "content": "Hi."}
    assert count({**plain, "reasoning_content": "A long earlier thought."}) == count(plain)


def test_null_fields_mean_not_set(client, server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "max_denoising_steps": 4, "top_p": None,
            "logprobs": None, "some_future_field": None}
    assert post(server, "/v1/chat/completions", body).status_code == 200


def test_drafts_show_the_canvas_forming(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=64, stream=True,
                                            stream_options={"include_drafts": True},
                                            extra_body={"max_denoising_steps": 4, "adaptive_stopping": False,
                                                        "ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    drafts = [c.choices[0].draft for c in chunks[1:]]
    steps = [(d["canvas"], d["step"]) for d in drafts if d["step"]]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # the 4th step of a canvas commits it
    assert all(d["text"] for d in drafts if d["step"])  # ignore_eos: no draft is cut at an EOS


def test_same_seed_same_output_and_n_choices_differ(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=64, seed=1234, extra_body={**FAST, "ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    three = client.chat.completions.create(**{**kw, "n": 3})
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i
    assert len({c.message.content for c in three.choices}) == 3
    assert three.usage.completion_tokens == 3 * 64


def test_greedy_temperature_with_seed_is_reproducible(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=32, seed=5, temperature=0, extra_body=FAST)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


def test_stop_string_ends_the_answer_before_it(client):
    kw = dict(model=MODEL, prompt="abc", max_tokens=96, seed=99, extra_body={**FAST, "ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    clean = [k for k in range(40, len(full) - 4) if "\ufffd" not in full[k:k + 3] and full[k:k + 3].strip()]
    stop = full[clean[0]:clean[0] + 3]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_is_exact_with_ignore_eos(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=40, extra_body={**FAST, "ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    assert r.usage.model_extra["canvases"] == 2


def test_tokenize_detokenize_round_trip(server):
    ids = post(server, "/tokenize", {"prompt": "hello world"}).json()
    assert ids["tokens"][0] == 2 and ids["max_model_len"] == 1024
    text = post(server, "/detokenize", {"tokens": ids["tokens"]}).json()["prompt"]
    assert text == "<bos>hello world"


# ---------------------------------------------------------------------------------------------- errors


def test_malformed_json_is_a_400(server):
    assert_error(post(server, "/v1/chat/completions", content=b'{"messages": [}'), 400, "not valid JSON")
    assert_error(post(server, "/v1/chat/completions", content=b""), 400, "empty")
    assert_error(post(server, "/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object")


@pytest.mark.parametrize("body, fragment", [
    ({"messages": "hi"}, "messages"),
    ({"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "n": 0}, "n must be"),
    ({"messages": HELLO, "stream": "yes please"}, "stream"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "images are not supported"),
    ({"messages": HELLO, "top_p": 0.5}, "top_p"),
    ({"messages": HELLO, "logprobs": True}, "log-probabilities"),
    ({"messages": HELLO, "bogus_field": 1}, "unknown field 'bogus_field'"),
])
def test_invalid_requests_are_a_400_naming_the_problem(server, body, fragment):
    assert_error(post(server, "/v1/chat/completions", {"model": MODEL, **body}), 400, fragment)


def test_huge_max_tokens_is_a_400_with_the_limit(server):
    error = assert_error(post(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 10**12}), 400,
                         "max_model_len (1024)")
    assert error["param"] == "max_tokens"


def test_over_long_prompt_is_a_400_with_both_numbers(server):
    response = post(server, "/v1/completions", {"prompt": list(range(10, 410)) * 3, "max_tokens": 8})
    error = assert_error(response, 400, "1200 tokens", "max_model_len (1024)")
    assert error["param"] == "prompt"


def test_wrong_or_missing_key_is_a_401(server):
    assert_error(post(server, "/v1/chat/completions", {"messages": HELLO}, key="nope"), 401, "API key")
    assert_error(post(server, "/v1/chat/completions", {"messages": HELLO}, key=None), 401, "API key")
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_unknown_model_and_route_are_a_404(server):
    error = assert_error(post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": HELLO}), 404, "gpt-9")
    assert error["param"] == "model"
    assert_error(post(server, "/v1/nothing-here", {}), 404, "no route")


def test_body_over_the_limit_is_a_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_error(post(server, "/v1/chat/completions", big), 413, "limit is 200000 bytes")

    def chunks():  # no Content-Length: counted while read
        for _ in range(30):
            yield b" " * 10_000
    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(),
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert_error(response, 413)


def test_wrong_method_is_a_405_in_openai_shape(server):
    response = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert_error(response, 405)


# ---------------------------------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_clients_all_succeed_in_shared_batches(server, client):
    before = server.metrics()

    def one(i):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Client {i}"}],
                                           max_tokens=64, seed=i, extra_body={**FAST, "ignore_eos": True})
        return r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [64] * 16
    after = server.metrics()
    steps = after["dgemma_decode_batch_size_count"] - before["dgemma_decode_batch_size_count"]
    canvases = after["dgemma_decode_batch_size_sum"] - before["dgemma_decode_batch_size_sum"]
    assert canvases / steps > 1.5  # mean canvases per batched decoder forward
    assert after['dgemma_decode_batch_size_bucket{le=1.0}'] - before['dgemma_decode_batch_size_bucket{le=1.0}'] < steps


def _wait_for(condition, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnecting_mid_stream_frees_its_slot(server, client):
    aborted = "dgemma_requests_finished_total{finish_reason=abort}"
    before = server.metrics().get(aborted, 0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=800, stream=True,
                                            extra_body=LONG)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert server.metrics()["dgemma_num_requests_running"] == 1
    stream.close()
    assert _wait_for(lambda: server.metrics()["dgemma_num_requests_running"] == 0)
    assert server.metrics()[aborted] == before + 1
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, extra_body=FAST)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_client_disconnecting_before_a_non_streamed_answer_frees_its_slot(server):
    aborted = "dgemma_requests_finished_total{finish_reason=abort}"
    before = server.metrics().get(aborted, 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 800, **LONG},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    assert _wait_for(lambda: server.metrics().get(aborted, 0) == before + 1)
    assert server.metrics()["dgemma_num_requests_running"] == 0


def test_no_request_caused_an_internal_error(server):
    # Runs after every malformed, oversized and cancelled request above.
    statuses = {k: v for k, v in server.metrics().items() if k.startswith("dgemma_http_requests_total")}
    assert statuses and not any("status=500" in k for k in statuses)
    assert httpx.get(server.url + "/health").status_code == 200
    assert "Traceback" not in server.log_path.read_text()


# ---------------------------------------------------------------------------------------------- overload, shutdown


def _read_sse(response, events: list, first_content: threading.Event):
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
            if '"content":"' in line and '"content":""' not in line:
                first_content.set()


def test_overload_is_a_503_and_sigterm_ends_streams_cleanly_with_exit_code_0(tiny_checkpoint, tmp_path):
    srv = Server(tiny_checkpoint, tmp_path / "small.log", "--max-num-seqs", "1", "--max-queue-len", "0",
                 "--max-model-len", "2048", "--shutdown-timeout", "1")
    try:
        events: list[str] = []
        first_content = threading.Event()
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/chat/completions",
                             json={"messages": HELLO, "max_tokens": 1600, "stream": True, **LONG}) as response:
                reader = threading.Thread(target=_read_sse, args=(response, events, first_content))
                reader.start()
                assert first_content.wait(30)
                busy = httpx.post(srv.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8},
                                  timeout=30)
                error = assert_error(busy, 503, "server busy", "max_num_seqs=1")
                assert error["code"] == "server_overloaded"
                srv.proc.send_signal(signal.SIGTERM)
                reader.join(30)
                assert not reader.is_alive()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "abort"  # cancelled after the 1 s grace period
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
