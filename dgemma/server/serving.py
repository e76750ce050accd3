"""The OpenAI API over the async engine: validate a request, build engine requests, answer or stream.

Route (app.py) -> `OpenAIServing.chat` / `.completions` -> an answer dict, or an async generator of SSE lines.
Parameters are mapped to diffusion semantics here; those that cannot be honoured are refused with a 400 that
says why (docs/server.md lists them all).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dgemma import __version__
from dgemma.chat_format import CHANNEL_END, CHANNEL_START, QUOTE, TOOL_CALL_END, TOOL_CALL_START
from dgemma.engine.request import Request
from dgemma.engine.scheduler import QueueFull
from dgemma.errors import DgemmaError, RequestError
from dgemma.sampling.params import SamplingParams
from dgemma.server import protocol as P
from dgemma.server.async_engine import AsyncEngine, EngineDeadError, RequestGroup
from dgemma.server.errors import APIError, bad_request, unsupported
from dgemma.server.outputs import ChatChoice, Delta, TextAssembler, TextChoice

log = logging.getLogger("dgemma.server")

MAX_N = 128  # choices (times prompts) per call
MAX_STEPS = 1024  # bound on max_denoising_steps / stability_threshold: one request must not hold a row forever
MAX_STOPS = 16
# Special tokens the chat parsers read (all other special tokens are skipped when decoding an answer).
_REASONING_MARKERS = (CHANNEL_START, CHANNEL_END)
_TOOL_MARKERS = (TOOL_CALL_START, TOOL_CALL_END, QUOTE)
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "pad_token",
                             "unk_token")
_DIFFUSION_KNOBS = tuple(P.DiffusionKnobs.model_fields)


@dataclass
class ServingConfig:
    served_model_names: list[str]
    max_model_len: int
    canvas_length: int
    vocab_size: int
    default_params: SamplingParams  # the checkpoint's generation config with the command line's overrides
    max_tokens_default: int | None = None  # None: as many as fit in max_model_len (rounded down to canvases)
    model_root: str = ""

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass
class EventStream:
    """A streamed answer: its SSE lines, and `close()` to call however the response ends (finished, client
    gone, or never started): it cancels what is still running."""

    lines: AsyncIterator[str]
    close: Callable[[], None]


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its requests were aborted."""


# Characters that json.dumps(ensure_ascii=False) leaves raw but that str.splitlines() (and so line readers such
# as httpx's iter_lines) treats as line breaks: escaped, so an SSE event is always one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict | str) -> str:
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


def parse_body(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a JSON body; pydantic's errors become one 400 naming each offending field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None}  # a top-level null means "not set"
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems, params = [], []
        for err in exc.errors()[:8]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown field {where!r}: dgemma refuses fields it does not implement instead of "
                                "ignoring them (see docs/server.md)")
            else:
                problems.append(f"{where}: {err['msg']}")
            params.append(where)
        raise bad_request("; ".join(problems), param=params[0] if params else None) from None


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer, config: ServingConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.shutting_down = False
        self._groups: set[RequestGroup] = set()
        special = frozenset(tokenizer.special_ids)
        reasoning = {tokenizer.token_to_id(m) for m in _REASONING_MARKERS} - {None}
        tools = {tokenizer.token_to_id(m) for m in _TOOL_MARKERS} - {None}
        # Special ids to skip when decoding an answer: all but the markers of the active parsers.
        self._drop_for_chat = {False: special - reasoning, True: special - reasoning - tools}
        self._created = P.now_s()

    # ---------------------------------------------------------------------------------- small endpoints
    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(name) for name in self.config.served_model_names]}

    def model(self, name: str) -> dict:
        self.check_model(name)
        return self._model_card(name)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "dgemma",
                "root": self.config.model_root, "parent": None, "max_model_len": self.config.max_model_len}

    def version(self) -> dict:
        return {"version": __version__}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.config.served_model_names))}", param="model",
                           code="model_not_found")

    def tokenize(self, body: Any) -> dict:
        req: P.TokenizeRequest = parse_body(P.TokenizeRequest, body)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt")
        if req.messages is not None:
            kwargs, thinking = self._template_kwargs(req.chat_template_kwargs, None)
            ids = self._render(req.messages, req.tools, req.add_generation_prompt, thinking, kwargs)
        else:
            ids = self._encode_text(req.prompt, req.add_special_tokens)
        out = {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            out["token_strs"] = [self.tokenizer.id_to_token(i) for i in ids]
        return out

    def detokenize(self, body: Any) -> dict:
        req: P.DetokenizeRequest = parse_body(P.DetokenizeRequest, body)
        self.check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    # ---------------------------------------------------------------------------------- chat
    async def chat(self, body: Any, receive: Callable[[], Awaitable[dict]]) -> dict | EventStream:
        req: P.ChatCompletionRequest = parse_body(P.ChatCompletionRequest, body)
        self.check_model(req.model)
        self._refuse_unsupported(req, chat=True)
        tools, tool_choice = self._tools(req)
        kwargs, thinking = self._template_kwargs(req.chat_template_kwargs, req.reasoning_effort)
        prompt_tools = tools if tool_choice != "none" else None
        prompt_ids = self._render(req.messages, prompt_tools, req.add_generation_prompt, thinking, kwargs)
        prefix = ""
        if tool_choice == "required":
            prefix = TOOL_CALL_START + "call:"
        elif isinstance(tool_choice, dict):
            prefix = TOOL_CALL_START + "call:" + tool_choice["function"]["name"] + "{"
        if prefix:  # force a call by writing its opening on the model's behalf
            prompt_ids = prompt_ids + self.tokenizer.encode(prefix)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = self._params(req, len(prompt_ids), max_tokens, param_name, "messages")
        include_drafts = bool(req.stream_options and req.stream_options.include_drafts)
        parse_tools = bool(tools) and tool_choice != "none"

        choices: list[ChatChoice] = []
        requests: list[Request] = []
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        for i in range(req.n):
            assembler = TextAssembler(self._chat_decoder(req.skip_special_tokens, parse_tools), params.stop,
                                      req.include_stop_str_in_output)
            choices.append(ChatChoice(assembler, tools, parse_tools, req.include_reasoning,
                                      req.parallel_tool_calls is not False, prefix))
            requests.append(self._request(f"{response_id}-{i}", prompt_ids, params, i, include_drafts,
                                          assembler.stop_fn()))
        group = await self._submit(requests)
        run = _ChatRun(self, response_id, group, choices, len(prompt_ids), include_drafts)
        if req.stream:
            return self._stream(run.stream(bool(req.stream_options and req.stream_options.include_usage)), group)
        return await self._wait(run.collect(), group, receive)

    # ---------------------------------------------------------------------------------- completions
    async def completions(self, body: Any, receive: Callable[[], Awaitable[dict]]) -> dict | EventStream:
        req: P.CompletionRequest = parse_body(P.CompletionRequest, body)
        self.check_model(req.model)
        self._refuse_unsupported(req, chat=False)
        prompts = self._completion_prompts(req)
        if len(prompts) * req.n > MAX_N:
            raise bad_request(f"{len(prompts)} prompts x n={req.n} choices is more than {MAX_N} per request", "n")
        include_drafts = bool(req.stream_options and req.stream_options.include_drafts)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        choices: list[TextChoice] = []
        requests: list[Request] = []
        prompt_tokens = 0
        for p, ids in enumerate(prompts):
            prompt_tokens += len(ids)
            params = self._params(req, len(ids), req.max_tokens, "max_tokens", "prompt")
            echo = self.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) if req.echo else ""
            for i in range(req.n):
                assembler = TextAssembler(self._text_decoder(req.skip_special_tokens), params.stop,
                                          req.include_stop_str_in_output)
                choices.append(TextChoice(assembler, echo))
                index = p * req.n + i
                requests.append(self._request(f"{response_id}-{index}", ids, params, i, include_drafts,
                                              assembler.stop_fn()))
        group = await self._submit(requests)
        run = _CompletionRun(self, response_id, group, choices, prompt_tokens, include_drafts)
        if req.stream:
            return self._stream(run.stream(bool(req.stream_options and req.stream_options.include_usage)), group)
        return await self._wait(run.collect(), group, receive)

    # ---------------------------------------------------------------------------------- validation
    def _refuse_unsupported(self, req: P.SamplingFields, chat: bool) -> None:
        if req.top_p is not None and req.top_p != 1:
            raise unsupported("top_p", f"got {req.top_p}; nucleus sampling is not part of the Entropy Bound sampler "
                                       "(positions are accepted by entropy, not by a probability mass): send 1 or omit it")
        if req.top_k is not None and req.top_k not in (-1, 0):
            raise unsupported("top_k", f"got {req.top_k}; top-k sampling is not part of the Entropy Bound sampler: "
                                       "send -1 (off) or omit it")
        if req.min_p not in (None, 0):
            raise unsupported("min_p", f"got {req.min_p}; min-p sampling is not implemented: send 0 or omit it")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value not in (None, 0):
                raise unsupported(name, f"got {value}; penalties on earlier tokens do not apply to a canvas denoised "
                                        "in parallel: send 0 or omit it")
        if req.repetition_penalty not in (None, 1):
            raise unsupported("repetition_penalty", f"got {req.repetition_penalty}; not implemented for diffusion: "
                                                    "send 1 or omit it")
        if req.logit_bias:
            raise unsupported("logit_bias", "biasing logits is not implemented in the diffusion sampler")
        if req.min_tokens not in (None, 0):
            raise unsupported("min_tokens", "a canvas is committed whole, EOS included: an early end cannot be "
                                            "suppressed (use ignore_eos to generate exactly max_tokens)")
        if req.use_beam_search:
            raise unsupported("use_beam_search", "beam search does not exist for block diffusion")
        if req.best_of is not None and req.best_of != req.n:
            raise unsupported("best_of", "choices are not ranked (there are no sequence log-probabilities): "
                                         "use n instead")
        if not 1 <= req.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
        if req.stream_options is not None:
            if not req.stream:
                raise bad_request("stream_options is only allowed when stream is true", "stream_options")
            if req.stream_options.continuous_usage_stats:
                raise unsupported("stream_options.continuous_usage_stats",
                                  "not supported; use include_usage for one final usage chunk")
        logprobs = req.logprobs
        if (chat and logprobs) or (not chat and logprobs is not None) or getattr(req, "top_logprobs", None):
            raise unsupported("logprobs", "diffusion commits the argmax of a canvas denoised in parallel; there is "
                                          "no per-token sampling distribution in the autoregressive sense, so "
                                          "token log-probabilities are not reported")
        if chat:
            fmt = req.response_format
            if fmt is not None and fmt.get("type") != "text":
                raise unsupported("response_format", f"type {fmt.get('type')!r} is not supported (structured "
                                                     "output needs constrained decoding, not implemented); only "
                                                     "'text'")
            if req.functions is not None or req.function_call is not None:
                raise unsupported("functions", "the legacy functions/function_call fields are not supported: "
                                               "use tools and tool_choice")
            if req.modalities not in (None, ["text"]):
                raise unsupported("modalities", "only ['text'] is supported")
            if req.continue_final_message:
                raise unsupported("continue_final_message", "not supported")
            if req.echo:
                raise unsupported("echo", "not supported for chat completions")
        else:
            if req.suffix:
                raise unsupported("suffix", "insertion (a suffix after the completion) is not supported")

    def _tools(self, req: P.ChatCompletionRequest) -> tuple[list[dict] | None, str | dict]:
        tools = req.tools or None
        names = []
        for index, tool in enumerate(tools or []):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) or not function["name"]:
                raise bad_request(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': str, "
                                  "'description': str, 'parameters': {...}}}}", "tools")
            if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
                raise bad_request(f"tools[{index}].function.parameters must be a JSON schema object", "tools")
            names.append(function["name"])
        choice = req.tool_choice
        if choice is None:
            return tools, "auto" if tools else "none"
        if isinstance(choice, str):
            if choice not in ("auto", "none", "required"):
                raise bad_request(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', "
                                  f"'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")
            if choice == "required" and not tools:
                raise bad_request("tool_choice 'required' needs tools", "tool_choice")
            return tools, choice
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("a named tool_choice must be {'type': 'function', 'function': {'name': ...}}",
                              "tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(names) or 'none given'})", "tool_choice")
        return tools, {"type": "function", "function": {"name": name}}

    def _template_kwargs(self, kwargs: dict | None, effort: str | None) -> tuple[dict, bool]:
        kwargs = dict(kwargs or {})
        reserved = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)} (they are request fields)",
                              "chat_template_kwargs")
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is None and effort is not None:
            if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
                raise bad_request(f"reasoning_effort must be none, minimal, low, medium or high, got {effort!r}",
                                  "reasoning_effort")
            thinking = effort != "none"  # the model's thinking is on or off; every effort level switches it on
        if thinking is None:
            thinking = False
        if not isinstance(thinking, bool):
            raise bad_request(f"chat_template_kwargs.enable_thinking must be a boolean, got {thinking!r}",
                              "chat_template_kwargs")
        return kwargs, thinking

    def _render(self, messages, tools, add_generation_prompt: bool, thinking: bool, kwargs: dict) -> list[int]:
        try:
            return self.tokenizer.apply_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=thinking, **kwargs)
        except DgemmaError as exc:  # RequestError (bad messages) or CheckpointError (no template)
            raise bad_request(str(exc), "messages") from None
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            raise bad_request(f"messages could not be rendered by the chat template: {exc}", "messages") from None

    def _encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id] + ids if add_special_tokens else ids

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})", param)

    def _completion_prompts(self, req: P.CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt is empty", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(self._encode_text(item, req.add_special_tokens))
            else:
                self._check_ids(item, "prompt")
                out.append(list(item))
            if not out[-1]:
                raise bad_request("prompt is empty: at least one token is needed", "prompt")
        return out

    def _params(self, req: P.SamplingFields, prompt_len: int, max_tokens: int | None, max_name: str,
                prompt_name: str) -> SamplingParams:
        cfg = self.config
        room = (cfg.max_model_len - prompt_len) // cfg.canvas_length * cfg.canvas_length
        if max_tokens is None:
            max_tokens = max(1, min(cfg.max_tokens_default or room, room))
        elif max_tokens < 1:
            raise bad_request(f"{max_name} must be at least 1, got {max_tokens}", max_name)
        try:
            self.engine.engine.scheduler.check_fits(prompt_len, max_tokens)  # reads only the configuration
        except RequestError as exc:
            raise bad_request(str(exc), prompt_name if "exceeds max_model_len" in str(exc) else max_name) from None
        if req.stop is None:
            stops = cfg.default_params.stop
        else:
            stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
                              "stop")
        for name in ("max_denoising_steps", "stability_threshold"):
            value = getattr(req, name)
            if value is not None and value > MAX_STEPS:
                raise bad_request(f"{name} must be at most {MAX_STEPS}, got {value}", name)
        overrides: dict[str, Any] = {name: getattr(req, name) for name in _DIFFUSION_KNOBS}
        overrides.update(max_new_tokens=max_tokens, temperature=req.temperature, seed=req.seed, stop=stops)
        if req.ignore_eos:
            overrides["ignore_eos"] = True
        if req.stop_token_ids:
            self._check_ids(req.stop_token_ids, "stop_token_ids")
            eos = cfg.default_params.eos_token_ids
            overrides["eos_token_ids"] = tuple(eos) + tuple(t for t in req.stop_token_ids if t not in eos)
        try:
            params = cfg.default_params.with_overrides(**overrides)
        except RequestError as exc:
            raise bad_request(str(exc), _param_of(str(exc))) from None
        return params

    # ---------------------------------------------------------------------------------- engine requests
    def _request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, i: int, drafts: bool,
                 stop_fn) -> Request:
        if params.seed is not None and i:
            params = params.with_overrides(seed=(params.seed + i) % 2**63)  # choice i: seed + i
        return Request(request_id, list(prompt_ids), params, want_drafts=drafts, stop_fn=stop_fn)

    async def _submit(self, requests: list[Request]) -> RequestGroup:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down")
        try:
            group = await self.engine.submit(requests)
        except QueueFull as exc:
            raise APIError(503, str(exc), code="server_overloaded") from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        except RequestError as exc:
            raise bad_request(str(exc)) from None
        self._groups.add(group)
        return group

    def _chat_decoder(self, skip_special_tokens: bool, parse_tools: bool) -> Callable[[list[int]], str]:
        drop = self._drop_for_chat[parse_tools] if skip_special_tokens else frozenset()
        decode = self.tokenizer.decode
        return lambda ids: decode([t for t in ids if t not in drop], skip_special_tokens=False)

    def _text_decoder(self, skip_special_tokens: bool) -> Callable[[list[int]], str]:
        decode = self.tokenizer.decode
        return lambda ids: decode(ids, skip_special_tokens=skip_special_tokens)

    def draft_text(self, ids: list[int], eos: Sequence[int]) -> str:
        """The current best guess of a canvas, cut at its first EOS, special tokens skipped."""
        cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

    # ---------------------------------------------------------------------------------- lifetimes
    def _stream(self, lines: AsyncIterator[str], group: RequestGroup) -> EventStream:
        def close() -> None:
            group.abort()
            self._groups.discard(group)

        return EventStream(lines, close)

    async def _wait(self, answer: Awaitable[dict], group: RequestGroup, receive) -> dict:
        """Await a non-streaming answer, aborting its requests if the client disconnects first."""
        task = asyncio.ensure_future(answer)
        watch = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            group.abort()
            self._groups.discard(group)
        if not task.done() or task.cancelled():
            raise ClientDisconnected()
        return task.result()

    @property
    def in_flight(self) -> int:
        """API calls being answered."""
        return len(self._groups)

    def abort_all(self) -> int:
        """Cancel every request in flight (at shutdown, once the grace period is over)."""
        groups = list(self._groups)
        for group in groups:
            group.abort()
        return len(groups)


async def _until_disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Run:
    """One API call in flight: its group of engine requests and what each choice has produced."""

    def __init__(self, serving: OpenAIServing, response_id: str, group: RequestGroup, choices: list,
                 prompt_tokens: int, include_drafts: bool):
        self.serving = serving
        self.model = serving.config.model_name
        self.response_id = response_id
        self.created = P.now_s()
        self.group = group
        self.choices = choices
        self.prompt_tokens = prompt_tokens
        self.include_drafts = include_drafts
        self.eos = [() if r.params.ignore_eos else r.params.eos_token_ids for r in group.requests]  # draft cuts
        self.stats = [None] * len(choices)
        self.reasons: list[str | None] = [None] * len(choices)

    def usage(self) -> dict:
        done = [s for s in self.stats if s is not None]
        steps = sum(s.denoising_steps for s in done)
        generated = sum(round(s.tokens_per_forward * s.denoising_steps) for s in done)
        return P.usage(self.prompt_tokens, sum(s.completion_tokens for s in done), sum(s.canvases for s in done),
                       steps, generated)

    def draft(self, u) -> dict:
        if u.draft_ids is None:
            return {"text": "", "canvas": u.canvas, "step": 0}
        return {"text": self.serving.draft_text(u.draft_ids, self.eos[u.index]), "canvas": u.canvas, "step": u.step}

    def error_chunk(self, exc: Exception) -> str:
        err = APIError(503, str(exc), code="engine_dead")
        return sse(err.body())

    def _feed(self, u):
        """What a committed or finished update adds to its choice; records the stats and finish reason of the last."""
        choice = self.choices[u.index]
        added = choice.feed(u.new_token_ids, u.finished)
        if u.finished:
            self.stats[u.index] = u.stats
            self.reasons[u.index] = choice.finish_reason(u.finish_reason)
        return added

    async def _fed(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, what it adds) for every committed or finished update; an engine failure is a 503."""
        try:
            async for u in self.group:
                if u.committed or u.finished:
                    yield u.index, self._feed(u)
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None

    async def _stream(self, chunk, include_usage: bool, field: str, empty: Any, render) -> AsyncIterator[str]:
        """The event stream both APIs send: a chunk per update, `field` holding render(what the update adds)
        (`empty` for a draft-only update), then usage if asked and [DONE]; an engine failure ends it with an error."""
        try:
            async for u in self.group:
                entry: dict[str, Any] = {"index": u.index, field: empty, "logprobs": None, "finish_reason": None}
                if u.committed or u.finished:
                    entry[field] = render(self._feed(u))
                    if u.finished:
                        entry["finish_reason"] = self.reasons[u.index]
                    elif not entry[field] and not self.include_drafts:
                        continue
                if self.include_drafts:
                    entry["draft"] = self.draft(u)
                yield chunk([entry])
        except EngineDeadError as exc:
            yield self.error_chunk(exc)
            yield sse("[DONE]")
            return
        if include_usage:
            yield chunk([], self.usage())
        yield sse("[DONE]")


class _ChatRun(_Run):
    choices: list[ChatChoice]

    def _delta_json(self, d: Delta) -> dict:
        out: dict[str, Any] = {}
        if d.reasoning:
            out["reasoning_content"] = d.reasoning
            out["reasoning"] = d.reasoning
        if d.content:
            out["content"] = d.content
        if d.tool_calls:
            out["tool_calls"] = d.tool_calls
        return out

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        chunk = lambda choices, usage_=None: sse(P.chat_chunk(self.response_id, self.model, self.created, choices,  # noqa: E731
                                                             usage_))
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(self.choices))])
        async for line in self._stream(chunk, include_usage, "delta", {}, self._delta_json):
            yield line

    async def collect(self) -> dict:
        parts = [Delta() for _ in self.choices]
        async for i, d in self._fed():
            acc = parts[i]
            acc.reasoning += d.reasoning
            acc.content += d.content
            acc.tool_calls += d.tool_calls
        out = []
        for i, (choice, acc) in enumerate(zip(self.choices, parts)):
            calls = [{k: v for k, v in c.items() if k != "index"} for c in acc.tool_calls]
            content = acc.content
            if calls and not content.strip():
                content = None
            reasoning = acc.reasoning if choice.reasoning.saw_reasoning and choice.include_reasoning else None
            out.append({"index": i, "message": P.chat_message(content, reasoning, calls), "logprobs": None,
                        "finish_reason": self.reasons[i]})
        return P.chat_response(self.response_id, self.model, self.created, out, self.usage())


class _CompletionRun(_Run):
    choices: list[TextChoice]

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        chunk = lambda choices, usage_=None: sse(P.completion_chunk(self.response_id, self.model, self.created,  # noqa: E731
                                                                   choices, usage_))
        async for line in self._stream(chunk, include_usage, "text", "", lambda text: text):
            yield line

    async def collect(self) -> dict:
        texts = [""] * len(self.choices)
        async for i, text in self._fed():
            texts[i] += text
        out = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": self.reasons[i]}
               for i in range(len(self.choices))]
        return P.completion_response(self.response_id, self.model, self.created, out, self.usage())
