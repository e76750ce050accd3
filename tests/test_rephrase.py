"""`dgemma eval --rephrase`: held-out problems asked in wordings the generator never trains on."""

import json
import random
import re

import pytest

from dgemma.cli import main
from dgemma.default_model import shipped_model_path
from dgemma.errors import ConfigError
from dgemma.train import checker, tasks
from dgemma.train.evaluate import heldout
from dgemma.train.rephrase import FAMILIES, UNSEEN, question, rephrase


def _templates(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = value.values()
    return [t for item in value for t in _templates(item)]


def _normal(template: str) -> str:
    # Case, quotes, commas and the end's punctuation do not make a wording new (spacing does: "17*23" and
    # "17 * 23" are different tokens).
    return " ".join(re.sub(r"[\"',.?!]", " ", template.lower()).split())


def test_no_unseen_wording_is_one_the_generator_trains_on():
    training = {_normal(t) for name in dir(tasks) if name.endswith("TEMPLATES")
                for t in _templates(getattr(tasks, name))}
    assert len(training) > 100  # every *_TEMPLATES table of the generator was found
    unseen = [t for family in UNSEEN.values() for t in _templates(family)]
    assert [t for t in unseen if _normal(t) in training] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_problem_the_generator_makes_can_be_reworded(family):
    """Every kind of problem of a covered family (training and held-out) gets an unseen wording; the problem, and so
    the expected answer, stay the same, and the question still shows every number and word the answer needs."""
    rng = random.Random(0)
    examples = tasks.generate_examples(1, 150, [family]) + tasks.heldout_examples(1, 150, [family])
    for example in examples:
        reworded = rephrase(example, rng)
        assert reworded.meta == example.meta and reworded.answer == example.answer
        assert checker.expected_answer(reworded) == checker.expected_answer(example)
        assert reworded.messages[:-2] == example.messages[:-2] and reworded.messages[-1] == example.messages[-1]
        text = reworded.prompt_messages[-1]["content"]
        assert text != example.prompt_messages[-1]["content"]
        for key, value in example.meta.items():
            if key in ("kind", "op", "descending", "sep", "table", "attribute"):
                continue
            if family == "facts" and example.meta["attribute"] == "order" and key == "value":
                value = tasks._ordinal(value)  # "the third planet"
            for item in value if isinstance(value, list) else [value]:
                assert str(item) in text, (key, item, text)


def test_heldout_rephrase_defaults_to_the_covered_families_and_is_deterministic():
    first, second = heldout(3, 80, rephrase=True), heldout(3, 80, rephrase=True)
    assert [e.messages for e in first] == [e.messages for e in second]
    assert {e.family for e in first} == set(FAMILIES) and len(first) == 80
    plain = heldout(3, 80, list(FAMILIES))
    assert [e.meta for e in plain] == [e.meta for e in first]  # the same problems, other words


def test_rephrase_refuses_families_it_has_no_wordings_for():
    with pytest.raises(ConfigError, match="rephrase covers the families"):
        heldout(0, 10, ["add", "tool_call"], rephrase=True)
    with pytest.raises(ConfigError, match="no unseen wordings for family 'json_reformat'"):
        question("json_reformat", {}, random.Random(0))


@pytest.mark.skipif(shipped_model_path() is None, reason="the shipped model is not in this checkout")
def test_eval_cli_rephrase_scores_the_shipped_model_on_unseen_wordings(capsys):
    assert main(["eval", "--rephrase", "--n", "10", "--json", "--no-latency", "--failures", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rephrase"] is True and set(data["families"]) == set(FAMILIES) and data["total"]["n"] == 10
    assert main(["eval", "--rephrase", "--families", "chat", "--n", "2", "--no-latency"]) == 2
    assert "rephrase covers the families" in capsys.readouterr().err
