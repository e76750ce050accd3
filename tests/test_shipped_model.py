"""The model that ships inside the package (dgemma/assets/dgemma-mini): it answers, it is the default, it fits.

Trained by `bash scripts/train_shipped.sh` (see that script for the architecture and recipe).
"""

from __future__ import annotations

import json

import pytest
import torch
from reference import decoder_logits

from dgemma.default_model import shipped_model_path

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(shipped_model_path() is None,
                       reason="dgemma/assets/dgemma-mini is not trained yet (run: bash scripts/train_shipped.sh)"),
]

HELDOUT_SEED = 20_251_127  # problems no training seed produces (tasks.py's split rule), fixed for reproducibility


@pytest.fixture(scope="module")
def path():
    return shipped_model_path()


@pytest.fixture(scope="module")
def llm(path):
    from dgemma.llm import LLM

    return LLM(path, dtype="float32", device="cpu")


def test_the_default_model_is_the_shipped_one(path):
    from dgemma.default_model import default_model_path

    assert default_model_path() == path


def test_shipped_model_passes_a_100_problem_heldout_eval(llm):
    from dgemma.train.evaluate import evaluate, heldout

    report = evaluate(llm, heldout(HELDOUT_SEED, 100), batch_size=50, seed=0)
    assert report.total.n == 100
    # The release bar is 95% per family on 500 problems (dgemma eval); 90% overall leaves room for 100-problem noise.
    assert report.total.accuracy > 0.90, report.table()


def test_generate_answers_a_multiplication_out_of_the_box(capsys):
    from dgemma.cli import main

    assert main(["generate", "What is 17 * 23?", "--quiet", "--seed", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "17 × 23 = 17 × 20 + 17 × 3 = 340 + 51 = 391"  # work shown, as trained


def test_shipped_model_calls_a_declared_tool(llm):
    from dgemma.chat_format import parse_tool_calls
    from dgemma.train.tasks import TOOL_SPECS

    tools = [TOOL_SPECS["get_weather"], TOOL_SPECS["calculator"]]
    result = llm.chat([{"role": "user", "content": "What's the weather like in Paris?"}], tools=tools, seed=0,
                      skip_special_tokens=False)[0]
    _, calls = parse_tool_calls(result.text, tools)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})], result.text


def test_shipped_model_thinks_in_thinking_mode(llm):
    from dgemma.chat_format import split_reasoning

    result = llm.chat([{"role": "user", "content": "How many minutes are in 3 hours and 20 minutes?"}],
                      enable_thinking=True, seed=0, skip_special_tokens=False)[0]
    reasoning, content = split_reasoning(result.text)
    assert reasoning and content.strip() == "200", result.text


def test_shipped_checkpoint_gives_the_reference_logits(path, llm):
    """transformers loads the shipped checkpoint and computes the same decoder logits (float32, within 1e-4)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    ours, cfg = llm.model, llm.config
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([llm.chat_prompt([{"role": "user", "content": "Sort these numbers: 42, 7, 19, 88, 3, 61, 25"}])])
    assert ids.shape[1] > cfg.sliding_window
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=torch.Generator().manual_seed(0))
    sc_logits = 3 * torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    logits, ref = decoder_logits(ours, reference, [ids], canvas, sc_logits, capacity=512)
    # Trained logits reach ~30 (the softcap); float32 rounding of two summation orders stays well under 1e-4 there.
    assert (logits - ref).abs().max() < 1e-4


def test_shipped_checkpoint_keeps_the_architecture_and_fits_the_package(path, llm):
    cfg = llm.config
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    assert cfg.layer_types[-1] == "full_attention"
    assert cfg.num_experts >= 8 and cfg.top_k_experts < cfg.num_experts
    assert cfg.canvas_length in (32, 64)
    assert cfg.sliding_window < 64  # shorter than typical prompts (a tool prompt is hundreds of tokens)
    params = sum(p.numel() for p in llm.model.parameters())
    assert 10e6 <= params <= 12.5e6
    shards = list(path.glob("*.safetensors"))
    assert sum(s.stat().st_size for s in shards) <= 25e6
    assert all(s.stat().st_size <= 15 * 2**20 for s in shards)  # each file fits the transfer limit
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
