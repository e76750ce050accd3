"""Specifications for the synthetic training data (dgemma.train.tasks) and its independent checker."""

from __future__ import annotations

import json
import math
import re

import pytest

from dgemma.errors import ConfigError
from dgemma.train import checker, tasks
from dgemma.train.tasks import FAMILIES, Example, generate_examples, heldout_examples, prompt_key

SAMPLES_PER_FAMILY = 200
EXPECTED_FAMILIES = {
    "add", "sub", "mul", "sort", "reverse", "count", "string_ops", "list_ops", "json_reformat", "units", "facts",
    "tool_call", "tool_answer", "system_format", "multi_turn", "thinking", "long", "chat",
}  # fmt: skip


@pytest.fixture(scope="module")
def by_family() -> dict[str, list[Example]]:
    return {name: generate_examples(seed=11, n=SAMPLES_PER_FAMILY, families=[name]) for name in FAMILIES}


def _all(by_family: dict[str, list[Example]]) -> list[Example]:
    return [example for examples in by_family.values() for example in examples]


def _rough_tokens(text: str) -> int:
    # Gemma tokenizes every digit separately; words and punctuation count about one token each.
    return len(re.findall(r"\d|[A-Za-z]+|[^\sA-Za-z\d]", text))


def _target_call(example: Example) -> tuple[str, dict]:
    function = example.target["tool_calls"][0]["function"]
    return function["name"], function["arguments"]


def _perturb(text: str) -> str:
    """Change the last letter or digit: the smallest edit that makes an answer wrong."""
    for i in range(len(text) - 1, -1, -1):
        ch = text[i]
        if ch.isdigit():
            return text[:i] + str((int(ch) + 1) % 10) + text[i + 1 :]
        if ch.isalpha() and ch.isascii():
            base = "a" if ch.islower() else "A"
            return text[:i] + chr((ord(ch) - ord(base) + 1) % 26 + ord(base)) + text[i + 1 :]
    return text + "x"


# --- registry and determinism ---------------------------------------------------------------------


def test_registry_has_every_family_under_its_own_name():
    assert set(FAMILIES) == EXPECTED_FAMILIES
    assert all(family.name == name for name, family in FAMILIES.items())


def test_same_seed_gives_identical_examples():
    assert generate_examples(3, 300) == generate_examples(3, 300)
    assert heldout_examples(3, 100) == heldout_examples(3, 100)


def test_different_seeds_give_different_examples():
    first, second = generate_examples(3, 300), generate_examples(4, 300)
    assert sum(a == b for a, b in zip(first, second)) < 30  # only tiny problem spaces (chat) may coincide


def test_a_longer_run_extends_a_shorter_one():
    assert generate_examples(5, 300)[:100] == generate_examples(5, 100)


def test_generated_examples_are_independent_objects():
    first = generate_examples(6, 50, families=["tool_call"])
    first[0].tools.append({"mutated": True})
    assert generate_examples(6, 50, families=["tool_call"])[0].tools[-1] != {"mutated": True}


def test_weights_choose_the_mixture():
    only_add = generate_examples(1, 100, weights={name: 0.0 for name in FAMILIES if name != "add"})
    assert {example.family for example in only_add} == {"add"}
    subset = generate_examples(1, 200, families=["sort", "units"])
    assert {example.family for example in subset} == {"sort", "units"}


def test_unknown_family_or_bad_weights_are_config_errors():
    with pytest.raises(ConfigError, match="nonsense"):
        generate_examples(0, 10, families=["add", "nonsense"])
    with pytest.raises(ConfigError, match="weights"):
        generate_examples(0, 10, families=["add"], weights={"add": 0.0})
    with pytest.raises(ConfigError, match="n must be"):
        heldout_examples(0, -1)


# --- well-formed conversations --------------------------------------------------------------------


def _assert_well_formed(example: Example) -> None:
    messages = example.messages
    roles = [m["role"] for m in messages]
    assert set(roles) <= {"system", "user", "assistant", "tool"}
    assert all(isinstance(m["content"], str) for m in messages)
    if roles[0] == "system":
        roles = roles[1:]
    assert "system" not in roles, "a system prompt may only come first"
    assert roles[0] == "user" and roles[-1] == "assistant"
    declared = {tool["function"]["name"]: tool["function"] for tool in example.tools or []}
    pending_calls: list[str] = []
    for previous, message in zip(messages, messages[1:]):
        if message["role"] == "tool":
            assert pending_calls, "a tool reply answers a call"
            assert message["name"] == pending_calls.pop(0)
            json.loads(message["content"])
        elif previous["role"] == "tool":
            assert message["role"] == "assistant" and not pending_calls
        elif previous["role"] == "assistant":
            assert message["role"] == "tool" if previous.get("tool_calls") else message["role"] == "user"
        elif previous["role"] == "user":
            assert message["role"] == "assistant"
        if message["role"] == "assistant" and message.get("tool_calls"):
            assert message["content"] == ""
            for call in message["tool_calls"]:
                assert call["type"] == "function"
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                assert name in declared, "a call names a declared tool"
                schema = declared[name]["parameters"]
                assert isinstance(arguments, dict) and set(arguments) <= set(schema["properties"])
                assert set(schema["required"]) <= set(arguments)
                for key, value in arguments.items():
                    allowed = schema["properties"][key].get("enum")
                    assert allowed is None or value in allowed
                pending_calls.append(name)
    assert example.answer == example.target["content"]
    assert ("reasoning_content" in example.target) == example.enable_thinking
    assert "reasoning_content" not in example.answer
    json.dumps(example.messages), json.dumps(example.tools), json.dumps(example.meta)  # plain JSON data throughout


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_every_family_writes_well_formed_conversations(by_family, name):
    for example in by_family[name]:
        assert example.family == name
        _assert_well_formed(example)


def test_tool_families_make_both_kinds_of_target(by_family):
    assert all(e.expects_tool_call or e.meta["name"] is None for e in by_family["tool_call"])
    assert any(e.expects_tool_call for e in by_family["tool_call"])
    assert all(not e.expects_tool_call and e.prompt_messages[-1]["role"] == "tool" for e in by_family["tool_answer"])
    assert all(e.tools for e in by_family["tool_call"] + by_family["tool_answer"])
    assert any(len(e.tools) > 1 for e in by_family["tool_call"]), "several tools are declared at once"


def test_system_prompts_and_thinking_appear_where_they_should(by_family):
    assert all(e.messages[0]["role"] == "system" for e in by_family["system_format"])
    assert all(e.enable_thinking and e.target["reasoning_content"] for e in by_family["thinking"])
    assert not any(e.enable_thinking for name, es in by_family.items() if name != "thinking" for e in es)
    assert all(sum(m["role"] == "user" for m in e.messages) >= 2 for e in by_family["multi_turn"])


def test_identical_prompts_always_have_identical_targets():
    targets: dict[str, dict] = {}
    for example in generate_examples(8, 4000):
        assert targets.setdefault(prompt_key(example), example.target) == example.target


# --- the independent checker ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_checker_accepts_every_generated_answer(by_family, name):
    for example in by_family[name]:
        assert checker.expects_tool_call(example) == example.expects_tool_call
        if example.expects_tool_call:
            assert checker.check_tool_call(example, [_target_call(example)]), example.meta
        else:
            assert checker.check(example, example.answer), (example.meta, example.answer)
            assert checker.expected_answer(example) == example.answer


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILIES))
def test_checker_rejects_perturbed_answers(by_family, name):
    for example in by_family[name]:
        if example.expects_tool_call:
            call_name, arguments = _target_call(example)
            key = sorted(arguments)[0]
            value = arguments[key]
            wrong_value = value + 1 if isinstance(value, int) else _perturb(value)
            assert not checker.check_tool_call(example, [(call_name, {**arguments, key: wrong_value})])
            assert not checker.check_tool_call(example, [(call_name, {**arguments, "extra": 1})])
            other = next(t["function"]["name"] for t in tasks.TOOL_SPECS.values() if t["function"]["name"] != call_name)
            assert not checker.check_tool_call(example, [(other, arguments)])
            assert not checker.check_tool_call(example, [])
            assert not checker.check_tool_call(example, [(call_name, arguments)] * 2)
        else:
            assert not checker.check(example, _perturb(example.answer)), example.answer
            assert not checker.check(example, example.answer + " 1")
            assert not checker.check(example, "")


def test_checker_recomputes_from_meta_instead_of_trusting_the_answer():
    example = generate_examples(0, 1, families=["add"])[0]
    example.meta = {**example.meta, "a": example.meta["a"] + 1}
    assert not checker.check(example, example.answer)


def test_normalize_strips_outer_space_line_ends_and_one_final_period():
    assert checker.normalize("  42.\n") == "42"
    assert checker.normalize("a=1  \r\nb=2\n") == "a=1\nb=2"
    assert checker.normalize("Paris") == checker.normalize("Paris.")
    assert checker.normalize("PARIS") != checker.normalize("Paris"), "case is part of the answer"


def test_tool_call_numbers_compare_as_numbers_and_expressions_ignore_spaces():
    calls = [e for e in generate_examples(2, 400, families=["tool_call"]) if e.expects_tool_call]
    currency = next(e for e in calls if e.meta["name"] == "convert_currency")
    arguments = dict(currency.meta["arguments"])
    as_float = {**arguments, "amount": float(arguments["amount"])}
    assert checker.check_tool_call(currency, [("convert_currency", as_float)])
    assert checker.check_tool_call(currency, [("convert_currency", json.dumps(arguments))])
    calculator = next(e for e in calls if e.meta["name"] == "calculator")
    expression = calculator.meta["arguments"]["expression"]
    assert checker.check_tool_call(calculator, [("calculator", {"expression": expression.replace(" ", "")})])


def test_tool_call_check_refuses_text_and_text_check_refuses_calls():
    example = next(e for e in generate_examples(2, 50, families=["tool_call"]) if e.expects_tool_call)
    with pytest.raises(ValueError, match="check_tool_call"):
        checker.check(example, "anything")
    small_talk = next(e for e in generate_examples(2, 400, families=["tool_call"]) if not e.expects_tool_call)
    assert checker.check_tool_call(small_talk, []) and checker.check(small_talk, small_talk.answer)


def test_reasoning_and_step_by_step_equations_are_true(by_family):
    for example in by_family["thinking"]:
        assert checker.reasoning_is_sound(example.target["reasoning_content"])
        if example.meta["kind"] != "letter_count":
            last_result = re.findall(r"= (-?\d+)", example.target["reasoning_content"])[-1]
            assert last_result == example.answer, "the reasoning ends at the answer"
    for example in by_family["long"]:
        assert checker.reasoning_is_sound(example.answer)
    assert not checker.reasoning_is_sound("12 + 30 = 43.")


def test_products_by_two_digit_factors_show_true_work_and_others_are_bare(by_family):
    worked = 0
    for example in by_family["mul"]:
        a, b = example.meta["a"], example.meta["b"]
        shorter = str(b) if len(str(b)) <= len(str(a)) else str(a)
        sides = example.answer.split(" = ")
        assert sides[-1] == str(a * b)
        if len(shorter) == 2 and shorter[1] != "0":
            worked += 1
            assert sides[0] == f"{a} × {b}" and len(sides) == 4
            values = {sum(math.prod(map(int, term.split(" × "))) for term in side.split(" + ")) for side in sides}
            assert values == {a * b}, "every step of the work is true"
            assert sides[1].endswith(f"× {shorter[1]}"), "the two-digit factor splits into tens and ones"
        else:
            assert sides == [str(a * b)]
    assert worked >= len(by_family["mul"]) // 4
    products = [e for e in by_family["system_format"] if e.meta["base_family"] == "mul"]
    assert products and all("×" not in e.answer for e in products), "a requested format carries the result only"


def test_multi_turn_earlier_answers_are_right_too(by_family):
    for example in by_family["multi_turn"]:
        if example.meta["chain"] != "arith":
            continue
        answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
        for depth, answer in enumerate(answers):
            partial = {**example.meta, "steps": example.meta["steps"][:depth]}
            truncated = Example("multi_turn", example.messages, None, False, answer, partial)
            assert checker.check(truncated, answer)


# --- held-out split -------------------------------------------------------------------------------


def test_heldout_and_training_prompts_never_overlap():
    train = generate_examples(0, 1000)
    heldout = heldout_examples(0, 1000)
    assert not any(tasks.is_heldout(e) for e in train)
    assert all(tasks.is_heldout(e) for e in heldout)
    assert not {prompt_key(e) for e in train} & {prompt_key(e) for e in heldout}
    assert {e.family for e in heldout} == EXPECTED_FAMILIES


def test_plain_small_talk_prompts_are_always_training_data():
    heldout_chat = heldout_examples(2, 200, families=["chat"])
    assert not any(tasks.is_plain_chat_prompt(e) for e in heldout_chat)
    assert any(tasks.is_plain_chat_prompt(e) for e in generate_examples(2, 200, families=["chat"]))


def test_heldout_problems_are_unseen_problems_for_generalisation_families():
    train_problems = {(e.family, json.dumps(e.meta, sort_keys=True)) for e in generate_examples(1, 1000)}
    for example in heldout_examples(1, 1000):
        if FAMILIES[example.family].holdout_by == "problem":
            assert (example.family, json.dumps(example.meta, sort_keys=True)) not in train_problems


# --- facts table and long answers -----------------------------------------------------------------


def test_facts_table_is_well_formed():
    facts = tasks.load_facts()
    assert set(facts) == {"countries", "planets", "elements"}
    assert 40 <= sum(len(rows) for rows in facts.values()) <= 80
    for table, rows in facts.items():
        assert len({frozenset(row) for row in rows}) == 1, f"{table}: every row has the same columns"
        assert len({row["name"] for row in rows}) == len(rows), f"{table}: names are unique"
    # Reverse questions ask for the name from these columns, so they must be unique too.
    unique_columns = (("countries", "capital"), ("planets", "order"), ("elements", "symbol"), ("elements", "number"))
    for table, column in unique_columns:
        values = [row[column] for row in facts[table]]
        assert len(set(values)) == len(values), f"{table}.{column} is unique"
    assert sorted(row["order"] for row in facts["planets"]) == list(range(1, 9))
    assert {row["continent"] for row in facts["countries"]} <= {
        "Africa", "Asia", "Europe", "North America", "South America", "Oceania",
    }  # fmt: skip
    assert {row["type"] for row in facts["planets"]} == {"rocky", "gas giant", "ice giant"}
    assert all(1 <= row["number"] <= 118 and row["symbol"][0].isupper() for row in facts["elements"])
    spot_checks = {("France", "capital"): "Paris", ("Japan", "continent"): "Asia"}
    countries = {row["name"]: row for row in facts["countries"]}
    assert all(countries[name][column] == value for (name, column), value in spot_checks.items())


def test_long_answers_span_several_canvases(by_family):
    lengths = [_rough_tokens(example.answer) for example in by_family["long"]]
    assert min(lengths) >= 50 and max(lengths) <= 150
    assert sum(length > 60 for length in lengths) > 0.9 * len(lengths)
    short_families = set(EXPECTED_FAMILIES) - {"long", "chat", "json_reformat"}
    assert all(_rough_tokens(e.answer) < 64 for name in short_families for e in by_family[name])


def test_about_a_quarter_of_the_number_lists_hold_only_single_digits():
    """Users ask about lists like "5, 3, 9, 1"; uniform draws from 0-99 would almost never make one."""
    lists = [e.meta["items"] for e in generate_examples(11, 2000, families=["sort", "list_ops", "reverse"])
             if isinstance(e.meta.get("items", [""])[0], int) and e.meta.get("op") != "dedupe"]
    small = sum(max(items) <= 9 for items in lists) / len(lists)
    assert len(lists) > 800 and 0.18 < small < 0.33, (len(lists), small)


def test_short_counts_stop_where_the_question_says():
    """The long family counts to 20-50; list_ops' short ranges teach the model to stop at a small end too."""
    ranges = [e for e in generate_examples(4, 600, families=["list_ops"]) if e.meta["op"] == "range"]
    assert len(ranges) > 50
    assert {e.meta["start"] > e.meta["stop"] for e in ranges} == {True, False}  # up and down
    for e in ranges:
        numbers = [int(x) for x in e.answer.split(", ")]
        assert numbers[0] == e.meta["start"] and numbers[-1] == e.meta["stop"] and 3 <= len(numbers) <= 13
        assert str(e.meta["start"]) in e.prompt_messages[-1]["content"]


def test_the_word_list_is_hundreds_of_plain_lowercase_words():
    from dgemma.train.tasks import WORDS

    assert len(WORDS) == len(set(WORDS)) >= 400
    assert all(re.fullmatch(r"[a-z]{3,9}", w) for w in WORDS)
    assert {"elephant", "banana", "fig", "pear"} <= set(WORDS)


def test_a_share_of_single_questions_is_typed_casually_and_keeps_its_operands():
    """About a third of single questions come lowercased, without end punctuation, or with a greeting or thanks, as
    people type; the numbers the answer needs are all still there."""
    examples = generate_examples(0, 600, ["add"])
    questions = [e.prompt_messages[-1]["content"] for e in examples]
    casual = [q for q in questions if q[0].islower() or q[-1] not in ".?" or q.startswith(tasks.CASUAL_OPENERS)]
    assert 0.15 < len(casual) / len(questions) < 0.45
    for example, question in zip(examples, questions):
        assert str(example.meta["a"]) in question and str(example.meta["b"]) in question
