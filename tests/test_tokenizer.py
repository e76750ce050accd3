"""Specification of the tokenizer: loading a checkpoint's files, ids, and rendering chats."""

import json
import shutil

import pytest

from dgemma.checkpoint.tokenizer_builder import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_default_tokenizer,
    build_tokenizer,
    default_corpus,
    write_tokenizer_files,
)
from dgemma.chat_format import default_chat_template
from dgemma.errors import CheckpointError, ConfigError, RequestError
from dgemma.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(directory, build_default_tokenizer(512))
    return directory


@pytest.fixture(scope="module")
def tok(checkpoint_dir):
    return Tokenizer.from_dir(checkpoint_dir)


@pytest.fixture(scope="module")
def hf_tok(checkpoint_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))


@pytest.fixture
def copy_dir(checkpoint_dir, tmp_path):
    """A private copy of the checkpoint's tokenizer files, for tests that damage them."""
    target = tmp_path / "tok"
    shutil.copytree(checkpoint_dir, target)
    return target


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name."},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CALL = {
    "id": "call_7",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
}

# Conversations that cover every branch of the template a server meets.
CONVERSATIONS = {
    "single_user": dict(messages=[{"role": "user", "content": "Hello!"}]),
    "system": dict(messages=[{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]),
    "thinking": dict(messages=[{"role": "user", "content": "Is 17 prime?"}], enable_thinking=True),
    "thinking_with_system": dict(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], enable_thinking=True
    ),
    "multi_turn": dict(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Why...", "reasoning_content": "x"},
            {"role": "user", "content": "Another."},
        ]
    ),
    "tools_declared": dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER]),
    "pending_tool_call": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
        ],
        tools=[WEATHER],
    ),
    "tool_response": dict(
        messages=[
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "Need the tool."},
            {"role": "tool", "tool_call_id": "call_7", "content": "sunny, 21 degrees"},
        ],
        tools=[WEATHER],
        enable_thinking=True,
    ),
    "tool_round_trip_then_answer": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_7", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks."},
        ],
        tools=[WEATHER],
    ),
}


# ---------------------------------------------------------------------------- the built tokenizer


def test_special_tokens_have_fixed_low_ids(tok):
    assert [tok.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.special_ids == frozenset(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize(
    "text",
    ["plain words", "  padded  ", "tabs\tand\nnewlines\r\n", "Zürich 東京 🙂🚀 \x00\x7f", "", "<|turn>user\nhi"],
)
def test_any_utf8_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_each_digit_is_its_own_token(tok):
    ids = tok.encode("12345 + 67890")
    digit_tokens = [tok.id_to_token(i) for i in ids if tok.id_to_token(i).strip("Ġ").isdigit()]
    assert digit_tokens == list("1234567890")


def test_bos_is_added_only_when_asked(tok):
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_id] + tok.encode("hi")


def test_decode_skips_special_tokens_by_default(tok):
    ids = tok.encode("<|turn>model\nHello<turn|>")
    assert tok.decode(ids) == "model\nHello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|turn>model\nHello<turn|>"


def test_vocab_size_never_exceeds_the_request():
    assert build_tokenizer(default_corpus(), 300).get_vocab_size() <= 300
    assert build_default_tokenizer(512).get_vocab_size() == 512


def test_a_letters_tokenizer_gives_each_letter_its_own_token_and_round_trips(tmp_path):
    """Merges join only punctuation and whitespace: a word is its letters (the first may carry the space before
    it), so "mango" and its reversal "ognam" are the same five tokens in the other order."""
    texts = ["Reverse the word mango.", "What is \"star\" backwards?", "Sort: pear, fig, plum", "HELLO world"] * 50
    write_tokenizer_files(tmp_path, build_tokenizer(texts, 400, letters=True))
    tok = Tokenizer.from_dir(tmp_path)
    assert [tok.decode([i]) for i in tok.encode("mango")] == list("mango")
    assert [tok.decode([i]) for i in tok.encode("ognam")] == list("ognam")
    pieces = [tok.decode([i]) for i in tok.encode("Reverse the word mango. HELLO")]
    assert all(sum(c.isalpha() for c in piece) <= 1 for piece in pieces), pieces
    assert "".join(pieces) == "Reverse the word mango. HELLO"
    text = "Hello, world! 12 + 30 = 42 café 🙂 <|turn>user\nhi<turn|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).encode(text, add_special_tokens=False) == \
        tok.encode(text)


def test_too_small_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size=100"):
        build_tokenizer(["abc"], MIN_VOCAB_SIZE - 175)


def test_packaged_template_is_written_by_default(checkpoint_dir):
    assert (checkpoint_dir / "chat_template.jinja").read_text() == default_chat_template()


# ---------------------------------------------------------------------------- transformers compatibility


def test_transformers_loads_the_files_with_the_same_ids(tok, hf_tok):
    text = "Hello world, 12345 café 🙂\n<|turn>user\nhi<turn|>"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.encode(text) == tok.encode(text, add_special_tokens=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert set(hf_tok.all_special_ids) == tok.special_ids
    for skip in (True, False):
        assert hf_tok.decode(tok.encode(text), skip_special_tokens=skip) == tok.decode(tok.encode(text), skip)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_transformers_renders_the_same_prompt(tok, hf_tok, name):
    conversation = dict(CONVERSATIONS[name])
    ours = tok.render_chat(**conversation)
    messages = conversation.pop("messages")
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **conversation)
    assert ours == theirs
    assert tok.apply_chat(messages, **conversation) == hf_tok.encode(theirs, add_special_tokens=False)


# ---------------------------------------------------------------------------- the chat format


def test_prompt_has_one_bos_and_ends_with_the_model_turn(tok):
    ids = tok.apply_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_thinking_switch_opens_a_system_turn(tok):
    prompt = tok.render_chat([{"role": "user", "content": "Hi"}], enable_thinking=True)
    assert prompt == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_thinking_off_adds_no_thought_channel(tok):
    assert tok.render_chat([{"role": "user", "content": "Hi"}]).endswith("<|turn>model\n")


def test_thinking_is_dropped_from_history(tok):
    prompt = tok.render_chat(
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4", "reasoning_content": "add them"},
            {"role": "user", "content": "3+3?"},
        ]
    )
    assert "add them" not in prompt
    assert "<|turn>model\n4<turn|>\n" in prompt


def test_thinking_before_a_pending_tool_call_is_kept(tok):
    # Within the current agentic turn the model's reasoning between calls stays visible to it.
    prompt = tok.render_chat(
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [CALL], "reasoning": "Call it."}],
        tools=[WEATHER],
    )
    assert prompt.endswith("<|turn>model\n<|channel>thought\nCall it.\n<channel|>" + _call_text() + "<|tool_response>")


def _call_text():
    return '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'


def test_tools_are_declared_in_the_system_turn(tok):
    messages = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]
    prompt = tok.render_chat(messages, tools=[WEATHER])
    assert prompt.startswith("<bos><|turn>system\nSys.<|tool>declaration:get_weather{")
    assert "<tool|><turn|>\n<|turn>user\nHi" in prompt


def test_json_string_arguments_render_like_objects(tok):
    as_string = {**CALL, "function": {"name": "get_weather", "arguments": json.dumps(CALL["function"]["arguments"])}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [as_string]}]
    assert _call_text() in tok.render_chat(messages)


def test_tool_result_is_named_after_the_call_it_answers(tok):
    prompt = tok.render_chat(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
        ]
    )
    # No generation prompt: the model continues its open turn after the result.
    assert prompt.endswith(_call_text() + '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>')


def test_calls_without_ids_get_replies_by_name(tok):
    calls = [
        {"type": "function", "function": {"name": "a", "arguments": {}}},
        {"type": "function", "function": {"name": "b", "arguments": {}}},
    ]
    prompt = tok.render_chat(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "name": "a", "content": "1"},
            {"role": "tool", "name": "b", "content": "2"},
        ]
    )
    assert "response:a{value:" in prompt and "response:b{value:" in prompt


def test_text_parts_are_joined(tok):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    joined = tok.render_chat([{"role": "user", "content": "Hello world"}])
    assert tok.render_chat([{"role": "user", "content": parts}]) == joined


def test_template_kwargs_reach_the_template(copy_dir):
    (copy_dir / "chat_template.jinja").write_text("{{ bos_token }}{{ greeting }}{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(copy_dir).render_chat([{"role": "user", "content": "!"}], greeting="Hi") == "<bos>Hi!"


# ---------------------------------------------------------------------------- bad requests


def test_image_part_is_refused(tok):
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:..."}}]
    with pytest.raises(RequestError, match="images are not supported yet"):
        tok.render_chat([{"role": "user", "content": parts}])


def test_unknown_role_names_the_role_and_index(tok):
    with pytest.raises(RequestError, match=r"messages\[1\].*'narrator'"):
        tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "..."}])


def test_empty_conversation_is_refused(tok):
    with pytest.raises(RequestError, match="non-empty"):
        tok.render_chat([])


def test_tool_message_without_a_call_is_refused(tok):
    with pytest.raises(RequestError, match=r"messages\[1\].*tool_calls"):
        tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "tool", "name": "f", "content": "1"}])


def test_tool_message_with_an_unknown_call_id_is_refused(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "nope", "content": "1"},
    ]
    with pytest.raises(RequestError, match="'nope'"):
        tok.render_chat(messages)


def test_invalid_json_arguments_are_refused(tok):
    bad = {"type": "function", "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(RequestError, match=r"tool_calls\[0\].*JSON"):
        tok.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [bad]}])


# ---------------------------------------------------------------------------- damaged checkpoints


def test_missing_tokenizer_json_names_the_file(copy_dir):
    (copy_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(copy_dir)


def test_corrupt_tokenizer_json_names_the_file(copy_dir):
    (copy_dir / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(copy_dir)


def test_missing_tokenizer_config_names_the_file(copy_dir):
    (copy_dir / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(copy_dir)


def test_corrupt_tokenizer_config_names_the_file(copy_dir):
    (copy_dir / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(copy_dir)


def test_eos_token_outside_the_vocabulary_names_the_config(copy_dir):
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = "<end_of_everything>"
    (copy_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*<end_of_everything>"):
        Tokenizer.from_dir(copy_dir)


def test_broken_template_names_the_file(copy_dir):
    (copy_dir / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        Tokenizer.from_dir(copy_dir)


def test_template_falls_back_to_the_tokenizer_config_key(copy_dir):
    (copy_dir / "chat_template.jinja").unlink()
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}config template"
    (copy_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(copy_dir).render_chat([{"role": "user", "content": "Hi"}]) == "<bos>config template"


def test_checkpoint_without_a_template_still_encodes_but_cannot_render(copy_dir):
    (copy_dir / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(copy_dir)
    assert tok.decode(tok.encode("plain text")) == "plain text"
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        tok.render_chat([{"role": "user", "content": "Hi"}])


def test_the_packaged_template_renders_every_training_conversation_as_the_sandbox_does():
    """dgemma's own template renders without the sandbox (speed: the training corpus is two renders per example);
    the text must be the sandboxed render's, for every task family, tools and thinking included."""
    import jinja2.sandbox

    from dgemma.tokenizer import compile_chat_template
    from dgemma.train.dataset import chat_renderer
    from dgemma.train.tasks import generate_examples

    renderer = chat_renderer()
    assert type(renderer._template.environment) is jinja2.Environment
    sandboxed = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=list(renderer._template.environment.extensions))
    sandboxed.filters["tojson"] = renderer._template.environment.filters["tojson"]
    sandboxed.globals.update(renderer._template.environment.globals)
    reference = sandboxed.from_string(default_chat_template())
    rendered = 0
    for example in generate_examples(11, 400):
        for messages, prompt in ((example.prompt_messages, True), (example.messages, False)):
            got = renderer.render_chat(messages, example.tools, add_generation_prompt=prompt,
                                       enable_thinking=example.enable_thinking)
            original, renderer._template = renderer._template, reference
            try:
                want = renderer.render_chat(messages, example.tools, add_generation_prompt=prompt,
                                            enable_thinking=example.enable_thinking)
            finally:
                renderer._template = original
            assert got == want, example.family
            rendered += 1
    assert rendered == 800
    # Any other template is untrusted: sandboxed.
    assert isinstance(compile_chat_template("{{ messages }}").environment, jinja2.sandbox.SandboxedEnvironment)
