"""An independent checker for `dgemma.train.tasks` examples: recompute each answer from `Example.meta`.

Nothing here calls the generator's answer-building code: a bug there shows up as a disagreement here instead of
being copied into both. What the two share is only the specification of each answer's form (the phrasings listed
below); change both when that changes.

Model output is compared after `normalize`, and must already be the final answer: the caller strips the thinking
channel and parses tool calls (dgemma.chat_format) before checking.
"""

from __future__ import annotations

import json
import operator
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from dgemma.train.tasks import Example

_LIST_SEPARATOR = ", "
# Unit sizes written independently of tasks.UNITS, as integers of the smallest unit of each dimension (mm, g, s,
# mL) so every conversion stays exact.
_UNIT_SIZE = {
    "km": ("length", 1_000_000),
    "m": ("length", 1_000),
    "cm": ("length", 10),
    "mm": ("length", 1),
    "kg": ("mass", 1_000),
    "g": ("mass", 1),
    "h": ("time", 3_600),
    "min": ("time", 60),
    "s": ("time", 1),
    "L": ("volume", 1_000),
    "mL": ("volume", 1),
}
_CHAT_REPLIES = {
    "greeting": "Hello! How can I help you today?",
    "name": "I am dgemma-mini, a small assistant that runs on your computer.",
    "how_are_you": "I'm doing well, thank you! How can I help you?",
    "capabilities": (
        "I can do arithmetic, sort, reverse and count lists, change text and JSON, convert units, "
        "answer simple facts and call tools."
    ),
    "creator": "I am dgemma-mini, a small DiffusionGemma model trained by the dgemma project.",
    "thanks": "You're welcome!",
    "goodbye": "Goodbye! Have a nice day.",
    "joke": "Why did the computer go to the doctor? Because it had a virus!",
    "out_of_scope": (
        "Sorry, I am a small model. I can help with short tasks like arithmetic, lists, text, units, facts and tools."
    ),
}
_EQUATION = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")


def normalize(text: str) -> str:
    """Strip outer whitespace, trailing spaces on each line and one trailing period; keep case and inner text."""
    lines = text.replace("\r\n", "\n").strip().split("\n")
    joined = "\n".join(line.rstrip() for line in lines)
    return joined[:-1].rstrip() if joined.endswith(".") else joined


@lru_cache(maxsize=1)
def _facts() -> dict[str, list[dict]]:
    # Read the file again rather than through tasks.load_facts, so the checker owns its view of the table.
    with resources.files("dgemma").joinpath("assets/facts.json").open(encoding="utf-8") as f:
        return json.load(f)


def _listed(values) -> str:
    return _LIST_SEPARATOR.join(map(str, values))


def _fact_value(table: str, name: str, column: str) -> Any:
    matches = [row[column] for row in _facts()[table] if row["name"] == name]
    if len(matches) != 1:
        raise ValueError(f"facts table {table!r} has {len(matches)} rows named {name!r}")
    return matches[0]


def _fact_name(table: str, column: str, value: Any) -> str:
    matches = [row["name"] for row in _facts()[table] if row[column] == value]
    if len(matches) != 1:
        raise ValueError(f"facts table {table!r} has {len(matches)} rows with {column}={value!r}")
    return matches[0]


# --------------------------------------------------------------------------------------------------
# Expected answers, one function per family (each takes the example's meta)
# --------------------------------------------------------------------------------------------------


def _add(m: dict) -> str:
    return str(operator.add(m["a"], m["b"]))


def _sub(m: dict) -> str:
    return str(operator.sub(m["a"], m["b"]))


def _product(m: dict) -> str:
    return str(operator.mul(m["a"], m["b"]))


def _mul(m: dict) -> str:
    # Work shown when the factor with fewer digits (the second on a tie) has two digits, the last not 0.
    a, b = m["a"], m["b"]
    split, other = (str(b), a) if len(str(b)) <= len(str(a)) else (str(a), b)
    if len(split) != 2 or split[1] == "0":
        return _product(m)
    high, low = other * int(split[0] + "0"), other * int(split[1])
    return f"{a} × {b} = {other} × {split[0]}0 + {other} × {split[1]} = {high} + {low} = {high + low}"


def _sort(m: dict) -> str:
    ordered = sorted(m["items"])
    return _listed(ordered[::-1] if m["descending"] else ordered)


def _reverse(m: dict) -> str:
    if m["kind"] == "word":
        return "".join(reversed(m["word"]))
    return _listed(reversed(m["items"]))


def _count(m: dict) -> str:
    kind = m["kind"]
    if kind == "occurrences":
        return str(sum(1 for item in m["items"] if item == m["target"]))
    if kind == "letters":
        return str(sum(1 for ch in m["word"] if ch.isalpha()))
    if kind == "letter":
        return str(sum(1 for ch in m["word"] if ch == m["letter"]))
    return str(len(m["text"].split()))


def _string_ops(m: dict) -> str:
    op = m["op"]
    if op == "upper":
        return m["text"].upper()
    if op == "lower":
        return m["text"].lower()
    if op == "first_letter":
        return m["word"][:1]
    if op == "last_letter":
        return m["word"][-1:]
    if op == "join":
        return m["sep"].join(m["words"])
    if op == "split":
        return _listed(m["text"].split())
    return re.sub(rf"\b{re.escape(m['old'])}\b", m["new"], m["text"])


def _list_ops(m: dict) -> str:
    op = m["op"]
    if op == "range":
        step = 1 if m["stop"] >= m["start"] else -1  # up or down, as the problem asked
        return _listed(range(m["start"], m["stop"] + step, step))
    items = m["items"]
    if op == "dedupe":
        return _listed(dict.fromkeys(items))  # dicts keep first-insertion order
    if op == "max":
        return str(sorted(items)[-1])
    if op == "min":
        return str(sorted(items)[0])
    if op == "sum":
        total = 0
        for item in items:
            total += item
        return str(total)
    return str(len(items))


def _json_reformat(m: dict) -> str:
    pairs = m["pairs"]
    if m["op"] == "to_json":
        body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in sorted(pairs))
        return "{" + body + "}"
    if m["op"] == "to_lines":
        return "\n".join(f"{k}={v}" for k, v in pairs)
    return str(dict(pairs)[m["key"]])


def _units(m: dict) -> str:
    from_dimension, from_size = _UNIT_SIZE[m["from"]]
    to_dimension, to_size = _UNIT_SIZE[m["to"]]
    if from_dimension != to_dimension:
        raise ValueError(f"cannot convert {m['from']} to {m['to']}")
    quotient, remainder = divmod(m["value"] * from_size, to_size)
    if remainder:
        raise ValueError(f"{m['value']} {m['from']} is not a whole number of {m['to']}")
    return f"{quotient} {m['to']}"


def _facts_answer(m: dict) -> str:
    if "value" in m:  # a reverse question: the attribute is given, the name is asked
        return _fact_name(m["table"], m["attribute"], m["value"])
    return str(_fact_value(m["table"], m["name"], m["attribute"]))


def _tool_answer(m: dict) -> str:
    name, args, r = m["name"], m["arguments"], m["response"]
    if name == "get_weather":
        letter = {"celsius": "C", "fahrenheit": "F"}[r["unit"]]
        return f"It is {r['temperature']}°{letter} and {r['condition']} in {r['city']}."
    if name == "convert_currency":
        return f"{r['amount']} {r['from']} is {json.dumps(r['result'])} {r['to']}."
    if name == "get_time":
        return f"It is {r['time']} in {r['city']}."
    if name in ("lookup_fact", "calculator"):
        return str(r["value"] if name == "lookup_fact" else r["result"])
    raise ValueError(f"unknown tool {name!r} (arguments {args})")


def _tool_call_answer(m: dict) -> str:
    # Only reached when no call is expected: small talk with tools declared.
    return _CHAT_REPLIES[m["intent"]]


def _system_format(m: dict) -> str:
    base = _RESULTS[m["base_family"]](m["base"])
    form = m["format"]
    if form == "uppercase":
        return base.upper()
    if form == "lowercase":
        return base.lower()
    if form == "number_only":
        return re.match(r"-?\d+", base).group(0)
    if form == "json":
        value: Any = int(base) if re.fullmatch(r"-?\d+", base) else base
        return json.dumps({"answer": value}, ensure_ascii=False)
    if form == "sentence":
        return "The answer is " + base.removesuffix(".") + "."
    if form == "prefix":
        return "Answer: " + base
    raise ValueError(f"unknown format {form!r}")


def _arith_value(start: dict, steps: list[dict]) -> int:
    value = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[start["op"]](start["a"], start["b"])
    for step in steps:
        op = step["op"]
        if op == "double":
            value *= 2
        elif op == "half":
            if value % 2:
                raise ValueError(f"half of odd {value}")
            value //= 2
        else:
            value = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[op](value, step["n"])
    return value


def _multi_turn(m: dict) -> str:
    if m["chain"] == "arith":
        return str(_arith_value(m["start"], m["steps"]))
    if m["chain"] == "list":
        ascending = sorted(m["items"])
        step = m["steps"][-1]
        if step == "reverse":
            return _listed(sorted(m["items"], reverse=True))
        if step == "first3":
            return _listed(ascending[:3])
        return str({"max": max, "min": min, "sum": sum}[step](ascending))
    return str(_fact_value("countries", m["name"], m["then"]))


def _thinking(m: dict) -> str:
    kind = m["kind"]
    if kind == "mul_split":
        return str(m["a"] * m["b"])
    if kind == "sum_many":
        return str(sum(m["items"]))
    if kind == "word_buy":
        return str(m["start"] + m["groups"] * m["per"])
    if kind == "word_give":
        return str(m["start"] - m["give"] * m["friends"])
    if kind == "hours_minutes":
        return str(60 * m["hours"] + m["minutes"])
    return str(len(re.findall(re.escape(m["letter"]), m["word"])))


def _long(m: dict) -> str:
    kind = m["kind"]
    if kind == "sort":
        return _sort(m)
    if kind == "count_up":
        return _listed(range(1, m["n"] + 1))
    if kind == "count_down":
        return _listed(range(m["n"], 0, -1))
    if kind == "multiples":
        return _listed(range(m["k"], m["k"] * m["n"] + 1, m["k"]))
    lines, running = [], 0
    for i, item in enumerate(m["items"]):
        if i:
            lines.append(f"{running} + {item} = {running + item}")
        running += item
    return "\n".join([*lines, f"Total: {running}"])


def _chat(m: dict) -> str:
    return _CHAT_REPLIES[m["intent"]]


_ANSWERS = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
    "string_ops": _string_ops,
    "list_ops": _list_ops,
    "json_reformat": _json_reformat,
    "units": _units,
    "facts": _facts_answer,
    "tool_call": _tool_call_answer,
    "tool_answer": _tool_answer,
    "system_format": _system_format,
    "multi_turn": _multi_turn,
    "thinking": _thinking,
    "long": _long,
    "chat": _chat,
}

# What a format prompt wraps: the bare result, where a family's answer shows its work.
_RESULTS = {**_ANSWERS, "mul": _product}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def expects_tool_call(example: Example) -> bool:
    """Whether the correct response is a tool call, judged from meta alone."""
    return example.family == "tool_call" and example.meta.get("name") is not None


def expected_tool_call(example: Example) -> tuple[str, dict]:
    """The one correct call (tool name, arguments) for a tool-call target."""
    if not expects_tool_call(example):
        raise ValueError(f"{example.family} example expects a text answer, not a tool call")
    return example.meta["name"], dict(example.meta["arguments"])


def expected_answer(example: Example) -> str:
    """The correct final text; for a tool-call target, the call as JSON {"arguments": ..., "name": ...}."""
    if expects_tool_call(example):
        name, arguments = expected_tool_call(example)
        return json.dumps({"name": name, "arguments": arguments}, sort_keys=True, ensure_ascii=False)
    if example.family not in _ANSWERS:
        raise ValueError(f"no checker for family {example.family!r}")
    return _ANSWERS[example.family](example.meta)


def check(example: Example, output_text: str) -> bool:
    """Whether `output_text` (the final answer, thinking removed) matches the expected answer after normalize."""
    if expects_tool_call(example):
        raise ValueError("this example's target is a tool call: use check_tool_call")
    return normalize(output_text) == normalize(expected_answer(example))


def _same_value(expected: Any, actual: Any, key: str) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    if isinstance(expected, (int, float)):
        if isinstance(actual, str):  # a parser may hand numbers back as text
            try:
                actual = float(actual)
            except ValueError:
                return False
        return isinstance(actual, (int, float)) and float(actual) == float(expected)
    if isinstance(expected, str) and isinstance(actual, str):
        if key == "expression":  # "12*7" and "12 * 7" are the same expression
            return re.sub(r"\s+", "", expected) == re.sub(r"\s+", "", actual)
        return " ".join(expected.split()) == " ".join(actual.split())
    return expected == actual


def check_tool_call(example: Example, calls: list[tuple[str, dict]]) -> bool:
    """Whether `calls` is exactly the expected call: same tool name, same argument keys, equal values.

    Numbers compare as numbers (50 == 50.0 == "50"); strings compare with whitespace runs collapsed, and a
    calculator expression ignores whitespace entirely. For small talk with tools declared, no call is correct.
    """
    if not expects_tool_call(example):
        return len(calls) == 0
    if len(calls) != 1:
        return False
    name, arguments = calls[0]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return False
    expected_name, expected_arguments = expected_tool_call(example)
    if name != expected_name or not isinstance(arguments, dict) or set(arguments) != set(expected_arguments):
        return False
    return all(_same_value(expected_arguments[k], arguments[k], k) for k in expected_arguments)


def reasoning_is_sound(text: str) -> bool:
    """Whether every 'a op b = c' equation written in `text` is true (for thinking and step-by-step answers)."""
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    return all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in _EQUATION.findall(text))
