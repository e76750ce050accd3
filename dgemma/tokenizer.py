"""The checkpoint's tokenizer and chat template: text in, token ids out (and back).

`Tokenizer.from_dir` reads what a Hugging Face checkpoint ships: `tokenizer.json` (the `tokenizers`
pipeline), `tokenizer_config.json` (which tokens are bos/eos/pad, which are special) and
`chat_template.jinja`. The template is rendered the way `transformers.apply_chat_template` renders it,
so a prompt built here is the prompt the model was trained on. Chat messages use OpenAI's schema
and are checked and normalised before rendering (see `_normalise_messages`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dgemma.errors import CheckpointError, RequestError

_ROLES = ("system", "developer", "user", "assistant", "tool")  # "developer" is OpenAI's newer "system"
_IMAGE_PART_TYPES = ("image", "image_url", "input_image")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # names clients use for a message's thinking


# --------------------------------------------------------------------------------------------------
# The Jinja environment (the one transformers builds for apply_chat_template)
# --------------------------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}`, which training templates use to mark the
    assistant's tokens for a loss mask; for rendering the marks are no-ops."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like transformers' (templates are untrusted).

    The template packaged with dgemma is ours, and renders in a plain environment with the same settings: the
    sandbox's per-attribute checks were ~40% of rendering the training corpus (two renders per example)."""
    from dgemma.chat_format import default_chat_template

    environment = jinja2.Environment if source == default_chat_template() else ImmutableSandboxedEnvironment
    env = environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# --------------------------------------------------------------------------------------------------
# Messages: OpenAI chat schema -> what the template reads
# --------------------------------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """A message's content as one string: text parts are joined; any other part is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        raise RequestError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type", "text") if isinstance(part, Mapping) else None
        if kind in _IMAGE_PART_TYPES:
            raise RequestError(
                f"{where}: images are not supported yet (dgemma runs DiffusionGemma text-only); "
                f"remove the {kind!r} part at content[{index}]"
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: content[{index}] must be {{'type': 'text', 'text': str}}, got {part!r}")
        texts.append(part["text"])
    return "".join(texts)


def _normalise_tool_calls(calls: Any, message_index: int) -> list[dict]:
    where = f"messages[{message_index}]"
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise RequestError(f"{where}: tool_calls must be a list")
    result = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}: tool_calls[{index}] needs a function with a string name")
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            # OpenAI clients send arguments as a JSON string; the template writes them key by key.
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise RequestError(f"{where}: tool_calls[{index}] arguments are not valid JSON ({error})") from None
        if not isinstance(arguments, Mapping):
            raise RequestError(f"{where}: tool_calls[{index}] arguments must be a JSON object")
        # Every call gets an id: the template matches a tool message to its call by id, and when
        # both ids are missing it matches every reply to the *last* call's name.
        call_id = call.get("id") or f"call_{message_index}_{index}"
        result.append(
            {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
        )
    return result


def _normalise_messages(messages: Any) -> list[dict]:
    """Check OpenAI-style messages and turn them into what the template expects.

    Content parts become one string, tool-call arguments become objects, the thinking of an
    assistant message is under `reasoning_content`, and every tool message carries the name of the
    call it answers.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    result: list[dict] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object with a role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
        normal = dict(message)
        content = message.get("content")
        if content is None and role != "assistant":
            raise RequestError(f"{where}: a {role} message needs content")
        normal["content"] = None if content is None else _text_of(content, where)
        if role == "assistant":
            if message.get("tool_calls"):
                normal["tool_calls"] = _normalise_tool_calls(message["tool_calls"], index)
            else:
                normal.pop("tool_calls", None)
            reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
            for key in _REASONING_KEYS:
                normal.pop(key, None)
            if reasoning is not None:
                normal["reasoning_content"] = str(reasoning)
        elif role == "tool":
            normal["name"] = _tool_reply_name(message, result, where)
        result.append(normal)
    return result


def _tool_reply_name(message: Mapping, earlier: list[dict], where: str) -> str:
    """The function a tool message answers: from its tool_call_id, else its name."""
    caller = next((m for m in reversed(earlier) if m["role"] != "tool"), None)
    if caller is None or caller["role"] != "assistant" or not caller.get("tool_calls"):
        raise RequestError(f"{where}: a tool message must follow an assistant message with tool_calls")
    call_id = message.get("tool_call_id")
    for call in caller["tool_calls"]:
        if call_id is not None and call["id"] == call_id:
            return call["function"]["name"]
    if isinstance(message.get("name"), str) and message["name"]:
        return message["name"]
    if call_id is not None:
        raise RequestError(f"{where}: tool_call_id {call_id!r} matches no call of the assistant message before it")
    raise RequestError(f"{where}: a tool message needs a tool_call_id or a name")


def _normalise_tools(tools: Any) -> list[dict] | None:
    if not tools:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise RequestError("tools must be a list of {type: 'function', function: {...}} objects")
    result = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RequestError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        result.append({"type": "function", "function": dict(function)})
    return result


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as its text or as a serialised AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict, config_path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise CheckpointError(f"{config_path}: 'chat_template' must be a string or a list of named templates")


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode and chat rendering. Build it with `Tokenizer.from_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str,
        eos_token: str,
        pad_token: str | None,
        unk_token: str | None,
        chat_template: str | None,
        extra_special_ids: frozenset[int] = frozenset(),
        source: str = "<memory>",
    ):
        self._backend = backend
        self._source = source  # the file the chat template came from, for error messages
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        ids = {}
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise CheckpointError(f"{source}: the {name} token {token!r} is not in the vocabulary")
            ids[name] = token_id
        self._bos_id, self._eos_id, self._pad_id, self._unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]
        added = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._special_ids = frozenset(added | extra_special_ids | {i for i in ids.values() if i is not None})
        self.chat_template = chat_template
        self._template = None
        if chat_template is not None:
            try:
                self._template = compile_chat_template(chat_template)
            except jinja2.TemplateSyntaxError as error:
                raise CheckpointError(f"{source}: the chat template does not compile ({error})") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from a checkpoint."""
        directory = Path(path)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: tokenizer directory not found")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file}: file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust library raises a bare Exception for every kind of bad file
            raise CheckpointError(f"{tokenizer_file}: not a valid tokenizers file ({error})") from None
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file)
        tokens = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tokens[key] = _token_text(config.get(key))
            if tokens[key] is None and key in ("bos_token", "eos_token"):
                raise CheckpointError(f"{config_file}: {key!r} is missing")
        decoder = config.get("added_tokens_decoder") or {}
        try:
            extra_special = frozenset(
                int(i) for i, entry in decoder.items() if isinstance(entry, dict) and entry.get("special")
            )
        except (AttributeError, ValueError):
            raise CheckpointError(f"{config_file}: 'added_tokens_decoder' must map token ids to entries") from None
        for key, token in tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise CheckpointError(f"{config_file}: {key} {token!r} is not in {tokenizer_file.name}'s vocabulary")
        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{template_file}: cannot be read ({error})") from None
        else:
            template_file = config_file
            template = _config_template(config, config_file)
        return cls(
            backend, **tokens, chat_template=template, extra_special_ids=extra_special, source=str(template_file)
        )

    # ---------------------------------------------------------------- ids and text

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (bos/eos/pad/unk and the chat markers), which decode can skip."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of a token's exact text, or None if it is not one token."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Markers written in the text (`<|turn>`...) become their special tokens."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Keep special tokens (False) when the output will be parsed for markers."""
        ids = list(ids)
        if skip_special_tokens:
            # Filter by our own set: tokenizer_config.json may mark tokens special that tokenizer.json does not.
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- chat

    def render_chat(
        self,
        messages: Sequence[Mapping],
        tools: Sequence[Mapping] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for OpenAI-style `messages` (and `tools`), rendered by the checkpoint's template."""
        if self._template is None:
            raise CheckpointError(
                f"{self._source}: no chat template (looked for chat_template.jinja and a 'chat_template' "
                "key in tokenizer_config.json)"
            )
        variables = {
            "messages": _normalise_messages(messages),
            "tools": _normalise_tools(tools),
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        variables.update(template_kwargs)
        try:
            return self._template.render(**variables)
        except (jinja2.TemplateError, TypeError) as error:
            raise RequestError(f"the chat template rejected the conversation: {error}") from None

    def apply_chat(
        self,
        messages: Sequence[Mapping],
        tools: Sequence[Mapping] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `render_chat(...)`. The template writes `<bos>` itself, so none is added here."""
        text = self.render_chat(messages, tools, add_generation_prompt, enable_thinking, **template_kwargs)
        return self.encode(text, add_special_tokens=False)
