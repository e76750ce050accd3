"""Token-by-token decoding (`generate_ar`, `dgemma bench --mode ar`) stops where a plain loop stops: a row ends
before its first EOS ("stop") or after max_new_tokens tokens ("length"), whatever the other rows do.

generate_ar queues the forward of the next token before the host reads the current one, so that the GPU is not
idle while Python checks EOS: these cases pin that this changes neither the tokens nor where rows stop, and that
no forward runs past max_new_tokens. On a GPU the same cases run the CUDA-graph path (bfloat16) and the event-based
reads of the tokens.
"""

from __future__ import annotations

import pytest
import torch

from dgemma.checkpoint.random_init import InitScale, build_random_model
from dgemma.engine.autoregressive import generate_ar
from dgemma.engine.denoisers import use_cuda_graphs
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache

# Greedy decoding counts up from each prompt's last token (see `model`): rows 0 and 1 generate 101, 102, ... and
# 301, 302, ..., so an EOS id names the step a row stops at.
PROMPTS = [
    torch.randint(10, 500, (19,), generator=torch.Generator().manual_seed(0)).tolist() + [100],
    torch.randint(10, 500, (36,), generator=torch.Generator().manual_seed(1)).tolist() + [300],
]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def model(request):
    # A random model's greedy continuation repeats the last token (the residual stream carries its embedding to the
    # tied head); rolling the logits by one makes it count up instead, so that every step has its own token.
    device = torch.device(request.param)
    dtype = "float32" if device.type == "cpu" else "bfloat16"  # bfloat16: the dtype the CUDA graphs are used for
    model = build_random_model("tiny", dtype=dtype, device=device, seed=5, scale=InitScale(embed_std=1.0, perturb=0.1))
    logits = model.logits
    model.logits = lambda hidden: logits(hidden).roll(1, dims=-1)
    return model


def reference(model, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...]) -> tuple[list[int], str]:
    """One row, one forward per token, each token read before the next forward."""
    cfg, n = model.config, len(prompt)
    cache = KVCache(cfg, 1, n + max_new_tokens, model.dtype, model.device)
    batch = AttentionBatch.for_encoder([0], [0], [n], cfg.sliding_window, cache)
    hidden = model.encode(torch.tensor([prompt], device=model.device), batch, cache)  # [1, n, H]
    tokens: list[int] = []
    while True:
        token = model.logits(hidden[:, -1]).argmax(-1)  # [1]
        if token.item() in eos:
            return tokens, "stop"
        tokens.append(token.item())
        if len(tokens) == max_new_tokens:
            return tokens, "length"
        batch = AttentionBatch.for_encoder([0], [n + len(tokens) - 1], [1], cfg.sliding_window, cache)
        hidden = model.encode(token[:, None], batch, cache)  # [1, 1, H]


# max_new_tokens, EOS ids, then what each row gives: (number of tokens, finish reason).
CASES = {
    "eos at the first token of every row": (8, (101, 301), [(0, "stop"), (0, "stop")]),
    "eos at the first token of one row": (8, (301,), [(8, "length"), (0, "stop")]),
    "eos in the middle": (8, (104,), [(3, "stop"), (8, "length")]),
    "rows stop at different steps": (8, (103, 306), [(2, "stop"), (5, "stop")]),
    "eos at the last allowed step": (3, (103, 303), [(2, "stop"), (2, "stop")]),
    "eos just past max_new_tokens": (3, (104,), [(3, "length"), (3, "length")]),
    "max_new_tokens 1": (1, (), [(1, "length"), (1, "length")]),
    "max_new_tokens 1, eos at the first token": (1, (101,), [(0, "stop"), (1, "length")]),
    "max_new_tokens 2": (2, (), [(2, "length"), (2, "length")]),
    "max_new_tokens 2, eos at the second token": (2, (302,), [(2, "length"), (1, "stop")]),
}


@pytest.mark.parametrize("max_new_tokens,eos,ends", CASES.values(), ids=CASES.keys())
def test_rows_stop_where_a_token_by_token_loop_stops(model, monkeypatch, max_new_tokens, eos, ends):
    expected = [reference(model, p, max_new_tokens, eos) for p in PROMPTS]
    assert [(len(tokens), reason) for tokens, reason in expected] == ends  # the case is the one it claims to be

    forwards = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, *args: forwards.append(ids.shape[1]) or encode(ids, *args))
    results = generate_ar(model, PROMPTS, max_new_tokens, eos_token_ids=eos)
    assert [(r.token_ids, r.finish_reason) for r in results] == expected

    if not use_cuda_graphs(model):  # graphs call encode only while being captured
        # The step each row reads its last token at: its EOS, or its max_new_tokens-th token.
        last_step = max(len(tokens) if reason == "stop" else len(tokens) - 1 for tokens, reason in expected)
        # The prefill, then one forward per token still to be read: none for a token past max_new_tokens, and at
        # most one (discarded) after the last row stopped.
        assert forwards[0] == max(map(len, PROMPTS))
        assert len(forwards) - 1 <= min(last_step + 1, max_new_tokens - 1)
        if not eos:
            assert len(forwards) - 1 == max_new_tokens - 1


def test_sampled_rows_stop_at_their_first_eos_in_the_stream_they_sample_without_one(model):
    """With a seed, EOS only cuts each row's stream: the sampled tokens do not depend on where rows stop."""
    stream = [r.token_ids for r in generate_ar(model, PROMPTS, 8, temperature=2.0, seed=0, ignore_eos=True)]
    eos = (stream[0][2], stream[1][5])
    expected = []
    for tokens in stream:
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        expected.append((tokens, "length") if end is None else (tokens[:end], "stop"))
    results = generate_ar(model, PROMPTS, 8, temperature=2.0, seed=0, eos_token_ids=eos)
    assert [(r.token_ids, r.finish_reason) for r in results] == expected
