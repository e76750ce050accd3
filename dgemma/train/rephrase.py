"""Wordings the task generator never uses: how answers hold up when a user asks in their own words.

The held-out split gives a model problems it has never seen, but always in one of the generator's few phrasings per
task; a user types "17*23" or "sort 5, 3, 9, 1". `dgemma eval --rephrase` asks each held-out problem of the bar's
families (arithmetic, sorting, reversing, counting, string operations), of the list operations, unit conversions
and facts in one of the wordings below instead. Only the user's question changes: the problem, its meta and therefore
the checker's expected answer stay the same.

None of these templates is one the generator trains on (tests/test_rephrase.py checks it), so the score measures
generalisation to new phrasings, not recall. Keep it that way: a wording moved into training must leave this file.
"""

from __future__ import annotations

import random
from dataclasses import replace

from dgemma.errors import ConfigError
from dgemma.train.tasks import SEPARATORS, Example, _join, _ordinal, _show_list, _the

# family -> templates, or family -> kind -> templates (kind as the generator's meta names it). Terse, lowercase and
# chatty forms on purpose: that is how people type.
UNSEEN: dict[str, tuple[str, ...] | dict] = {
    "add": ("{a}+{b}", "what's {a} plus {b}?", "Add {b} to {a}.", "{a} plus {b}", "Sum of {a} and {b}?"),
    "sub": ("{a}-{b}", "what's {a} minus {b}?", "{a} minus {b}", "Take {b} away from {a}.", "How much is {a} - {b}?"),
    "mul": ("{a}*{b}", "what's {a} times {b}?", "{a} multiplied by {b}", "Multiply {a} and {b}.", "{a} times {b}"),
    "sort": {
        ("numbers", False): ("sort {items}", "Order these from low to high: {items}",
                             "Sort {items} in increasing order."),
        ("numbers", True): ("sort {items} from high to low", "Order these from biggest to smallest: {items}"),
        ("words", False): ("sort {items} alphabetically", "Alphabetical order please: {items}",
                           "Order these words from a to z: {items}"),
        ("words", True): ("Sort {items} from z to a.", "Order these words from z to a: {items}"),
    },
    "reverse": {
        "word": ("reverse {w}", "Write {w} backwards.", "{w} backwards?"),
        "list": ("reverse {items}", "Flip the order of {items}."),
    },
    "count": {
        "occurrences": ("How often does {x} occur in {items}?", "count the {x}s in {items}"),
        "letters": ("Number of letters in {w}?", "Count the letters in {w}."),
        "letter": ("How often does {c} occur in {w}?", 'count the "{c}"s in {w}'),
        "words": ('Word count of "{t}"?', 'How many words does "{t}" have?'),
    },
    "string_ops": {
        "upper": ('"{t}" in uppercase, please.', "Make this uppercase: {t}"),
        "lower": ('"{t}" in lowercase, please.', "Make this lowercase: {t}"),
        "first_letter": ("First letter of {w}?", "{w}: which letter comes first?"),
        "last_letter": ("Last letter of {w}?", "{w}: which letter comes last?"),
        "join": ("Join {items} with {sep_name}.", "Glue {items} together with {sep_name}."),
        "split": ('Break "{t}" into its words.', 'What are the words of "{t}"?'),
        "replace": ('Swap "{old}" for "{new}" in "{t}".', 'Put "{new}" where "{old}" is in "{t}".'),
    },
    "list_ops": {
        "max": ("max of {items}?", "Biggest number in {items}?"),
        "min": ("min of {items}?", "Smallest number in {items}?"),
        "sum": ("Total of {items}?", "Sum up {items}."),
        "length": ("Count the numbers in {items}.", "How long is the list {items}?"),
        "dedupe": ("Drop the duplicates in {items}.", "{items} without repeats?"),
        "range": ("numbers from {a} to {b}?", "Go from {a} to {b}, one number at a time."),
        "range_down": ("count backwards from {a} to {b}", "Go down from {a} to {b}, one number at a time."),
    },
    "units": ("{v} {f} in {t}?", "{v} {f} to {t}", "Express {v} {f} in {t}."),
    "facts": {  # (table, attribute, asks for the name)
        ("countries", "capital", False): ("capital of {name}?", "Tell me the capital city of {name}."),
        ("countries", "capital", True): ("{value} is the capital of what country?",
                                         "Capital city {value}: which country?"),
        ("countries", "continent", False): ("{name} is on which continent?", "continent of {name}?"),
        ("planets", "order", False): ("{name} is which planet from the Sun?",
                                      "Where is {name} in the order of planets?"),
        ("planets", "order", True): ("Name the {value} planet from the Sun.", "{value} planet from the Sun?"),
        ("planets", "type", False): ("What kind of planet is {name}?", "{name}: rocky, gas giant or ice giant?"),
        ("elements", "symbol", False): ("symbol for {name}?", "Give the chemical symbol of {name}."),
        ("elements", "symbol", True): ("{value} is the symbol of which element?", "Element with symbol {value}?"),
        ("elements", "number", False): ("atomic number of {name}?", "What number is {name} on the periodic table?"),
        ("elements", "number", True): ("Element number {value}?", "Which element is number {value}?"),
    },
}
FAMILIES = tuple(UNSEEN)


def _kind(family: str, meta: dict):
    if family == "sort":
        return ("words" if isinstance(meta["items"][0], str) else "numbers", meta["descending"])
    if family == "facts":
        return (meta["table"], meta["attribute"], "value" in meta)
    if family == "list_ops" and meta["op"] == "range":
        return "range_down" if meta["start"] > meta["stop"] else "range"
    if family in ("string_ops", "list_ops"):
        return meta["op"]
    return meta.get("kind")  # reverse and count name their kind; arithmetic has none


def _fields(family: str, meta: dict, rng: random.Random) -> dict:
    """The placeholders of the generator's templates (which these share, so the test can compare them) from meta."""
    if family == "units":
        return {"v": meta["value"], "f": meta["from"], "t": meta["to"]}
    if family == "facts":
        if "value" in meta:
            return {"value": _ordinal(meta["value"]) if meta["attribute"] == "order" else meta["value"]}
        return {"name": _the(meta["name"]) if meta["table"] == "countries" else meta["name"]}
    fields = {"a": meta.get("a", meta.get("start")), "b": meta.get("b", meta.get("stop")), "w": meta.get("word"),
              "x": meta.get("target"), "c": meta.get("letter"), "t": meta.get("text"), "old": meta.get("old"),
              "new": meta.get("new")}
    if "items" in meta:  # sort, reverse, count and list operations show lists with or without brackets
        fields["items"] = _show_list(rng, meta["items"])
    if "words" in meta:  # join
        fields["items"], fields["sep_name"] = _join(meta["words"]), SEPARATORS[meta["sep"]]
    return fields


def question(family: str, meta: dict, rng: random.Random) -> str:
    """A question for the problem described by `meta`, in a wording the generator never uses."""
    if family not in UNSEEN:
        raise ConfigError(f"no unseen wordings for family {family!r}; --rephrase covers {', '.join(FAMILIES)}")
    table = UNSEEN[family]
    template = rng.choice(table if isinstance(table, tuple) else table[_kind(family, meta)])
    return template.format(**_fields(family, meta, rng))


def rephrase(example: Example, rng: random.Random) -> Example:
    """The same single-turn problem with its user question reworded (system prompt and answer unchanged)."""
    *before, user, target = example.messages
    if user.get("role") != "user" or target.get("role") != "assistant":
        raise ConfigError(f"rephrase needs a single-turn example ending in user + assistant, got {example.family!r}")
    reworded = {**user, "content": question(example.family, example.meta, rng)}
    return replace(example, messages=[*before, reworded, target])
