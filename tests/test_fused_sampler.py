"""The fused Entropy Bound sampler (`dgemma.kernels.fused_sampler`): what one pass over the vocabulary gives each
canvas position, and that splitting the vocabulary over several programs changes none of it.

The numeric tests run the kernels on a CPU through the Triton interpreter and are skipped unless TRITON_INTERPRET=1
(`TRITON_INTERPRET=1 pytest tests/test_fused_sampler.py`); tests/test_gpu.py checks the real vocabulary in bf16.
The interpreter rounds float32 -> bfloat16 by truncation, so the probabilities it writes are compared loosely.
"""

from __future__ import annotations

import pytest
import torch
from kernel_wiring import interpreted

triton = pytest.importorskip("triton")  # CPU CI installs no triton

from dgemma.kernels.fused_sampler import fused_sample, vocab_splits  # noqa: E402

CAP = 30.0


def softcapped(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z [B, C, V] float32, as the reference computes it."""
    return CAP * torch.tanh(logits.float() / CAP) / temperature[:, None, None]


def test_positions_get_up_to_16_vocabulary_chunks_while_the_grid_is_small():
    assert vocab_splits(256, 262144, 2048) == 16  # one canvas
    assert vocab_splits(2048, 262144, 2048) == 16  # eight canvases
    assert vocab_splits(8192, 262144, 2048) == 4  # 32 canvases fill the grid with fewer
    assert vocab_splits(1, 3000, 1024) == 2  # never more chunks than the vocabulary has blocks


@interpreted
def test_every_split_gives_the_softmax_statistics_argmax_sample_and_probabilities_of_one_pass():
    gen = torch.Generator().manual_seed(0)
    b, c, v = 2, 3, 5000
    logits = (torch.randn(b, c, v, generator=gen) * 4).to(torch.bfloat16)  # [B, C, V]
    logits[0, 1, [17, 4000]] = 30.0  # a tie across chunks: the first index wins, as in one pass
    temperature = torch.tensor([0.5, 0.9])
    seeds, greedy = torch.tensor([1, 2]), torch.tensor([0, 1], dtype=torch.int32)
    z = softcapped(logits, temperature)
    results = []
    for splits in (1, 2, 4, 8):  # 8 chunks of one 512-entry block leave the last ones empty
        probs = logits.clone()
        entropy, argmax, sample, noise = fused_sample(probs, temperature, seeds, greedy, CAP, block=512, splits=splits)
        assert torch.allclose(entropy, torch.distributions.Categorical(logits=z).entropy(), atol=1e-4)
        assert torch.equal(argmax, z.argmax(-1)) and argmax[0, 1] == 17
        assert torch.equal(sample[1], argmax[1])  # the greedy row
        assert ((noise >= 0) & (noise < v)).all()
        expected = torch.softmax(z.to(torch.bfloat16).float(), -1)
        assert (probs.float() - expected).abs().max() < 5e-2  # truncated to bf16 by the interpreter
        results.append((argmax, sample, noise))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))  # the same draws, whatever the split


@interpreted
def test_samples_follow_the_softmax_of_the_scaled_logits():
    """256 positions share one distribution with mass on five tokens spread over four chunks; the draws' counts
    must match its probabilities (each within 4.5 standard deviations), never pick a token of ~zero mass, and
    greedy rows take the argmax."""
    v, c = 1024, 256
    logits = torch.full((1, c, v), -60.0)  # [1, C, V]: after capping at 30, exp(-60) of the top token's mass
    tokens = torch.tensor([3, 300, 301, 700, 1023])
    logits[..., tokens] = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.0])
    logits = logits.to(torch.bfloat16)
    temperature = torch.tensor([1.0])
    p = torch.softmax(softcapped(logits, temperature)[0, 0], -1)[tokens]  # [5]
    counts = torch.zeros(5)
    for seed in (11, 12):
        _, argmax, sample, _ = fused_sample(logits.clone(), temperature, torch.tensor([seed]),
                                            torch.tensor([0], dtype=torch.int32), CAP, block=256, splits=4)
        assert torch.isin(sample, tokens).all()
        counts += (sample[0, :, None] == tokens).sum(0)
    n = 2 * c
    assert ((counts - n * p).abs() <= 4.5 * (n * p * (1 - p)).sqrt()).all(), (counts, n * p)
    assert (argmax == 300).all()


def test_bad_arguments_are_named():
    logits = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    args = (torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32), CAP)
    with pytest.raises(ValueError, match="bfloat16"):
        fused_sample(logits.float(), *args)
    with pytest.raises(ValueError, match="temperature"):
        fused_sample(logits, torch.ones(2), *args[1:])
    with pytest.raises(ValueError, match="power of two"):
        fused_sample(logits, *args, splits=3)
