"""Specification of the Gemma 4 chat format helpers: reading model output, writing tool blocks."""

import json

import pytest

from dgemma.chat_format import (
    ReasoningStreamParser,
    ToolCall,
    ToolCallStreamParser,
    default_chat_template,
    format_tool_call,
    format_tool_declaration,
    format_tool_response,
    parse_tool_calls,
    split_reasoning,
)
from dgemma.tokenizer import compile_chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast length."},
                "zip": {"type": "string"},
                "detailed": {"type": "boolean"},
                "ratio": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "label": {"type": "string"}},
                    "required": ["lat"],
                },
            },
            "required": ["city"],
        },
    },
}


def call_of(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def render(**variables) -> str:
    return compile_chat_template(default_chat_template()).render(bos_token="<bos>", **variables)


# ---------------------------------------------------------------------------- the thinking channel


def test_thought_channel_is_split_from_content():
    assert split_reasoning("<|channel>thought\nLet me add.<channel|>The sum is 4.") == ("Let me add.", "The sum is 4.")


def test_output_without_a_channel_has_no_reasoning():
    assert split_reasoning("Just the answer.") == (None, "Just the answer.")


def test_empty_channel_gives_empty_reasoning_and_clean_content():
    assert split_reasoning("<|channel>thought\n<channel|>Answer") == ("", "Answer")


def test_unclosed_channel_is_all_reasoning():
    # A generation cut by the length limit inside its thinking.
    assert split_reasoning("<|channel>thought\nstill thinking") == ("still thinking", "")


def test_prompt_ending_inside_a_channel_starts_in_reasoning():
    assert split_reasoning("more thought<channel|>Answer", start_in_reasoning=True) == ("more thought", "Answer")


STREAM_TEXTS = [
    "<|channel>thought\nStep 1: 2+2.\nStep 2: 4.<channel|>The answer is 4.",
    "Plain <answer> with < and <| but no channel.",
    "<|channel>thought\nunfinished <chan",
    "a<|channel>thought\nx<channel|>b<|channel>thought\ny<channel|>c",
    "<|channel>thoughtless<channel|>rest",
    "<|channel>th",
    "ends with a partial marker <|chan",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_one_character_at_a_time_equals_one_shot(text):
    parser = ReasoningStreamParser()
    reasoning, content = [], []
    for char in text:
        r, c = parser.feed(char)
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    expected_reasoning, expected_content = split_reasoning(text)
    assert ("".join(reasoning) + r, "".join(content) + c) == (expected_reasoning or "", expected_content)


def test_stream_holds_back_a_partial_marker():
    parser = ReasoningStreamParser()
    assert parser.feed("Hi <|chan") == ("", "Hi ")  # "<|chan" may be the start of a marker
    assert parser.feed("nel>thought\nhm") == ("hm", "")
    assert parser.feed("<chann") == ("", "")
    assert parser.feed("el|>ok") == ("", "ok")
    assert parser.finish() == ("", "")


def test_stream_releases_held_text_that_was_not_a_marker():
    parser = ReasoningStreamParser()
    assert parser.feed("a <|") == ("", "a ")
    assert parser.feed("b") == ("", "<|b")


# ---------------------------------------------------------------------------- reading tool calls


def test_tool_call_arguments_are_read_as_json_values():
    text = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,detailed:true,ratio:0.5,zip:None}<tool_call|>'
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert calls == [ToolCall("get_weather", {"city": "Paris", "days": 3, "detailed": True, "ratio": 0.5, "zip": None})]


def test_nested_objects_and_arrays_are_read():
    text = '<|tool_call>call:f{a:{b:[1,<|"|>x, y<|"|>,{c:false}],d:{}},e:[]}<tool_call|>'
    assert parse_tool_calls(text)[1][0].arguments == {"a": {"b": [1, "x, y", {"c": False}], "d": {}}, "e": []}


def test_strings_keep_braces_commas_quotes_and_newlines():
    text = '<|tool_call>call:f{s:<|"|>{"k": 1}, a\nb}<|"|>}<tool_call|>'
    assert parse_tool_calls(text)[1][0].arguments == {"s": '{"k": 1}, a\nb}'}


def test_json_style_quotes_are_accepted_too():
    text = '<|tool_call>call:f{"city":"Paris","n":2}<tool_call|>'
    assert parse_tool_calls(text)[1][0].arguments == {"city": "Paris", "n": 2}


def test_schema_turns_a_bare_number_into_a_declared_string():
    text = "<|tool_call>call:get_weather{city:Paris,zip:007}<tool_call|>"
    assert parse_tool_calls(text, tools=[WEATHER])[1][0].arguments == {"city": "Paris", "zip": "007"}


def test_schema_turns_quoted_values_into_declared_numbers_and_booleans():
    text = '<|tool_call>call:get_weather{days:<|"|>5<|"|>,detailed:<|"|>false<|"|>,ratio:<|"|>2.5<|"|>}<tool_call|>'
    arguments = parse_tool_calls(text, tools=[WEATHER])[1][0].arguments
    assert arguments == {"days": 5, "detailed": False, "ratio": 2.5}


def test_schema_reaches_into_nested_objects_and_arrays():
    text = '<|tool_call>call:get_weather{tags:[1,2],where:{lat:<|"|>48.8<|"|>,label:75}}<tool_call|>'
    arguments = parse_tool_calls(text, tools=[WEATHER])[1][0].arguments
    assert arguments == {"tags": ["1", "2"], "where": {"lat": 48.8, "label": "75"}}


def test_value_that_does_not_fit_its_schema_is_kept_as_written():
    text = '<|tool_call>call:get_weather{days:<|"|>soon<|"|>}<tool_call|>'
    assert parse_tool_calls(text, tools=[WEATHER])[1][0].arguments == {"days": "soon"}


def test_text_around_calls_stays_content():
    text = "Checking.\n<|tool_call>call:a{}<tool_call|><|tool_call>call:b{x:1}<tool_call|> done"
    content, calls = parse_tool_calls(text)
    assert content == "Checking.\n done"
    assert [c.name for c in calls] == ["a", "b"]


@pytest.mark.parametrize(
    "text",
    [
        "<|tool_call>call:f{x:1<tool_call|>",  # unbalanced
        "<|tool_call>call:f{x 1}<tool_call|>",  # no colon
        "<|tool_call>f{x:1}<tool_call|>",  # no "call:"
        '<|tool_call>call:f{x:<|"|>open string}<tool_call|>',  # unterminated string
        "<|tool_call>call:f{x:1}",  # cut before the closing marker
        "<|tool_call>call:f{x:1} trailing<tool_call|>",
    ],
)
def test_malformed_call_stays_in_content_and_never_raises(text):
    assert parse_tool_calls(text) == (text, [])


def test_a_malformed_call_does_not_hide_a_good_one_after_it():
    text = "<|tool_call>call:f{x<tool_call|> <|tool_call>call:g{y:2}<tool_call|>"
    content, calls = parse_tool_calls(text)
    assert content == "<|tool_call>call:f{x<tool_call|> "
    assert calls == [ToolCall("g", {"y": 2})]


def test_arguments_json_is_compact_json():
    assert ToolCall("f", {"city": "Zürich", "n": [1, 2]}).arguments_json() == '{"city":"Zürich","n":[1,2]}'


STREAM_CALL_TEXTS = [
    'Sure.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>',
    "<|tool_call>call:a{}<tool_call|>mid<|tool_call>call:b{x:[1,{y:None}]}<tool_call|>end",
    "broken <|tool_call>call:f{x:1} oops <|tool_call>call:g{}<tool_call|>",
    "cut off <|tool_call>call:f{x:<|",
    "no calls, just < and <| and <|tool",
]


@pytest.mark.parametrize("text", STREAM_CALL_TEXTS)
def test_streamed_tool_calls_equal_one_shot(text):
    parser = ToolCallStreamParser(tools=[WEATHER])
    content, calls = [], []
    for char in text:
        c, found = parser.feed(char)
        content.append(c)
        calls.extend(found)
    c, found = parser.finish()
    assert ("".join(content) + c, calls + found) == parse_tool_calls(text, tools=[WEATHER])


def test_stream_releases_a_call_only_when_it_closes():
    parser = ToolCallStreamParser()
    assert parser.feed("Hi <|tool_call>call:f{x:") == ("Hi ", [])
    assert parser.feed("1}") == ("", [])
    assert parser.feed("<tool_call|> bye") == (" bye", [ToolCall("f", {"x": 1})])


# ---------------------------------------------------------------------------- writing = the template

SCHEMAS = [
    WEATHER,
    {"type": "function", "function": {"name": "ping", "description": "No arguments."}},
    {"type": "function", "function": {"name": "no_type", "parameters": {"properties": {"a": {"type": "string"}}}}},
    {
        "type": "function",
        "function": {
            "name": "odd",
            "description": "Unions, nullables, free objects, response.",
            "parameters": {
                "type": "object",
                "properties": {
                    "maybe": {"type": ["string", "null"], "nullable": True},
                    "free": {"type": "object", "extra": {"type": "integer"}, "required": ["extra"]},
                    "rows": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"Id": {"type": "integer"}}, "required": ["Id"]},
                    },
                    "Zeta": {"type": "boolean", "description": "Case-insensitive key order."},
                },
            },
            "response": {"type": "object", "description": "The result."},
        },
    },
]


@pytest.mark.parametrize("tool", SCHEMAS, ids=lambda t: t["function"]["name"])
def test_tool_declaration_is_written_exactly_as_the_template_writes_it(tool):
    prompt = render(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert prompt == f"<bos><|turn>system\n{format_tool_declaration(tool)}<turn|>\n<|turn>user\nhi<turn|>\n"


def test_declaration_serialises_schemas_gemma_style():
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City"}},
                "required": ["city"],
            },
        },
    }
    assert format_tool_declaration(tool) == (
        '<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{'
        'description:<|"|>City<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
    )


ARGUMENTS = [
    {"city": "Paris", "days": 3},
    {"b": [1, 2.5, None, True], "A": {"z": "x", "y": {}}, "s": ""},
    {},
]


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_tool_call_is_written_exactly_as_the_template_writes_it(arguments):
    prompt = render(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [call_of("f", arguments)]},
        ]
    )
    assert prompt == f"<bos><|turn>user\ngo<turn|>\n<|turn>model\n{format_tool_call('f', arguments)}<|tool_response>"


@pytest.mark.parametrize("result", ["sunny, 21 degrees", {"temp": 21, "sky": "clear"}])
def test_tool_response_is_written_exactly_as_the_template_writes_it(result):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    prompt = render(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": result},
        ],
        add_generation_prompt=True,
    )
    expected_tail = format_tool_call("get_weather", {"city": "Paris"}) + format_tool_response("get_weather", result)
    assert prompt.endswith(expected_tail)  # the model continues its own turn after the result


def test_tool_response_wraps_text_as_value():
    assert format_tool_response("f", "ok") == '<|tool_response>response:f{value:<|"|>ok<|"|>}<tool_response|>'


@pytest.mark.parametrize("arguments", ARGUMENTS + [{"city": "x:y,{z}", "n": -7, "f": 1e20, "deep": [[{"k": [None]}]]}])
def test_rendered_tool_call_parses_back_to_the_same_arguments(arguments):
    prompt = render(
        messages=[
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [call_of("f", arguments)]},
        ]
    )
    model_part = prompt.split("<|turn>model\n", 1)[1]
    content, calls = parse_tool_calls(model_part)
    assert content == "<|tool_response>"
    assert calls == [ToolCall("f", json.loads(json.dumps(arguments)))]


def test_packaged_template_is_package_data():
    template = default_chat_template()
    assert "<|turn>" in template and "declaration:" in template
