"""Synthetic conversations that teach a small DiffusionGemma useful skills: the task families and their mixture.

A family turns a `random.Random` into one `Example`: a chat in OpenAI message format whose last assistant
message is the training target. The model is small (10-30 M parameters), so every family keeps its problems
learnable: bounded sizes, a few paraphrases per task (so the model learns the task, not one string) and short
canonical answers (so exact match against `Example.answer` is meaningful).

Train / held-out rule. Every example has a split key: its underlying problem (`meta`), or, for the families the
model must memorise rather than generalise (facts, small talk, tool calls), its whole prompt. The key's SHA-256
picks a bucket in [0, 100); buckets below `HELDOUT_PERCENT` are held out, except prompts a family marks as
`always_train` (small talk keeps its plain phrasings, so "Tell me a joke." is never missing from training).
Training draws reject held-out keys and held-out draws accept only them, so the two splits are disjoint for
every pair of seeds, not merely with high probability, and no dedupe pass against a training set is needed.
This holds because each family writes `meta` only from what its prompt states: two identical prompts always
have the same key. The splits also use separate random streams (the split name is hashed into every example's
seed), and example `i` of a stream does not depend on `n`, so a longer run extends a shorter one.

`dgemma.train.checker` recomputes every answer from `meta` with its own code; keep the two in step by hand
when a phrasing of an answer changes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from dgemma.errors import ConfigError

HELDOUT_PERCENT = 10  # share of split keys reserved for evaluation

# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training conversation; its last message is the assistant turn the model learns to write."""

    family: str  # key in FAMILIES; reports group scores by it
    messages: list[dict]  # OpenAI chat messages, ending with the target assistant message
    tools: list[dict] | None  # OpenAI tool specs declared to the model, or None
    enable_thinking: bool  # render the prompt in thinking mode (the target then has reasoning_content)
    answer: str  # the target's content without thinking; "" when the target is a tool call
    meta: dict  # the underlying problem, from which the checker recomputes the answer

    @property
    def prompt_messages(self) -> list[dict]:
        """Everything before the target: what the model is conditioned on."""
        return self.messages[:-1]

    @property
    def target(self) -> dict:
        return self.messages[-1]

    @property
    def expects_tool_call(self) -> bool:
        """True when the target is a tool call (check it with `checker.check_tool_call`)."""
        return bool(self.messages[-1].get("tool_calls"))


@dataclass
class Problem:
    """A single question with its canonical answer: the building block that composite families reuse."""

    question: str
    answer: str
    meta: dict
    value: str | None = None  # the bare result where `answer` shows its work; formats that want only it use it


@dataclass
class Draft:
    """What a family's generator returns; `Family.sample` turns it into an `Example`."""

    messages: list[dict]
    meta: dict
    tools: list[dict] | None = None
    enable_thinking: bool = False


@dataclass(frozen=True)
class Family:
    """A task family: a generator plus how it is mixed and split."""

    name: str
    make: Callable[[random.Random], Draft]
    weight: float = 1.0  # relative share in the default mixture
    # "problem": held-out examples are unseen problems (tests generalisation). "text": only the exact prompt is
    # unseen, for tasks the model must memorise (facts, persona) where holding out a fact would make it unlearnable.
    holdout_by: str = "problem"
    # Prompts that are always training data, never held out: the plain phrasings a user is most likely to type,
    # where a held-out gap would cost real users more than it tells an evaluation.
    always_train: Callable[[Example], bool] | None = None

    def sample(self, rng: random.Random) -> Example:
        draft = self.make(rng)
        target = draft.messages[-1]
        return Example(
            family=self.name,
            messages=draft.messages,
            tools=draft.tools,
            enable_thinking=draft.enable_thinking,
            answer=target.get("content", ""),
            meta=draft.meta,
        )

    def split_key(self, example: Example) -> str:
        if self.holdout_by == "problem":
            return json.dumps({"family": self.name, "meta": example.meta}, sort_keys=True, ensure_ascii=False)
        return prompt_key(example)


def prompt_key(example: Example) -> str:
    """Everything the model sees before the target, as one string: equal keys mean identical prompts."""
    return json.dumps(
        {"messages": example.prompt_messages, "tools": example.tools, "thinking": example.enable_thinking},
        sort_keys=True,
        ensure_ascii=False,
    )


# --------------------------------------------------------------------------------------------------
# Vocabulary and small helpers
# --------------------------------------------------------------------------------------------------

# Common English words of 3-9 letters (dgemma/assets/words.txt, one per line): the words the spelling, sorting and
# string tasks draw from. A few hundred, so a model must learn to spell, not memorise a short list's answers (with 86
# words, "elephant" or "fig" were never seen and "How many letters are in elephant?" got 5).
WORDS = tuple(resources.files("dgemma").joinpath("assets/words.txt").read_text(encoding="utf-8").split())
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Kate Liam Mia Noah Olivia Paul".split()
CITIES = (
    "Paris,London,Tokyo,Berlin,Madrid,Rome,Oslo,Cairo,Lima,Sydney,Toronto,Chicago,Mumbai,Seoul,Dubai,Nairobi,"
    "Lisbon,Vienna,Dublin,Athens,Boston,Denver,Miami,Prague,Zurich,Munich,Osaka,Bangkok,Hanoi,New York,"
    "Cape Town,Buenos Aires,Mexico City"
).split(",")
COLORS = "red blue green black white yellow purple orange".split()
CURRENCIES = "USD EUR GBP JPY CHF CAD AUD INR CNY SEK".split()
NEUTRAL_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are dgemma-mini, a small and helpful assistant.",
    "You are a friendly assistant that gives short answers.",
)
NEUTRAL_SYSTEM_PROBABILITY = 0.15  # so a harmless system prompt never changes an answer
PERSONA_NAME = "dgemma-mini"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _system(text: str) -> dict:
    return {"role": "system", "content": text}


def _number(rng: random.Random, max_digits: int) -> int:
    # Uniform over the digit count first, so small operands are as common as large ones.
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _numbers(rng: random.Random, count: int) -> list[int]:
    # A quarter of the lists hold only single digits: people ask about such lists ("sort 5, 3, 9, 1"), and uniform
    # draws from 0-99 almost never make one, so a model trained on those alone fails them.
    top = 9 if rng.random() < 0.25 else 99
    return [rng.randint(0, top) for _ in range(count)]


def _join(items: list) -> str:
    """The canonical list answer: items separated by ', ', no brackets."""
    return ", ".join(str(item) for item in items)


def _show_list(rng: random.Random, items: list) -> str:
    # Questions show lists with or without brackets; answers are always plain (see _join).
    text = _join(items)
    return f"[{text}]" if rng.random() < 0.4 else text


def _the(name: str) -> str:
    return "the " + name if name in ("United Kingdom", "United States", "Philippines") else name


def _ordinal(n: int) -> str:
    return ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")[n - 1]


def _with_neutral_system(rng: random.Random, messages: list[dict]) -> list[dict]:
    if rng.random() < NEUTRAL_SYSTEM_PROBABILITY:
        return [_system(rng.choice(NEUTRAL_SYSTEM_PROMPTS)), *messages]
    return messages


@functools.lru_cache(maxsize=1)
def load_facts() -> dict[str, list[dict]]:
    """The fact table in dgemma/assets/facts.json: countries, planets and elements (do not mutate)."""
    text = resources.files("dgemma").joinpath("assets/facts.json").read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------------------------------
# Single-question problems
# --------------------------------------------------------------------------------------------------

ADD_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "{a} + {b} = ?",
    "Calculate {a} plus {b}.",
    "How much is {a} plus {b}?",
    "{a} + {b}",
    "What's {a} + {b}?",
    "Increase {a} by {b}.",
    "What do you get when you add {a} and {b}?",
    "What does {a} + {b} equal?",
    "Work out {a} plus {b}.",
    "Give me the total of {a} and {b}.",
    "Tell me {a} + {b}.",
)
SUB_TEMPLATES = (
    "What is {a} - {b}?",
    "Compute {a} - {b}.",
    "Subtract {b} from {a}.",
    "What is {a} minus {b}?",
    "{a} - {b} = ?",
    "Calculate {a} minus {b}.",
    "What do you get if you take {b} away from {a}?",
    "{a} - {b}",
    "What's {a} - {b}?",
    "Decrease {a} by {b}.",
    "What is {b} less than {a}?",
    "What does {a} - {b} equal?",
    "Work out {a} minus {b}.",
    "Find the difference {a} - {b}.",
    "Tell me {a} - {b}.",
)
MUL_TEMPLATES = (
    "What is {a} * {b}?",
    "What is {a} × {b}?",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
    "Compute {a} times {b}.",
    "{a} x {b} = ?",
    "How much is {a} times {b}?",
    "{a} * {b}",
    "{a} × {b}",
    "What's {a} * {b}?",
    "Find the product of {a} and {b}.",
    "What does {a} * {b} equal?",
    "Work out {a} times {b}.",
    "Calculate {a} * {b}.",
    "Tell me {a} × {b}.",
)


def add_problem(rng: random.Random) -> Problem:
    a, b = _number(rng, 3), _number(rng, 3)
    return Problem(rng.choice(ADD_TEMPLATES).format(a=a, b=b), str(a + b), {"a": a, "b": b})


def sub_problem(rng: random.Random) -> Problem:
    a, b = _number(rng, 3), _number(rng, 3)  # b > a gives a negative answer, which the model must learn too
    return Problem(rng.choice(SUB_TEMPLATES).format(a=a, b=b), str(a - b), {"a": a, "b": b})


def mul_problem(rng: random.Random) -> Problem:
    # Up to 3 digits times up to 2 digits: 3x3-digit products need more capacity than a 10-30 M model has.
    a, b = _number(rng, 3), _number(rng, 2)
    if rng.random() < 0.5:
        a, b = b, a
    question = rng.choice(MUL_TEMPLATES).format(a=a, b=b)
    return Problem(question, worked_product(a, b), {"a": a, "b": b}, value=str(a * b))


def worked_product(a: int, b: int) -> str:
    """The answer to a * b, with its work shown when the shorter factor has two digits (ones digit not 0):
    "24 × 345 = 345 × 20 + 345 × 4 = 6900 + 1380 = 8280".

    A model of this size gets a 3-digit by 2-digit product right in one go only about a third of the time (the
    shipped model of the twelfth run, on such products: 65 of 200), and about four times in five when it first
    writes the two partial products (its thinking channel: 162 of 200). Products by one digit, or by a multiple of
    ten, stay a bare number, as a person would write them.
    """
    split, other = (b, a) if len(str(b)) <= len(str(a)) else (a, b)
    tens, ones = divmod(split, 10)
    if not 1 <= tens <= 9 or ones == 0:
        return str(a * b)
    high, low = other * tens * 10, other * ones
    return f"{a} × {b} = {other} × {tens * 10} + {other} × {ones} = {high} + {low} = {high + low}"


SORT_TEMPLATES = {
    ("numbers", False): (
        "Sort these numbers in ascending order: {items}",
        "Sort from smallest to largest: {items}",
        "Put these numbers in increasing order: {items}",
        "Arrange {items} from lowest to highest.",
        "Sort: {items}",
        "Sort the list {items}.",
        "Can you sort {items}?",
        "Arrange these numbers in ascending order: {items}",
        "Put {items} in order, smallest first.",
        "Order {items} from smallest to largest.",
    ),
    ("numbers", True): (
        "Sort these numbers in descending order: {items}",
        "Sort from largest to smallest: {items}",
        "Put these numbers in decreasing order: {items}",
        "Sort {items} in descending order.",
        "Put {items} in order, largest first.",
        "Arrange {items} from highest to lowest.",
        "Sort the list {items}, biggest first.",
    ),
    ("words", False): (
        "Sort these words alphabetically: {items}",
        "Put these words in alphabetical order: {items}",
        "Alphabetize: {items}",
        "Put {items} in alphabetical order.",
        "Arrange these words alphabetically: {items}",
        "Sort alphabetically: {items}",
        "Can you alphabetize {items}?",
    ),
    ("words", True): (
        "Sort these words in reverse alphabetical order: {items}",
        "Put these words in reverse alphabetical order: {items}",
        "Put {items} in reverse alphabetical order.",
        "Sort these words, last in the alphabet first: {items}",
        "Reverse-alphabetize: {items}",
    ),
}


def _sort_problem(rng: random.Random, items: list, descending: bool) -> Problem:
    kind = "words" if isinstance(items[0], str) else "numbers"
    question = rng.choice(SORT_TEMPLATES[(kind, descending)]).format(items=_show_list(rng, items))
    return Problem(question, _join(sorted(items, reverse=descending)), {"items": items, "descending": descending})


def sort_problem(rng: random.Random) -> Problem:
    descending = rng.random() < 0.3
    if rng.random() < 0.6:
        items = _numbers(rng, rng.randint(3, 12))
    else:
        items = rng.sample(WORDS, rng.randint(3, 8))
    return _sort_problem(rng, items, descending)


REVERSE_LIST_TEMPLATES = (
    "Reverse this list: {items}",
    "Write this list in reverse order: {items}",
    "What is {items} reversed?",
    "Reverse the order of {items}.",
    "Reverse the list {items}.",
    "List {items} in reverse order.",
    "Can you reverse {items}?",
)
REVERSE_WORD_TEMPLATES = (
    "Reverse the word {w}.",
    "Spell {w} backwards.",
    'What is "{w}" written backwards?',
    'Reverse the letters of "{w}".',
    "Can you reverse the word {w}?",
    "Write the word {w} in reverse.",
    "Spell the word {w} backwards.",
    "What is {w} spelled backwards?",
    "Reverse the string {w}.",
    "{w} reversed is?",
)


def reverse_problem(rng: random.Random) -> Problem:
    if rng.random() < 0.6:
        count = rng.randint(3, 12)
        items = _numbers(rng, count) if rng.random() < 0.5 else rng.sample(WORDS, min(count, 8))
        question = rng.choice(REVERSE_LIST_TEMPLATES).format(items=_show_list(rng, items))
        return Problem(question, _join(items[::-1]), {"kind": "list", "items": items})
    word = rng.choice(WORDS)
    return Problem(rng.choice(REVERSE_WORD_TEMPLATES).format(w=word), word[::-1], {"kind": "word", "word": word})


COUNT_TEMPLATES = {
    "occurrences": (
        "How many times does {x} appear in {items}?",
        "Count how many times {x} occurs in {items}.",
        "How many {x}s are in {items}?",
        "In {items}, how many times does {x} appear?",
        "Count the occurrences of {x} in {items}.",
    ),
    "letters": (
        "How many letters are in the word {w}?",
        'How many letters does "{w}" have?',
        "How long is the word {w}, in letters?",
        "What is the length of the word {w}?",
        "How many letters is {w}?",
        "Tell me how many letters {w} has.",
    ),
    "letter": (
        'How many times does the letter "{c}" appear in "{w}"?',
        "Count the letter {c} in the word {w}.",
        'How many "{c}"s are in {w}?',
        "How many times is {c} in {w}?",
        'In "{w}", how many times does the letter {c} appear?',
    ),
    "words": (
        'How many words are in this sentence: "{t}"?',
        'Count the words in "{t}".',
        'How many words are in "{t}"?',
        "Count the words: {t}",
        'Number of words in "{t}"?',
    ),
}


def count_problem(rng: random.Random) -> Problem:
    kind = rng.choice(("occurrences", "letters", "letter", "words"))
    template = rng.choice(COUNT_TEMPLATES[kind])
    if kind == "occurrences":
        items = [rng.randint(0, 9) for _ in range(rng.randint(5, 12))]
        target = rng.choice(items) if rng.random() < 0.8 else rng.randint(0, 9)
        question = template.format(x=target, items=_show_list(rng, items))
        return Problem(question, str(items.count(target)), {"kind": kind, "items": items, "target": target})
    if kind == "letters":
        word = rng.choice(WORDS)
        return Problem(template.format(w=word), str(len(word)), {"kind": kind, "word": word})
    if kind == "letter":
        word = rng.choice(WORDS)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        question = template.format(c=letter, w=word)
        return Problem(question, str(word.count(letter)), {"kind": kind, "word": word, "letter": letter})
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
    text = " ".join(words)
    return Problem(template.format(t=text), str(len(words)), {"kind": kind, "text": text})


STRING_TEMPLATES = {
    "upper": ('Convert "{t}" to uppercase.', 'Write "{t}" in capital letters.', "Uppercase this: {t}",
              'Uppercase "{t}".', 'Change "{t}" to upper case.', "Write {t} in all caps."),
    "lower": ('Convert "{t}" to lowercase.', 'Write "{t}" in small letters.', "Lowercase this: {t}",
              'Lowercase "{t}".', 'Change "{t}" to lower case.', "Write {t} in lower case."),
    "first_letter": ("What is the first letter of {w}?", 'Which letter does "{w}" start with?',
                     "What letter does {w} begin with?", 'Give the first letter of "{w}".',
                     "Which letter starts the word {w}?"),
    "last_letter": ("What is the last letter of {w}?", 'Which letter does "{w}" end with?',
                    "What letter does {w} end with?", 'Give the last letter of "{w}".',
                    "Which letter ends the word {w}?"),
    "join": ("Join these words with {sep_name}: {items}", "Combine {items} into one string using {sep_name}.",
             "Connect {items} using {sep_name}.", "Join the words {items} using {sep_name}."),
    "split": ('Split "{t}" into words.', 'List the words in "{t}", separated by commas.',
              "Split {t} into a list of words.", 'Separate "{t}" into words.', 'Which words make up "{t}"?'),
    "replace": ('Replace the word "{old}" with "{new}" in "{t}".', 'In "{t}", change the word "{old}" to "{new}".',
                'Change "{old}" to "{new}" in "{t}".', 'In "{t}", replace "{old}" with "{new}".',
                'Rewrite "{t}" with "{new}" instead of "{old}".'),
}
SEPARATORS = {"-": "a hyphen", "_": "an underscore", "/": "a slash", " ": "a space", "": "no separator"}


def string_ops_problem(rng: random.Random) -> Problem:
    op = rng.choice(tuple(STRING_TEMPLATES))
    template = rng.choice(STRING_TEMPLATES[op])
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    if op == "upper":
        text = " ".join(words)
        return Problem(template.format(t=text), text.upper(), {"op": op, "text": text})
    if op == "lower":
        text = " ".join(w.upper() if rng.random() < 0.5 else w.capitalize() for w in words)
        return Problem(template.format(t=text), text.lower(), {"op": op, "text": text})
    if op in ("first_letter", "last_letter"):
        word = words[0]
        return Problem(template.format(w=word), word[0] if op == "first_letter" else word[-1], {"op": op, "word": word})
    if op == "join":
        items = rng.sample(WORDS, rng.randint(2, 5))
        sep = rng.choice(tuple(SEPARATORS))
        question = template.format(sep_name=SEPARATORS[sep], items=_join(items))
        return Problem(question, sep.join(items), {"op": op, "words": items, "sep": sep})
    if op == "split":
        items = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        text = " ".join(items)
        return Problem(template.format(t=text), _join(items), {"op": op, "text": text})
    items = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    old = rng.choice(items)
    new = rng.choice([w for w in WORDS if w not in items])
    text = " ".join(items)
    answer = " ".join(new if w == old else w for w in items)  # whole words only, every occurrence
    return Problem(template.format(t=text, old=old, new=new), answer, {"op": op, "text": text, "old": old, "new": new})


LIST_TEMPLATES = {
    "max": ("What is the largest number in {items}?", "Find the maximum of {items}.", "Which is the biggest: {items}?",
            "Which number in {items} is the largest?", "Give the highest value in {items}.",
            "What is the maximum of {items}?"),
    "min": (
        "What is the smallest number in {items}?",
        "Find the minimum of {items}.",
        "Which is the smallest: {items}?",
        "Which number in {items} is the smallest?",
        "Give the lowest value in {items}.",
        "What is the minimum of {items}?",
    ),
    "sum": ("What is the sum of {items}?", "Add up these numbers: {items}", "What do {items} add up to?",
            "Add together {items}.", "Find the sum of {items}.", "What do you get if you add {items}?"),
    "length": (
        "How many numbers are in the list {items}?",
        "What is the length of the list {items}?",
        "How many elements does {items} have?",
        "How many items are in {items}?",
        "What is the size of the list {items}?",
    ),
    "dedupe": (
        "Remove the duplicates from {items}.",
        "Remove repeated numbers from {items}, keeping the first occurrence.",
        "List the unique values of {items} in their original order.",
        "Remove duplicates: {items}",
        "Keep only the first copy of each number in {items}.",
        "Deduplicate {items}.",
    ),
    # Short counts: the long family counts to 20-50, so without these "Count from 1 to 5." ran on to 25.
    "range": ("Count from {a} to {b}.", "List the numbers from {a} to {b}.", "Write the numbers from {a} to {b}.",
              "Count up from {a} to {b}.", "Write out the numbers {a} to {b}.",
              "Print the numbers from {a} through {b}."),
}
RANGE_DOWN_TEMPLATES = ("Count down from {a} to {b}.", "List the numbers from {a} down to {b}.",
                        "Write the numbers from {a} down to {b}.", "Count down, {a} to {b}.")


def list_ops_problem(rng: random.Random) -> Problem:
    op = rng.choice(tuple(LIST_TEMPLATES))
    if op == "dedupe":
        # A small value range makes repeats likely; one forced repeat makes the task never trivial.
        items = [rng.randint(0, 20) for _ in range(rng.randint(4, 11))]
        items.insert(rng.randint(0, len(items)), rng.choice(items))
        unique: list[int] = []
        for item in items:
            if item not in unique:
                unique.append(item)
        answer = _join(unique)
    elif op == "range":
        low = 1 if rng.random() < 0.6 else rng.randint(0, 20)
        high = low + rng.randint(2, 12)
        down = rng.random() < 0.3
        a, b = (high, low) if down else (low, high)
        question = rng.choice(RANGE_DOWN_TEMPLATES if down else LIST_TEMPLATES[op]).format(a=a, b=b)
        step = -1 if down else 1
        return Problem(question, _join(range(a, b + step, step)), {"op": op, "start": a, "stop": b})
    else:
        items = _numbers(rng, rng.randint(3, 6 if op == "sum" else 12))
        answer = str({"max": max, "min": min, "sum": sum, "length": len}[op](items))
    question = rng.choice(LIST_TEMPLATES[op]).format(items=_show_list(rng, items))
    return Problem(question, answer, {"op": op, "items": items})


JSON_TEMPLATES = {
    "to_json": (
        "Convert to compact JSON with sorted keys: {kv}",
        "Turn this into JSON (compact, keys sorted): {kv}",
        "Write {kv} as a compact JSON object with sorted keys.",
    ),
    "to_lines": ("Convert this JSON to key=value lines: {json}", "Rewrite {json} as one key=value pair per line."),
    "get": ('What is the value of "{key}" in {json}?', "From {json}, extract {key}."),
}
JSON_FIELDS: dict[str, Callable[[random.Random], object]] = {
    "name": lambda rng: rng.choice(NAMES),
    "age": lambda rng: rng.randint(18, 90),
    "city": lambda rng: rng.choice(CITIES),
    "color": lambda rng: rng.choice(COLORS),
    "pet": lambda rng: rng.choice(("cat", "dog", "fish", "bird", "horse")),
    "score": lambda rng: rng.randint(0, 100),
    "id": lambda rng: rng.randint(1, 999),
}


def json_reformat_problem(rng: random.Random) -> Problem:
    op = rng.choice(tuple(JSON_TEMPLATES))
    keys = rng.sample(tuple(JSON_FIELDS), rng.randint(2, 4))
    pairs = [[key, JSON_FIELDS[key](rng)] for key in keys]
    meta: dict = {"op": op, "pairs": pairs}
    as_json = json.dumps(dict(pairs))  # questions show readable JSON, in the pairs' order
    if op == "to_json":
        # Digits-only values are numbers in the JSON; everything else is a string.
        question = rng.choice(JSON_TEMPLATES[op]).format(kv=", ".join(f"{k}={v}" for k, v in pairs))
        answer = json.dumps(dict(pairs), sort_keys=True, separators=(",", ":"))
    elif op == "to_lines":
        question = rng.choice(JSON_TEMPLATES[op]).format(json=as_json)
        answer = "\n".join(f"{k}={v}" for k, v in pairs)
    else:
        key, value = rng.choice(pairs)
        question = rng.choice(JSON_TEMPLATES[op]).format(key=key, json=as_json)
        answer = str(value)
        meta["key"] = key
    return Problem(question, answer, meta)


@dataclass(frozen=True)
class Unit:
    symbol: str  # what answers write after the number
    singular: str
    plural: str
    dimension: str
    base: int  # size in the dimension's smallest unit (mm, g, s, mL)


UNITS = {
    u.symbol: u
    for u in (
        Unit("km", "kilometer", "kilometers", "length", 1_000_000),
        Unit("m", "meter", "meters", "length", 1000),
        Unit("cm", "centimeter", "centimeters", "length", 10),
        Unit("mm", "millimeter", "millimeters", "length", 1),
        Unit("kg", "kilogram", "kilograms", "mass", 1000),
        Unit("g", "gram", "grams", "mass", 1),
        Unit("h", "hour", "hours", "time", 3600),
        Unit("min", "minute", "minutes", "time", 60),
        Unit("s", "second", "seconds", "time", 1),
        Unit("L", "liter", "liters", "volume", 1000),
        Unit("mL", "milliliter", "milliliters", "volume", 1),
    )
}
MAX_UNIT_RATIO = 3600  # km -> mm (10^6) would give numbers a small model cannot handle
UNIT_TEMPLATES = (
    "Convert {v} {f} to {t}.",
    "What is {v} {f} in {t}?",
    "How many {t_plural} are in {v} {f_name}?",
    "Convert {v} {f_name} to {t_plural}.",
    "How much is {v} {f} in {t}?",
    "Change {v} {f} into {t}.",
    "{v} {f} equals how many {t_plural}?",
    "Turn {v} {f_name} into {t_plural}.",
)


def _unit_amount(value: int, unit: Unit) -> str:
    return f"{value} {unit.symbol}"


def units_problem(rng: random.Random) -> Problem:
    dimension = rng.choice(sorted({u.dimension for u in UNITS.values()}))
    options = [
        (f, t)
        for f in UNITS.values()
        for t in UNITS.values()
        if f.dimension == t.dimension == dimension and f is not t
        and max(f.base, t.base) // min(f.base, t.base) <= MAX_UNIT_RATIO
    ]
    src, dst = rng.choice(options)
    if src.base > dst.base:  # to a smaller unit: multiply
        value = rng.randint(1, 20 if src.base // dst.base > 100 else 99)
        result = value * src.base // dst.base
    else:  # to a larger unit: only exact multiples, so answers stay integers
        result = rng.randint(1, 20 if dst.base // src.base > 100 else 99)
        value = result * dst.base // src.base
    question = rng.choice(UNIT_TEMPLATES).format(
        v=value, f=src.symbol, t=dst.symbol, t_plural=dst.plural, f_name=src.singular if value == 1 else src.plural
    )
    return Problem(question, _unit_amount(result, dst), {"value": value, "from": src.symbol, "to": dst.symbol})


# (table, attribute, reverse) -> question templates. Reverse questions give the attribute and ask for the name,
# so only attributes that are unique per row have them (the checker's table test enforces uniqueness).
FACT_TEMPLATES = {
    ("countries", "capital", False): (
        "What is the capital of {name}?",
        "Which city is the capital of {name}?",
        "Name the capital of {name}.",
        "What city is the capital of {name}?",
        "What's the capital of {name}?",
        "The capital of {name} is?",
    ),
    ("countries", "capital", True): (
        "Which country has {value} as its capital?",
        "{value} is the capital of which country?",
        "Of which country is {value} the capital?",
        "Which country's capital is {value}?",
        "In which country is the capital {value}?",
    ),
    ("countries", "continent", False): (
        "On which continent is {name}?",
        "Which continent is {name} in?",
        "What continent is {name} located on?",
        "Which continent does {name} belong to?",
        "{name} is part of which continent?",
    ),
    ("planets", "order", False): (
        "What is the position of {name} from the Sun?",
        "Counting from the Sun, what number planet is {name}?",
        "What place does {name} have among the planets from the Sun?",
    ),
    ("planets", "order", True): ("Which planet is {value} from the Sun?", "What is the {value} planet from the Sun?",
                                 "Which planet comes {value} from the Sun?"),
    ("planets", "type", False): (
        "What type of planet is {name}?",
        "Is {name} a rocky planet, a gas giant or an ice giant?",
        "Which type of planet is {name}?",
        "Classify the planet {name}.",
    ),
    ("elements", "symbol", False): (
        "What is the chemical symbol for {name}?",
        "What is the symbol of the element {name}?",
        "What's the symbol for {name}?",
        "Which symbol does {name} have?",
    ),
    ("elements", "symbol", True): (
        "Which element has the symbol {value}?",
        "What element does the symbol {value} stand for?",
        "The symbol {value} stands for which element?",
        "Which element is {value}?",
    ),
    ("elements", "number", False): (
        "What is the atomic number of {name}?",
        "How many protons does an atom of {name} have?",
        "What's the atomic number of {name}?",
        "Which atomic number does {name} have?",
    ),
    ("elements", "number", True): (
        "Which element has atomic number {value}?",
        "What element is number {value} on the periodic table?",
        "The element with atomic number {value} is?",
        "Name element number {value}.",
    ),
}


def facts_problem(rng: random.Random, spec: tuple[str, str, bool] | None = None) -> Problem:
    table, attribute, reverse = spec or rng.choice(tuple(FACT_TEMPLATES))
    row = rng.choice(load_facts()[table])
    template = rng.choice(FACT_TEMPLATES[(table, attribute, reverse)])
    if reverse:
        value = row[attribute]
        shown = _ordinal(value) if attribute == "order" else value
        meta = {"table": table, "attribute": attribute, "value": value}
        return Problem(template.format(value=shown), row["name"], meta)
    question = template.format(name=_the(row["name"]) if table == "countries" else row["name"])
    return Problem(question, str(row[attribute]), {"table": table, "attribute": attribute, "name": row["name"]})


CASUAL_PROBABILITY = 0.35  # a share of single questions typed the way people type them
CASUAL_OPENERS = ("Hey, ", "Hi! ", "Quick question: ", "Please help: ", "Question: ", "Ok, ")
CASUAL_CLOSERS = (" Thanks!", " Thank you.", " Please.")


def _casual(rng: random.Random, question: str) -> str:
    """`question` as people type it: maybe a small first letter, no end punctuation, a greeting or thanks. The
    words that carry the task stay, so the answer does not change."""
    if rng.random() >= CASUAL_PROBABILITY:
        return question
    if rng.random() < 0.5:
        question = question[:1].lower() + question[1:]
    if rng.random() < 0.5 and question[-1:] in (".", "?"):
        question = question[:-1]
    if rng.random() < 0.25:
        question = rng.choice(CASUAL_OPENERS) + question
    if rng.random() < 0.15:
        question += rng.choice(CASUAL_CLOSERS)
    return question


def _single_turn(problem_fn: Callable[[random.Random], Problem]) -> Callable[[random.Random], Draft]:
    def make(rng: random.Random) -> Draft:
        problem = problem_fn(rng)
        question = _casual(rng, problem.question)
        messages = _with_neutral_system(rng, [_user(question), _assistant(problem.answer)])
        return Draft(messages=messages, meta=problem.meta)

    return make


# --------------------------------------------------------------------------------------------------
# Small talk
# --------------------------------------------------------------------------------------------------

CHAT_PROMPTS = {
    "greeting": ("Hi", "Hello", "Hey", "Hi there", "Hello there", "Good morning", "Good evening", "Hey there"),
    "name": (
        "What is your name?",
        "What's your name?",
        "Who are you?",
        "Tell me your name.",
        "What should I call you?",
    ),
    "how_are_you": ("How are you?", "How are you doing?", "How's it going?"),
    "capabilities": ("What can you do?", "What can you help me with?", "What are you good at?", "How can you help me?"),
    "creator": ("Who made you?", "Who created you?", "Who trained you?"),
    "thanks": ("Thanks", "Thank you", "Thanks a lot", "Thank you very much"),
    "goodbye": ("Bye", "Goodbye", "See you later", "Good night"),
    "joke": ("Tell me a joke.", "Do you know a joke?", "Make me laugh."),
    "out_of_scope": (
        "Write me a novel.",
        "Write a long essay about history.",
        "Plan my whole wedding.",
        "Write a full web browser for me.",
    ),
}
CHAT_REPLIES = {
    "greeting": "Hello! How can I help you today?",
    "name": f"I am {PERSONA_NAME}, a small assistant that runs on your computer.",
    "how_are_you": "I'm doing well, thank you! How can I help you?",
    "capabilities": (
        "I can do arithmetic, sort, reverse and count lists, change text and JSON, convert units, "
        "answer simple facts and call tools."
    ),
    "creator": f"I am {PERSONA_NAME}, a small DiffusionGemma model trained by the dgemma project.",
    "thanks": "You're welcome!",
    "goodbye": "Goodbye! Have a nice day.",
    "joke": "Why did the computer go to the doctor? Because it had a virus!",
    "out_of_scope": (
        "Sorry, I am a small model. I can help with short tasks like arithmetic, lists, text, units, facts and tools."
    ),
}
_SOCIAL_INTENTS = ("greeting", "thanks", "goodbye")  # bare phrases: vary their punctuation
_QUESTION_INTENTS_WITH_HELLO = ("name", "how_are_you", "capabilities", "creator", "joke")


def _chat_prompt(rng: random.Random, intent: str) -> str:
    text = rng.choice(CHAT_PROMPTS[intent])
    if intent in _SOCIAL_INTENTS:
        text += rng.choice(("", "!", "."))
    elif intent in _QUESTION_INTENTS_WITH_HELLO and rng.random() < 0.3:
        text = rng.choice(("Hi! ", "Hello, ", "Hey, ")) + text[0].lower() + text[1:]
    return text.lower() if rng.random() < 0.2 else text


def is_plain_chat_prompt(example: Example) -> bool:
    """A bare listed phrasing with no system prompt (chat keeps these in training; only variants are held out)."""
    prompt = example.prompt_messages
    return len(prompt) == 1 and prompt[0]["content"] in CHAT_PROMPTS[example.meta["intent"]]


def chat_draft(rng: random.Random) -> Draft:
    intent = rng.choice(tuple(CHAT_PROMPTS))
    messages = _with_neutral_system(rng, [_user(_chat_prompt(rng, intent)), _assistant(CHAT_REPLIES[intent])])
    return Draft(messages=messages, meta={"intent": intent})


# --------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOL_SPECS = {
    "get_weather": _tool(
        "get_weather",
        "Get the current weather in a city.",
        {
            "city": {"type": "string", "description": "The city name, e.g. Paris."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Defaults to celsius."},
        },
        ["city"],
    ),
    "convert_currency": _tool(
        "convert_currency",
        "Convert an amount of money from one currency to another at today's rate.",
        {
            "amount": {"type": "number", "description": "The amount to convert."},
            "from": {"type": "string", "description": "ISO code of the source currency, e.g. USD."},
            "to": {"type": "string", "description": "ISO code of the target currency, e.g. EUR."},
        },
        ["amount", "from", "to"],
    ),
    "lookup_fact": _tool(
        "lookup_fact",
        "Look up a fact about a country or a chemical element.",
        {
            "entity": {"type": "string", "description": "The country or element, e.g. Japan or Iron."},
            "attribute": {"type": "string", "enum": ["capital", "continent", "symbol", "atomic_number"]},
        },
        ["entity", "attribute"],
    ),
    "calculator": _tool(
        "calculator",
        "Evaluate an arithmetic expression exactly.",
        {"expression": {"type": "string", "description": "An expression such as 12 * 7."}},
        ["expression"],
    ),
    "get_time": _tool(
        "get_time",
        "Get the current local time in a city.",
        {"city": {"type": "string", "description": "The city name, e.g. Tokyo."}},
        ["city"],
    ),
}
WEATHER_CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy")
# Policy the model learns: if a declared tool can answer the question, call it, even for easy questions.
TOOL_QUESTIONS = {
    "weather": (
        "What's the weather like in {city}?",
        "How is the weather in {city} today?",
        "Is it sunny in {city} right now?",
        "Tell me the current weather in {city}.",
    ),
    "weather_unit": ("What's the temperature in {city} in {Unit}?", "How warm is it in {city}? Give me {Unit}."),
    "currency": (
        "Convert {amount} {src} to {dst}.",
        "How much is {amount} {src} in {dst}?",
        "What is {amount} {src} worth in {dst}?",
        "I have {amount} {src}. How many {dst} is that?",
    ),
    "capital": ("Look up the capital of {entity}.", "What is the capital of {entity}?"),
    "continent": ("Look up the continent of {entity}.", "Which continent is {entity} in?"),
    "symbol": ("Look up the chemical symbol of {entity}.", "What is the symbol of {entity}?"),
    "atomic_number": ("Look up the atomic number of {entity}.", "What is the atomic number of {entity}?"),
    "calculator": ("What is {expr}?", "Use the calculator to compute {expr}.", "Calculate {expr}."),
    "time": ("What time is it in {city}?", "What's the current time in {city}?", "Tell me the local time in {city}."),
}


def _declared_tools(rng: random.Random, needed: str | None) -> list[dict]:
    others = [name for name in TOOL_SPECS if name != needed]
    names = rng.sample(others, rng.randint(0 if needed else 1, 3)) + ([needed] if needed else [])
    rng.shuffle(names)
    return [copy.deepcopy(TOOL_SPECS[name]) for name in names]


def _tool_request(rng: random.Random) -> tuple[str, str, dict]:
    """A question that one tool answers: (question, tool name, exact arguments)."""
    kind = rng.choice(("weather", "currency", "fact", "calculator", "time"))
    if kind == "weather":
        city = rng.choice(CITIES)
        if rng.random() < 0.3:
            unit = rng.choice(("celsius", "fahrenheit"))
            question = rng.choice(TOOL_QUESTIONS["weather_unit"]).format(city=city, Unit=unit.capitalize())
            return question, "get_weather", {"city": city, "unit": unit}
        return rng.choice(TOOL_QUESTIONS["weather"]).format(city=city), "get_weather", {"city": city}
    if kind == "currency":
        amount = rng.choice((rng.randint(1, 100), rng.randint(1, 20) * 50))
        src, dst = rng.sample(CURRENCIES, 2)
        question = rng.choice(TOOL_QUESTIONS["currency"]).format(amount=amount, src=src, dst=dst)
        return question, "convert_currency", {"amount": amount, "from": src, "to": dst}
    if kind == "fact":
        attribute = rng.choice(("capital", "continent", "symbol", "atomic_number"))
        table = "countries" if attribute in ("capital", "continent") else "elements"
        entity = rng.choice(load_facts()[table])["name"]
        shown = _the(entity) if table == "countries" else entity
        question = rng.choice(TOOL_QUESTIONS[attribute]).format(entity=shown)
        return question, "lookup_fact", {"entity": entity, "attribute": attribute}
    if kind == "calculator":
        # The tool does the arithmetic, so operands may be larger than the model could multiply itself.
        op = rng.choice("+-*/")
        a, b = _number(rng, 4), _number(rng, 3)
        if op == "/":
            b = max(b, 1)
            a = b * rng.randint(1, 99)  # exact division only: results stay integers
        expression = f"{a} {op} {b}"
        question = rng.choice(TOOL_QUESTIONS["calculator"]).format(expr=expression)
        return question, "calculator", {"expression": expression}
    city = rng.choice(CITIES)
    return rng.choice(TOOL_QUESTIONS["time"]).format(city=city), "get_time", {"city": city}


def _tool_call_message(name: str, arguments: dict) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def tool_call_draft(rng: random.Random) -> Draft:
    # One in ten: tools are declared but the user only makes small talk, so the model learns not to force a call.
    if rng.random() < 0.1:
        intent = rng.choice(_SOCIAL_INTENTS + ("name",))
        messages = [_user(_chat_prompt(rng, intent)), _assistant(CHAT_REPLIES[intent])]
        return Draft(messages=messages, meta={"name": None, "intent": intent}, tools=_declared_tools(rng, None))
    question, name, arguments = _tool_request(rng)
    messages = _with_neutral_system(rng, [_user(question), _tool_call_message(name, arguments)])
    return Draft(messages=messages, meta={"name": name, "arguments": arguments}, tools=_declared_tools(rng, name))


def _calculate(expression: str) -> int:
    a, op, b = expression.split(" ")
    x, y = int(a), int(b)
    if op == "/":
        return x // y  # the generator only writes exact divisions
    return {"+": x + y, "-": x - y, "*": x * y}[op]


def _tool_response(rng: random.Random, name: str, arguments: dict) -> tuple[dict, str]:
    """What the tool returns (random where the world would be) and the answer that reports it."""
    if name == "get_weather":
        unit = arguments.get("unit", "celsius")
        temperature = rng.randint(-10, 35) if unit == "celsius" else rng.randint(14, 95)
        condition = rng.choice(WEATHER_CONDITIONS)
        response = {"city": arguments["city"], "temperature": temperature, "unit": unit, "condition": condition}
        return response, f"It is {temperature}°{unit[0].upper()} and {condition} in {arguments['city']}."
    if name == "convert_currency":
        result = round(arguments["amount"] * rng.uniform(0.2, 5.0), 2)
        response = {"amount": arguments["amount"], "from": arguments["from"], "to": arguments["to"], "result": result}
        # The answer copies the number exactly as the JSON shows it.
        return response, f"{arguments['amount']} {arguments['from']} is {json.dumps(result)} {arguments['to']}."
    if name == "lookup_fact":
        column = "number" if arguments["attribute"] == "atomic_number" else arguments["attribute"]
        table = "countries" if column in ("capital", "continent") else "elements"
        value = next(r[column] for r in load_facts()[table] if r["name"] == arguments["entity"])
        return {"entity": arguments["entity"], "attribute": arguments["attribute"], "value": value}, str(value)
    if name == "calculator":
        result = _calculate(arguments["expression"])
        return {"result": result}, str(result)
    time = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return {"city": arguments["city"], "time": time}, f"It is {time} in {arguments['city']}."


def tool_answer_draft(rng: random.Random) -> Draft:
    question, name, arguments = _tool_request(rng)
    response, answer = _tool_response(rng, name, arguments)
    messages = _with_neutral_system(
        rng,
        [
            _user(question),
            _tool_call_message(name, arguments),
            {"role": "tool", "name": name, "content": json.dumps(response, ensure_ascii=False)},
            _assistant(answer),
        ],
    )
    meta = {"name": name, "arguments": arguments, "response": response}
    return Draft(messages=messages, meta=meta, tools=_declared_tools(rng, name))


# --------------------------------------------------------------------------------------------------
# System prompts that change the answer's form
# --------------------------------------------------------------------------------------------------

FORMAT_PROMPTS = {
    "uppercase": ("Answer in uppercase.", "Always reply in capital letters.", "Write your whole answer in uppercase."),
    "lowercase": ("Answer in lowercase.", "Reply using only lowercase letters."),
    "number_only": ("Answer with only the number.", "Reply with just the number, without units."),
    "json": ('Reply in JSON of the form {"answer": ...}.', 'Always answer with a JSON object with one key, "answer".'),
    "sentence": (
        'Answer with a sentence of the form "The answer is X."',
        'Always start your answer with "The answer is".',
    ),
    "prefix": ('Start every answer with "Answer: ".', 'Begin your reply with "Answer:".'),
}
# Text-valued facts for the case formats (uppercasing a number would change nothing).
_TEXT_FACTS = (
    ("countries", "capital", False),
    ("countries", "capital", True),
    ("countries", "continent", False),
    ("planets", "order", True),
    ("elements", "symbol", True),
    ("elements", "number", True),
)
_FORMAT_BASES: dict[str, tuple[Callable[[random.Random], Problem], ...]] = {
    "uppercase": (lambda rng: facts_problem(rng, rng.choice(_TEXT_FACTS)),),
    "lowercase": (lambda rng: facts_problem(rng, rng.choice(_TEXT_FACTS)),),
    "number_only": (units_problem,),
    "json": (add_problem, sub_problem, mul_problem, units_problem, facts_problem),
    "sentence": (add_problem, sub_problem, mul_problem, units_problem, facts_problem),
    "prefix": (add_problem, sub_problem, mul_problem, units_problem, facts_problem),
}
_BASE_FAMILY = {add_problem: "add", sub_problem: "sub", mul_problem: "mul", units_problem: "units"}


def _formatted(answer: str, form: str) -> str:
    if form == "uppercase":
        return answer.upper()
    if form == "lowercase":
        return answer.lower()
    if form == "number_only":
        return answer.split(" ")[0]
    if form == "json":
        is_integer = answer.lstrip("-").isdigit()
        return json.dumps({"answer": int(answer) if is_integer else answer}, ensure_ascii=False)
    if form == "sentence":
        return f"The answer is {answer}" + ("" if answer.endswith(".") else ".")  # "Washington, D.C." ends in one
    return f"Answer: {answer}"


def system_format_draft(rng: random.Random) -> Draft:
    form = rng.choice(tuple(FORMAT_PROMPTS))
    base_fn = rng.choice(_FORMAT_BASES[form])
    problem = base_fn(rng)
    messages = [
        _system(rng.choice(FORMAT_PROMPTS[form])),
        _user(problem.question),
        _assistant(_formatted(problem.value or problem.answer, form)),
    ]
    meta = {"format": form, "base_family": _BASE_FAMILY.get(base_fn, "facts"), "base": problem.meta}
    return Draft(messages=messages, meta=meta)


# --------------------------------------------------------------------------------------------------
# Multi-turn follow-ups
# --------------------------------------------------------------------------------------------------

ARITH_FOLLOW_UPS = {
    "add": ("Now add {n} to that.", "Add {n} to the result.", "And plus {n}?"),
    "sub": ("Now subtract {n} from that.", "Take {n} away from the result."),
    "mul": ("Now multiply that by {n}.", "Multiply the result by {n}.", "What is that times {n}?"),
    "double": ("Now double it.", "What is twice that?"),
    "half": ("Now halve that.", "What is half of that?"),
}
LIST_FOLLOW_UPS = {
    "reverse": ("Now reverse it.", "Now write it in descending order."),
    "max": ("Which of them is the largest?", "What is the biggest one?"),
    "min": ("Which of them is the smallest?", "What is the smallest one?"),
    "sum": ("What is their sum?", "Now add them all up."),
    "first3": ("Now give me only the first three.", "Keep just the first three numbers."),
}
FACT_FOLLOW_UPS = {
    "continent": ("And which continent is it on?", "Which continent is that country in?"),
    "capital": ("And what is its capital?", "What is the capital of that country?"),
}


def _arith_step(value: int, op: str, n: int) -> int:
    return {"add": value + n, "sub": value - n, "mul": value * n, "double": 2 * value, "half": value // 2}[op]


def _arith_chain(rng: random.Random) -> tuple[list[dict], dict]:
    op = rng.choice(("add", "sub", "mul"))
    a, b = (_number(rng, 2), _number(rng, 2)) if op != "mul" else (_number(rng, 2), rng.randint(2, 9))
    value = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    templates = {"add": ADD_TEMPLATES, "sub": SUB_TEMPLATES, "mul": MUL_TEMPLATES}[op]
    messages = [_user(rng.choice(templates).format(a=a, b=b)), _assistant(str(value))]
    steps = []
    for _ in range(rng.randint(1, 2)):
        choices = ["add", "sub", "mul", "double"] + (["half"] if value % 2 == 0 and value != 0 else [])
        step_op = rng.choice(choices)
        n = {"add": rng.randint(1, 99), "sub": rng.randint(1, 99), "mul": rng.randint(2, 9)}.get(step_op)
        step = {"op": step_op} if n is None else {"op": step_op, "n": n}
        steps.append(step)
        value = _arith_step(value, step_op, n or 0)
        messages += [_user(rng.choice(ARITH_FOLLOW_UPS[step_op]).format(n=n)), _assistant(str(value))]
    return messages, {"chain": "arith", "start": {"op": op, "a": a, "b": b}, "steps": steps}


def _list_chain(rng: random.Random) -> tuple[list[dict], dict]:
    items = _numbers(rng, rng.randint(4, 8))
    first = _sort_problem(rng, items, descending=False)
    ordered = sorted(items)
    step = rng.choice(tuple(LIST_FOLLOW_UPS))
    answer = {
        "reverse": lambda: _join(ordered[::-1]),
        "max": lambda: str(ordered[-1]),
        "min": lambda: str(ordered[0]),
        "sum": lambda: str(sum(ordered)),
        "first3": lambda: _join(ordered[:3]),
    }[step]()
    messages = [
        _user(first.question),
        _assistant(first.answer),
        _user(rng.choice(LIST_FOLLOW_UPS[step])),
        _assistant(answer),
    ]
    return messages, {"chain": "list", "items": items, "steps": [step]}


def _fact_chain(rng: random.Random) -> tuple[list[dict], dict]:
    first, then = rng.choice((("capital", "continent"), ("continent", "capital")))
    first_problem = facts_problem(rng, ("countries", first, False))
    name = first_problem.meta["name"]
    row = next(r for r in load_facts()["countries"] if r["name"] == name)
    messages = [
        _user(first_problem.question),
        _assistant(first_problem.answer),
        _user(rng.choice(FACT_FOLLOW_UPS[then])),
        _assistant(row[then]),
    ]
    return messages, {"chain": "facts", "name": name, "first": first, "then": then}


def multi_turn_draft(rng: random.Random) -> Draft:
    chain = rng.choices((_arith_chain, _list_chain, _fact_chain), weights=(3, 2, 1))[0]
    messages, meta = chain(rng)
    return Draft(messages=_with_neutral_system(rng, messages), meta=meta)


# --------------------------------------------------------------------------------------------------
# Thinking: a short correct reasoning, then the answer
# --------------------------------------------------------------------------------------------------

THINKING_TEMPLATES = {
    "mul_split": ("What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}."),
    "sum_many": ("What is {expr}?", "Compute {expr}.", "Add these up: {expr}"),
    "word_buy": (
        "{name} has {start} {things}. {name} buys {groups} bags with {per} {things} each. "
        "How many {things} does {name} have now?",
        "There are {start} {things} in a box. {name} adds {groups} packs of {per} {things}. "
        "How many {things} are in the box?",
    ),
    "word_give": (
        "{name} has {start} {things} and gives {give} to each of {friends} friends. How many {things} are left?",
        "A basket holds {start} {things}. {friends} children each take {give}. How many {things} remain?",
    ),
    "hours_minutes": (
        "How many minutes are in {hours} hours and {minutes} minutes?",
        "Convert {hours} h {minutes} min to minutes.",
    ),
    "letter_count": ('How many times does the letter "{c}" appear in "{w}"?', "Count the letter {c} in the word {w}."),
}
THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books")


def thinking_draft(rng: random.Random) -> Draft:
    kind = rng.choice(tuple(THINKING_TEMPLATES))
    template = rng.choice(THINKING_TEMPLATES[kind])
    if kind == "mul_split":
        a, tens, ones = rng.randint(11, 999), rng.randint(1, 9), rng.randint(1, 9)
        b = 10 * tens + ones
        x, y = a * tens * 10, a * ones
        question = template.format(a=a, b=b)
        reasoning = (
            f"Split {b} into {tens * 10} and {ones}. {a} * {tens * 10} = {x}. {a} * {ones} = {y}. {x} + {y} = {x + y}."
        )
        answer, meta = str(x + y), {"kind": kind, "a": a, "b": b}
    elif kind == "sum_many":
        items = [_number(rng, 3) for _ in range(rng.randint(3, 5))]
        question = template.format(expr=" + ".join(map(str, items)))
        steps, total = [], items[0]
        for item in items[1:]:
            steps.append(f"{total} + {item} = {total + item}.")
            total += item
        reasoning, answer, meta = " ".join(steps), str(total), {"kind": kind, "items": items}
    elif kind == "word_buy":
        start, groups, per = rng.randint(1, 50), rng.randint(2, 9), rng.randint(2, 12)
        things = rng.choice(THINGS)
        question = template.format(name=rng.choice(NAMES), start=start, things=things, groups=groups, per=per)
        added = groups * per
        reasoning = f"{groups} * {per} = {added}. {start} + {added} = {start + added}."
        answer, meta = str(start + added), {"kind": kind, "start": start, "groups": groups, "per": per}
    elif kind == "word_give":
        friends, give = rng.randint(2, 6), rng.randint(1, 9)
        start = friends * give + rng.randint(0, 40)
        things = rng.choice(THINGS)
        question = template.format(name=rng.choice(NAMES), start=start, things=things, give=give, friends=friends)
        given = friends * give
        reasoning = f"{friends} * {give} = {given}. {start} - {given} = {start - given}."
        answer, meta = str(start - given), {"kind": kind, "start": start, "give": give, "friends": friends}
    elif kind == "hours_minutes":
        hours, minutes = rng.randint(2, 12), rng.randint(1, 59)
        question = template.format(hours=hours, minutes=minutes)
        reasoning = f"{hours} * 60 = {hours * 60}. {hours * 60} + {minutes} = {hours * 60 + minutes}."
        answer, meta = str(hours * 60 + minutes), {"kind": kind, "hours": hours, "minutes": minutes}
    else:
        word = rng.choice([w for w in WORDS if len(w) >= 4])
        letter = rng.choice(word)
        count = word.count(letter)
        question = template.format(c=letter, w=word)
        times = "time" if count == 1 else "times"
        reasoning = f"The letters of {word} are {', '.join(word)}. The letter {letter} appears {count} {times}."
        answer, meta = str(count), {"kind": kind, "word": word, "letter": letter}
    messages = [_user(question), _assistant(answer, reasoning=reasoning)]
    return Draft(messages=messages, meta=meta, enable_thinking=True)


# --------------------------------------------------------------------------------------------------
# Long answers: several 32-64 token canvases
# --------------------------------------------------------------------------------------------------

LONG_TEMPLATES = {
    "count_up": ("Count from 1 to {n}.", "List the numbers from 1 to {n}.", "Write all the numbers from 1 to {n}."),
    "count_down": ("Count down from {n} to 1.", "List the numbers from {n} down to 1."),
    "multiples": ("List the first {n} multiples of {k}.", "Write the first {n} multiples of {k}."),
    "running_sum": ("Add these numbers step by step: {items}", "Add up {items}, showing each step."),
}


def long_draft(rng: random.Random) -> Draft:
    # Sizes are chosen so answers measure roughly 60-150 Gemma tokens (digits are single tokens).
    kind = rng.choice(("sort", *LONG_TEMPLATES))
    if kind == "sort":
        items = [rng.randint(0, 99) for _ in range(rng.randint(22, 30))]
        problem = _sort_problem(rng, items, descending=rng.random() < 0.3)
        question, answer, meta = problem.question, problem.answer, {"kind": kind, **problem.meta}
    elif kind in ("count_up", "count_down"):
        n = rng.randint(25, 40)
        numbers = range(1, n + 1) if kind == "count_up" else range(n, 0, -1)
        question = rng.choice(LONG_TEMPLATES[kind]).format(n=n)
        answer, meta = _join(list(numbers)), {"kind": kind, "n": n}
    elif kind == "multiples":
        k, n = rng.randint(6, 15), rng.randint(20, 25)
        question = rng.choice(LONG_TEMPLATES[kind]).format(n=n, k=k)
        answer, meta = _join([k * i for i in range(1, n + 1)]), {"kind": kind, "k": k, "n": n}
    else:
        items = [rng.randint(10, 99) for _ in range(rng.randint(7, 11))]
        lines, total = [], items[0]
        for item in items[1:]:
            lines.append(f"{total} + {item} = {total + item}")
            total += item
        lines.append(f"Total: {total}")
        question = rng.choice(LONG_TEMPLATES[kind]).format(items=_show_list(rng, items))
        answer, meta = "\n".join(lines), {"kind": kind, "items": items}
    return Draft(messages=_with_neutral_system(rng, [_user(question), _assistant(answer)]), meta=meta)


# --------------------------------------------------------------------------------------------------
# Registry, mixture and splits
# --------------------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("add", _single_turn(add_problem)),
        Family("sub", _single_turn(sub_problem)),
        Family("mul", _single_turn(mul_problem)),
        Family("sort", _single_turn(sort_problem)),
        Family("reverse", _single_turn(reverse_problem)),
        Family("count", _single_turn(count_problem)),
        Family("string_ops", _single_turn(string_ops_problem)),
        Family("list_ops", _single_turn(list_ops_problem)),
        Family("json_reformat", _single_turn(json_reformat_problem)),
        Family("units", _single_turn(units_problem)),
        Family("facts", _single_turn(facts_problem), weight=1.5, holdout_by="text"),
        Family("tool_call", tool_call_draft, holdout_by="text"),
        Family("tool_answer", tool_answer_draft),
        Family("system_format", system_format_draft),
        Family("multi_turn", multi_turn_draft),
        Family("thinking", thinking_draft),
        Family("long", long_draft),
        Family("chat", chat_draft, weight=0.5, holdout_by="text", always_train=is_plain_chat_prompt),
    )
}
MAX_ATTEMPTS_PER_EXAMPLE = 2000  # a family whose held-out bucket is this hard to hit is too small to split


def is_heldout(example: Example) -> bool:
    """Whether the example belongs to the held-out split (see the module docstring for the rule)."""
    family = FAMILIES[example.family]
    if family.always_train is not None and family.always_train(example):
        return False
    key = family.split_key(example)
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return bucket < HELDOUT_PERCENT


def _example_rng(*parts: object) -> random.Random:
    # Hashing (split, seed, index, ...) gives every example its own stream: no overlap between splits or seeds,
    # and example i does not depend on how many examples were asked for.
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _mixture(families: list[str] | None, weights: dict[str, float] | None) -> tuple[list[str], list[float]]:
    names = list(FAMILIES) if families is None else list(families)
    unknown = [name for name in names + list(weights or {}) if name not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    if not names:
        raise ConfigError("families is empty: name at least one task family")
    chosen = [(weights or {}).get(name, FAMILIES[name].weight) for name in names]
    if any(w < 0 for w in chosen) or sum(chosen) <= 0:
        raise ConfigError(f"family weights must be >= 0 with a positive sum, got {dict(zip(names, chosen))}")
    return names, chosen


def _generate(
    split: str, seed: int, n: int, families: list[str] | None, weights: dict[str, float] | None
) -> list[Example]:
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    names, chosen = _mixture(families, weights)
    want_heldout = split == "heldout"
    examples = []
    for index in range(n):
        pick = _example_rng(split, seed, index).choices(names, weights=chosen)[0]
        family = FAMILIES[pick]  # chosen once, so rejection sampling below keeps the mixture
        # The family's name is in its stream, so one-family runs of "add" and "sub" do not share operands.
        rng = _example_rng(split, seed, index, family.name)
        for _ in range(MAX_ATTEMPTS_PER_EXAMPLE):
            example = family.sample(rng)
            if is_heldout(example) == want_heldout:
                examples.append(example)
                break
        else:
            raise RuntimeError(f"family {family.name!r} gave no {split} example in {MAX_ATTEMPTS_PER_EXAMPLE} draws")
    return examples


def generate_examples(
    seed: int, n: int, families: list[str] | None = None, weights: dict[str, float] | None = None
) -> list[Example]:
    """`n` training examples, deterministic for `seed`, mixed by `weights` (default: each family's weight)."""
    return _generate("train", seed, n, families, weights)


def heldout_examples(
    seed: int, n: int, families: list[str] | None = None, weights: dict[str, float] | None = None
) -> list[Example]:
    """`n` evaluation examples whose split keys no training example has, for any training seed."""
    return _generate("heldout", seed, n, families, weights)
