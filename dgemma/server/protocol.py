"""Request bodies of the OpenAI-compatible API (pydantic), and the response shapes (plain dict builders).

Extra-field policy: a field this server does not know is refused with a 400 that names it, rather than
silently ignored (vLLM ignores them, which hides typos and unsupported features). A few well-known fields that
change nothing about the generated text are accepted and ignored: `user`, `metadata`, `store`, `service_tier`,
`prompt_cache_key`, `safety_identifier`. Standard parameters that diffusion cannot honour are declared here and
refused with a precise message by `dgemma.server.serving` (see docs/server.md).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None  # a final chunk with `usage` and no choices
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk (not supported: 400 when true)
    include_drafts: bool | None = None  # dgemma: a draft of the canvas being denoised at every step


class DiffusionKnobs(_Strict):
    """Per-request overrides of the Entropy Bound sampler (defaults: the checkpoint's generation_config.json)."""

    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    adaptive_stopping: bool | None = None


class SamplingFields(DiffusionKnobs):
    """The sampling parameters shared by chat and completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    best_of: int | None = None
    use_beam_search: bool | None = None
    # accepted, ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # legacy: refused, use tools
    function_call: str | dict[str, Any] | None = None  # legacy: refused, use tool_choice
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True  # vLLM: False drops reasoning from the answer
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    add_special_tokens: bool = True  # a <bos> before a text prompt


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: either `prompt` (text) or `messages` (rendered through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------- responses


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, canvases: int, denoising_steps: int,
          generated_with_eos: int) -> dict:
    """OpenAI usage plus diffusion statistics: canvases committed, decoder forwards, tokens per forward."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "canvases": canvases,
        "denoising_steps": denoising_steps,
        "tokens_per_forward": round(generated_with_eos / denoising_steps, 3) if denoising_steps else 0.0,
    }


def chat_message(content: str | None, reasoning: str | None, tool_calls: list[dict]) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    # vLLM < 0.10 calls it reasoning_content, vLLM 0.33 reasoning: send both.
    message["reasoning_content"] = reasoning
    message["reasoning"] = reasoning
    message["tool_calls"] = tool_calls
    return message


def chat_response(response_id: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(response_id: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_response(response_id: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_chunk(response_id: str, model: str, created: int, choices: list[dict],
                     usage_: dict | None = None) -> dict:
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk
