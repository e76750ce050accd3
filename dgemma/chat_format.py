"""The Gemma 4 / DiffusionGemma chat format: writing tool blocks and reading model output.

The chat template (`dgemma/assets/chat_template.jinja`) renders conversations; this module holds the
same format in Python for the two places that need it outside the template:

- the server and the evaluator read model output: the thinking channel
  (`<|channel>thought\\n...<channel|>`) and tool calls (`<|tool_call>call:NAME{...}<tool_call|>`);
- tests and tools write the blocks the template writes (`format_tool_call`, `format_tool_declaration`,
  `format_tool_response`). These mirror the template's macros character for character, quirks included;
  `tests/test_chat_format.py` renders both and compares.

Model output must be decoded with `skip_special_tokens=False`: every marker here is a special token.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

# The format's markers. Each is one special token in the Gemma 4 vocabulary.
TURN_START = "<|turn>"
TURN_END = "<turn|>"
THINK = "<|think|>"
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_HEADER = "thought\n"  # the channel name line that follows CHANNEL_START
TOOL_START = "<|tool>"
TOOL_END = "<tool|>"
TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"
TOOL_RESPONSE_END = "<tool_response|>"
QUOTE = '<|"|>'  # Gemma 4 wraps every string value in this token instead of '"'

# Schema keys that describe a property rather than name one (the template skips them when it has to
# treat a whole object schema as a property map).
_STANDARD_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")


@functools.cache
def default_chat_template() -> str:
    """The chat template packaged with dgemma (used for test and random checkpoints); read once."""
    return resources.files("dgemma").joinpath("assets/chat_template.jinja").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Writing: Python twins of the template's macros
# --------------------------------------------------------------------------------------------------


def _dictsort(mapping: Mapping) -> list[tuple[Any, Any]]:
    # Jinja's `dictsort` filter: by key, case-insensitively, stable for keys that differ only in case.
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _jinja_str(value: Any) -> str:
    # What `{{ value }}` prints: Python's str(), so None prints as "None" and 1.0 as "1.0".
    return str(value)


def _upper(schema: Mapping, key: str) -> str:
    # `schema[key] | upper` in Jinja: a missing key is Undefined and prints as "".
    return str(schema[key]).upper() if key in schema else ""


def _is_jinja_sequence(value: Any) -> bool:
    # Jinja's `is sequence` test: anything with a length and item access (strings and mappings are
    # tested before this in every macro, so only lists and tuples reach it in practice).
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def format_argument(value: Any, escape_keys: bool = True) -> str:
    """A JSON value in Gemma 4 syntax: strings in `<|"|>`, keys bare unless `escape_keys`."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        parts = []
        for key, item in _dictsort(value):
            shown_key = QUOTE + str(key) + QUOTE if escape_keys else str(key)
            parts.append(shown_key + ":" + format_argument(item, escape_keys=escape_keys))
        return "{" + ",".join(parts) + "}"
    if _is_jinja_sequence(value):
        return "[" + ",".join(format_argument(item, escape_keys=escape_keys) for item in value) + "]"
    return _jinja_str(value)


def _quoted_list(items: Any) -> str:
    return "[" + ",".join(QUOTE + _jinja_str(item) + QUOTE for item in items) + "]"


def _format_properties(properties: Mapping, skip_standard_keys: bool = False) -> str:
    # Twin of the template's `schema_properties` macro (Gemma 4's `format_parameters`).
    entries = []
    for key, prop in _dictsort(properties):
        if skip_standard_keys and key in _STANDARD_SCHEMA_KEYS:
            continue
        fields: list[str] = []
        if prop.get("description"):
            fields.append("description:" + QUOTE + _jinja_str(prop["description"]) + QUOTE)
        kind = _upper(prop, "type")
        if kind == "STRING":
            if prop.get("enum"):
                fields.append("enum:" + format_argument(prop["enum"]))
        elif kind == "ARRAY":
            items = prop.get("items")
            if isinstance(items, Mapping) and items:
                fields.append("items:{" + _format_items(items) + "}")
        if prop.get("nullable"):
            fields.append("nullable:true")
        if kind == "OBJECT":
            nested = prop.get("properties")
            if isinstance(nested, Mapping):
                fields.append("properties:{" + _format_properties(nested) + "}")
            else:
                # No `properties`: Gemma 4 reads the schema itself as the property map.
                fields.append("properties:{" + _format_properties(prop, skip_standard_keys=True) + "}")
            if prop.get("required"):
                fields.append("required:" + _quoted_list(prop["required"]))
        fields.append("type:" + QUOTE + kind + QUOTE)
        entries.append(_jinja_str(key) + ":{" + ",".join(fields) + "}")
    return ",".join(entries)


def _format_items(items: Mapping) -> str:
    # The `items` schema of an array property, written key by key.
    fields = []
    for key, value in _dictsort(items):
        if value is None:
            continue
        if key == "properties":
            inner = _format_properties(value) if isinstance(value, Mapping) else ""
            fields.append("properties:{" + inner + "}")
        elif key == "required":
            fields.append("required:" + _quoted_list(value))
        elif key == "type":
            if isinstance(value, str):
                fields.append("type:" + format_argument(value.upper()))
            else:
                fields.append("type:" + format_argument([str(v).upper() for v in value]))
        else:
            fields.append(_jinja_str(key) + ":" + format_argument(value))
    return ",".join(fields)


def _function_of(tool_spec: Mapping) -> Mapping:
    # OpenAI wraps the function in {"type": "function", "function": {...}}; accept the bare function too.
    function = tool_spec.get("function", tool_spec)
    return function if isinstance(function, Mapping) else {}


def format_tool_declaration(tool_spec: Mapping) -> str:
    """`<|tool>declaration:NAME{...}<tool|>` for one OpenAI tool spec, exactly as the template writes it."""
    function = _function_of(tool_spec)
    text = "declaration:" + _jinja_str(function.get("name", "")) + "{description:" + QUOTE
    text += _jinja_str(function.get("description", "")) + QUOTE
    params = function.get("parameters")
    if params:
        text += ",parameters:{"
        if params.get("properties"):
            text += "properties:{" + _format_properties(params["properties"]) + "},"
        if params.get("required"):
            text += "required:" + _quoted_list(params["required"]) + ","
        if params.get("type"):
            # Gemma 4 closes the parameters block only here: a schema without "type" leaves it open.
            text += "type:" + QUOTE + _upper(params, "type") + QUOTE + "}"
    if "response" in function:
        response = function["response"]
        text += ",response:{"
        if response.get("description"):
            text += "description:" + QUOTE + _jinja_str(response["description"]) + QUOTE + ","
        if _upper(response, "type") == "OBJECT":
            text += "type:" + QUOTE + "OBJECT" + QUOTE + "}"
    text += "}"
    return TOOL_START + text.strip() + TOOL_END


def format_tool_call(name: str, arguments: Mapping) -> str:
    """`<|tool_call>call:NAME{key:value,...}<tool_call|>`, exactly as the template writes a call."""
    body = ",".join(
        _jinja_str(key) + ":" + format_argument(value, escape_keys=False) for key, value in _dictsort(arguments)
    )
    return TOOL_CALL_START + "call:" + name + "{" + body + "}" + TOOL_CALL_END


def format_tool_response(name: str, value: Any) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`: a mapping's keys become fields, anything
    else (a tool message's text) is written as `{value:...}`."""
    if isinstance(value, Mapping):
        body = ",".join(
            _jinja_str(key) + ":" + format_argument(item, escape_keys=False) for key, item in _dictsort(value)
        )
    else:
        body = "value:" + format_argument(value, escape_keys=False)
    return TOOL_RESPONSE_START + "response:" + name + "{" + body + "}" + TOOL_RESPONSE_END


# --------------------------------------------------------------------------------------------------
# Reading: the thinking channel
# --------------------------------------------------------------------------------------------------


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text to hold back)."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ReasoningStreamParser:
    """Splits streamed model output into reasoning and content at `<|channel>thought\\n...<channel|>`.

    `feed(delta)` returns `(reasoning_delta, content_delta)`. Text that could be the start of a marker
    is held back until the next delta decides it, so no fragment of a marker ever reaches either
    side; `finish()` releases what is held at the end. The result does not depend on how the text was
    cut into deltas. An unclosed channel (a generation cut by the length limit) is all reasoning.

    `start_in_reasoning=True` is for prompts that end inside an open thought channel.
    """

    _CONTENT, _HEADER, _REASONING = "content", "header", "reasoning"

    def __init__(self, start_in_reasoning: bool = False):
        self._state = self._REASONING if start_in_reasoning else self._CONTENT
        self._pending = ""  # text not yet assigned to a side
        self.saw_reasoning = start_in_reasoning

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            if self._state == self._CONTENT:
                found = self._pending.find(CHANNEL_START)
                if found < 0:
                    keep = _partial_suffix(self._pending, CHANNEL_START)
                    content.append(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                content.append(self._pending[:found])
                self._pending = self._pending[found + len(CHANNEL_START) :]
                self._state = self._HEADER
                self.saw_reasoning = True
            elif self._state == self._HEADER:
                # The channel's name line ("thought\n") is markup, not reasoning; wait until we know.
                if self._pending.startswith(THOUGHT_HEADER):
                    self._pending = self._pending[len(THOUGHT_HEADER) :]
                elif THOUGHT_HEADER.startswith(self._pending):
                    break
                self._state = self._REASONING
            else:
                found = self._pending.find(CHANNEL_END)
                if found < 0:
                    keep = _partial_suffix(self._pending, CHANNEL_END)
                    reasoning.append(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                reasoning.append(self._pending[:found])
                self._pending = self._pending[found + len(CHANNEL_END) :]
                self._state = self._CONTENT
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Release held-back text at the end of the stream; call once after the last `feed`."""
        pending, self._pending = self._pending, ""
        if self._state == self._CONTENT:
            return "", pending
        if self._state == self._HEADER:
            return "", ""  # a cut-off "thought" header carries no reasoning
        return pending, ""


def split_reasoning(text: str, start_in_reasoning: bool = False) -> tuple[str | None, str]:
    """`(reasoning, content)` of a complete output. Reasoning is None when there was no thought channel
    (and "" for an empty one); several channels are concatenated. Same rules as ReasoningStreamParser."""
    parser = ReasoningStreamParser(start_in_reasoning=start_in_reasoning)
    reasoning, content = parser.feed(text)
    tail_reasoning, tail_content = parser.finish()
    if not parser.saw_reasoning:
        return None, content + tail_content
    return reasoning + tail_reasoning, content + tail_content


# --------------------------------------------------------------------------------------------------
# Reading: tool calls
# --------------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One tool call read from model output."""

    name: str
    arguments: dict  # JSON-typed values, coerced to the tool's schema when it was given

    def arguments_json(self) -> str:
        """The arguments as OpenAI sends them: a compact JSON string."""
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


class _Incomplete(Exception):
    """The text ended inside a call: more output may complete it."""


class _Malformed(Exception):
    """The text cannot be a call, whatever follows."""


@dataclass
class _Bare:
    """An unquoted scalar as written (`17`, `true`, `None`, `Paris`); typed once the schema is known."""

    raw: str


_CALL_NAME = re.compile(r"call:([^\s{}<>,:]+)\{")
_CALL_NAME_PREFIX = re.compile(r"(?:c(?:a(?:l(?:l(?::[^\s{}<>,:]*)?)?)?)?)?")  # text that may become a name
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_JSON_DECODER = json.JSONDecoder()


class _ArgumentReader:
    """Recursive-descent reader for Gemma 4 values: `{key:value,...}`, `[...]`, `<|"|>text<|"|>`,
    bare numbers/booleans/null. Also accepts JSON's double-quoted strings and quoted keys, which
    the model sometimes writes."""

    def __init__(self, text: str, pos: int):
        self.text = text
        self.pos = pos

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str:
        self._skip_space()
        if self.pos >= len(self.text):
            raise _Incomplete()
        return self.text[self.pos]

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise _Malformed()
        self.pos += 1

    def _quoted(self) -> str:
        # At QUOTE (or a prefix of it at the very end of the text).
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise _Incomplete()
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def _json_string(self) -> str:
        try:
            value, self.pos = _JSON_DECODER.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as error:
            if "Unterminated" in error.msg:
                raise _Incomplete() from None
            raise _Malformed() from None
        return value

    def _at_quote(self) -> bool:
        rest = self.text[self.pos : self.pos + len(QUOTE)]
        if rest == QUOTE:
            return True
        if QUOTE.startswith(rest) and self.pos + len(rest) == len(self.text) and rest.startswith("<"):
            raise _Incomplete()
        return False

    def value(self) -> Any:
        char = self._peek()
        if char == "{":
            return self.object()
        if char == "[":
            return self._array()
        if self._at_quote():
            return self._quoted()
        if char == '"':
            return self._json_string()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",}]<":
            self.pos += 1
        if self.pos >= len(self.text):
            raise _Incomplete()
        raw = self.text[start : self.pos].strip()
        if not raw:
            raise _Malformed()
        return _Bare(raw)

    def _key(self) -> str:
        char = self._peek()
        if self._at_quote():
            return self._quoted()
        if char == '"':
            return self._json_string()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ':{}[],"<':
            self.pos += 1
        if self.pos >= len(self.text):
            raise _Incomplete()
        key = self.text[start : self.pos].strip()
        if not key:
            raise _Malformed()
        return key

    def object(self) -> dict:
        self._expect("{")
        result: dict = {}
        if self._peek() == "}":
            self.pos += 1
            return result
        while True:
            key = self._key()
            self._expect(":")
            result[key] = self.value()
            char = self._peek()
            self.pos += 1
            if char == "}":
                return result
            if char != ",":
                raise _Malformed()

    def _array(self) -> list:
        self._expect("[")
        result: list = []
        if self._peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            char = self._peek()
            self.pos += 1
            if char == "]":
                return result
            if char != ",":
                raise _Malformed()


def _bare_default(raw: str) -> Any:
    # A bare scalar with no schema to guide it. The template prints Python's None as "None".
    if raw == "true":
        return True
    if raw == "false":
        return False
    if raw in ("null", "None"):
        return None
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    return raw


def _schema_type(schema: Any) -> str | None:
    # The JSON-schema type to coerce to; for a union like ["string", "null"] the first non-null one.
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind.lower() if isinstance(kind, str) else None


def _coerce(value: Any, kind: str | None) -> Any:
    # Best effort: a value that does not fit its declared type is returned unchanged.
    if value is None or kind is None:
        return value
    if kind == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return json.dumps(value)
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return value
    if kind == "integer":
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if kind == "number":
        if isinstance(value, str):
            text = value.strip()
            if _INT.fullmatch(text):
                return int(text)
            if _FLOAT.fullmatch(text):
                return float(text)
        return value
    if kind == "boolean":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value
    if kind in ("array", "object") and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        wanted = list if kind == "array" else dict
        return parsed if isinstance(parsed, wanted) else value
    return value


def _to_json(value: Any, schema: Any) -> Any:
    """Turn a read value into JSON types, following `schema` where it says what a field is."""
    kind = _schema_type(schema)
    if isinstance(value, _Bare):
        if kind == "string":
            return value.raw  # keep the digits as written: `007` declared as a string stays "007"
        return _coerce(_bare_default(value.raw), kind)
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        properties = properties if isinstance(properties, Mapping) else {}
        return _coerce({key: _to_json(item, properties.get(key)) for key, item in value.items()}, kind)
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema, Mapping) else None
        return _coerce([_to_json(item, items) for item in value], kind)
    return _coerce(value, kind)


def _tool_schemas(tools: Any) -> dict[str, Mapping]:
    # Tool name -> its parameters schema.
    schemas: dict[str, Mapping] = {}
    for tool in tools or ():
        if isinstance(tool, Mapping):
            function = _function_of(tool)
            if isinstance(function.get("name"), str) and isinstance(function.get("parameters"), Mapping):
                schemas[function["name"]] = function["parameters"]
    return schemas


def _read_call(text: str, start: int, schemas: Mapping[str, Mapping]) -> tuple[ToolCall, int]:
    """The call whose TOOL_CALL_START is at `start`, and where it ends. Raises _Incomplete/_Malformed."""
    pos = start + len(TOOL_CALL_START)
    match = _CALL_NAME.match(text, pos)
    if match is None:
        if _CALL_NAME_PREFIX.fullmatch(text, pos):
            raise _Incomplete()  # the name is still arriving
        raise _Malformed()
    name = match.group(1)
    reader = _ArgumentReader(text, match.end() - 1)
    arguments = reader.object()
    rest = text[reader.pos :].lstrip()
    if not rest.startswith(TOOL_CALL_END):
        raise _Incomplete() if TOOL_CALL_END.startswith(rest) else _Malformed()
    end = len(text) - len(rest)
    return ToolCall(name=name, arguments=_to_json(arguments, schemas.get(name))), end + len(TOOL_CALL_END)


def parse_tool_calls(text: str, tools: Any = None) -> tuple[str, list[ToolCall]]:
    """`(content_without_calls, calls)` for every well-formed `<|tool_call>call:NAME{...}<tool_call|>`.

    `tools` (OpenAI tool specs) lets argument values follow their declared JSON-schema types. A call
    that cannot be read stays in the content as written; this never raises.
    """
    return _parse_calls(text, _tool_schemas(tools))


def _parse_calls(text: str, schemas: Mapping[str, Mapping]) -> tuple[str, list[ToolCall]]:
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            content.append(text[pos:])
            return "".join(content), calls
        try:
            call, end = _read_call(text, start, schemas)
        except (_Incomplete, _Malformed):
            content.append(text[pos : start + len(TOOL_CALL_START)])
            pos = start + len(TOOL_CALL_START)
            continue
        content.append(text[pos:start])
        calls.append(call)
        pos = end


class ToolCallStreamParser:
    """Streaming twin of `parse_tool_calls`: `feed(delta)` returns `(content_delta, finished_calls)`.

    Content is released as soon as it cannot be part of a call; a call is released whole once its
    `<tool_call|>` arrives. `finish()` releases what is held (an unfinished call becomes content).
    """

    def __init__(self, tools: Any = None):
        self._schemas = _tool_schemas(tools)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._pending:
            start = self._pending.find(TOOL_CALL_START)
            if start < 0:
                keep = _partial_suffix(self._pending, TOOL_CALL_START)
                content.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            content.append(self._pending[:start])
            self._pending = self._pending[start:]
            try:
                call, end = _read_call(self._pending, 0, self._schemas)
            except _Incomplete:
                break
            except _Malformed:
                content.append(TOOL_CALL_START)
                self._pending = self._pending[len(TOOL_CALL_START) :]
                continue
            calls.append(call)
            self._pending = self._pending[end:]
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Release held-back text at the end of the stream; call once after the last `feed`."""
        pending, self._pending = self._pending, ""
        # Nothing more will arrive, so an unfinished call is content, exactly as in parse_tool_calls.
        return _parse_calls(pending, self._schemas)
