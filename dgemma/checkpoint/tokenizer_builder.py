"""Small byte-level BPE tokenizers for test and random checkpoints.

A real DiffusionGemma checkpoint ships a 262,144-token tokenizer. The tests and the random
checkpoints need one that builds in well under a second, without downloads, and loads with the same
code: `Tokenizer.from_dir` here, `transformers.AutoTokenizer` for the compatibility tests. The special
tokens sit at the same low ids as in Gemma 4 (pad 0, eos 1, bos 2, unk 3), followed by the chat
markers. The pieces that keep it exact:

- every byte is in the vocabulary (ByteLevel alphabet), so any UTF-8 text round-trips;
- each digit is its own token, because arithmetic tasks learn better on digit-level numbers;
- optionally (`letters=True`) each ASCII letter too, with the space before it: merges then join only
  punctuation and whitespace, so spelling a word, reversing it or changing its case maps tokens to tokens instead
  of asking a small model to learn the letters inside every merged piece.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dgemma.chat_format import default_chat_template
from dgemma.errors import ConfigError
from dgemma.tokenizer import compile_chat_template

# Order is the id: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then the chat markers.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image>",
    "<|image|>",
    "<image|>",
)
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = SPECIAL_TOKENS[:4]
_BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE  # below this some byte would have no token


TOKENIZER_KINDS = ("bpe", "letters")  # build_tokenizer(letters=False / True)


def build_tokenizer(texts: Iterable[str], vocab_size: int, letters: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Ids: SPECIAL_TOKENS first, the 256 byte symbols, then merges.

    `vocab_size` is an upper bound: a small corpus can run out of merges before reaching it (with `letters`,
    the merges of punctuation and whitespace alone end a few hundred tokens in).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens and "
            f"{_BYTE_ALPHABET_SIZE} byte tokens need at least {MIN_VOCAB_SIZE}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Digits first, so no merge can ever join two digits.
            pre_tokenizers.Digits(individual_digits=True),
            *([pre_tokenizers.Split(Regex(" ?[A-Za-z]"), "isolated")] if letters else []),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # encode(..., add_special_tokens=True) puts <bos> first, like Gemma's tokenizer.
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def write_tokenizer_files(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    chat_template: str | None = None,
    model_max_length: int = 262_144,
) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (default: the packaged
    template) so that both `dgemma.tokenizer.Tokenizer` and `transformers.AutoTokenizer` load them."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    added_tokens_decoder = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        # The generic fast class loads tokenizer.json as it is; a model-specific class may rebuild
        # the pipeline from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "added_tokens_decoder": added_tokens_decoder,
        # transformers counts only these (plus bos/eos/pad/unk) in all_special_ids.
        "extra_special_tokens": [
            entry["content"]
            for entry in added_tokens_decoder.values()
            if entry["special"] and entry["content"] not in (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)
        ],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "padding_side": "left",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    template = default_chat_template() if chat_template is None else chat_template
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The built-in corpus
# --------------------------------------------------------------------------------------------------

_PROSE = """\
The quick brown fox jumps over the lazy dog. A diffusion language model writes a whole block of text
at once and then refines it, step by step, until every position is certain.
It was a bright cold day in April, and the clocks were striking thirteen.
Please summarise the following paragraph in one sentence. Answer with yes or no.
What is the capital of France? The capital of France is Paris. Berlin is the capital of Germany.
Water boils at 100 degrees Celsius at sea level; it freezes at 0 degrees.
Thank you! You're welcome. I don't know, but I'll check and get back to you.
She said: "Let's meet at 10:30 on Monday, 3 March 2025." He replied, 'Sounds good.'
Weather report: sunny, 21°C, light wind from the north-west. Tomorrow: rain (80%).
Multilingual text: café, naïve, résumé, Straße, Ελληνικά, русский,
日本語, 中文, 한국어, emoji 🙂🚀.
"""

_CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

for i in range(10):
    print(f"{i} squared is {i * i}")

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
const total = items.reduce((sum, x) => sum + x.price, 0);
if (x != null && y <= 42) { return x * y; } else { return -1; }
'''


def _arithmetic_lines() -> list[str]:
    # Deterministic sums and products so numbers and operators are well represented.
    lines = []
    for a in range(3, 60, 7):
        for b in range(2, 40, 9):
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a * 10} - {b} = {a * 10 - b}.")
    lines.append("Pi is about 3.14159; e is about 2.71828; 1/3 = 0.333...; 2^10 = 1024; -7 % 3 = 2.")
    return lines


def _chat_examples() -> list[str]:
    # Rendered with the packaged template, so the markup of real prompts gets frequent merges.
    template = compile_chat_template(default_chat_template())
    weather_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "description": "Forecast length."},
                },
                "required": ["city"],
            },
        },
    }
    arguments = {"city": "Paris", "days": 2}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    conversations = [
        dict(
            messages=[
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "12 + 30 = 42."},
            ]
        ),
        dict(
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a haiku about autumn."},
                {
                    "role": "assistant",
                    "content": "Red leaves drift and fall,\ncool wind hums in the trees,\nthe year breathes slow.",
                },
                {"role": "user", "content": "Thanks! Now one about winter."},
            ],
            add_generation_prompt=True,
        ),
        dict(
            messages=[
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Call the tool."},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
                {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
            ],
            tools=[weather_tool],
        ),
        dict(messages=[{"role": "user", "content": "Is 17 prime?"}], enable_thinking=True, add_generation_prompt=True),
    ]
    texts = [template.render(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, **chat) for chat in conversations]
    # A model's thinking output, as it would be generated after the prompt.
    texts.append(
        "<|channel>thought\nThe user asks whether 17 is prime. 17 has no divisors but 1 and 17.<channel|>"
        "Yes, 17 is prime.<turn|>"
    )
    return texts


def default_corpus() -> list[str]:
    """A few KB of varied text: prose, code, numbers and rendered chats. Built in, deterministic."""
    return [_PROSE, _CODE, *_arithmetic_lines(), *_chat_examples()]


def build_default_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """`build_tokenizer` on `default_corpus()`: the tokenizer of test and random checkpoints."""
    return build_tokenizer(default_corpus(), vocab_size)
