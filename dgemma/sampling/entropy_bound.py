"""The Entropy Bound sampler: one denoising step's accept / renoise rule, and the adaptive stopping rule.

Randomness is per request (one `torch.Generator` each), drawn in the reference's order: the initial canvas
with `randint`, then per step `multinomial` followed by `randint` for renoising. A request's output therefore
depends on its seed only, never on which other requests share its batch, and a single request reproduces
the Hugging Face reference token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim, computed as torch.distributions.Categorical does. [.., V] -> [..]"""
    log_p = z - z.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_p, dim=-1)
    return -(log_p.clamp(min=torch.finfo(log_p.dtype).min) * probs).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum(H_1..H_k) - H_k <= bound. entropy [B, C], bound [B] -> bool [B, C].

    The lowest-entropy position is always accepted (its left side is 0).
    """
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep_sorted = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= bound[:, None]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def initial_canvas(vocab_size: int, canvas_length: int, generator: torch.Generator, device) -> torch.Tensor:
    """A canvas of uniform random tokens: [1, C]."""
    return torch.randint(0, vocab_size, (1, canvas_length), generator=generator, device=device)


@dataclass
class StepResult:
    canvas: torch.Tensor  # [B, C] next canvas: accepted samples, fresh noise elsewhere
    argmax: torch.Tensor  # [B, C] argmax of this step's scaled logits (what a commit would keep)
    scaled_logits: torch.Tensor  # [B, C, V] float32 z = logits / T (self-conditions the next step)
    mean_entropy: torch.Tensor  # [B] mean over the canvas of the entropy of softmax(z)
    accepted: torch.Tensor  # [B, C] bool


class EntropyBoundSampler:
    """Per-row knobs arrive as tensors so requests with different settings share one batched step."""

    def step(
        self,
        logits: torch.Tensor,  # [B, C, V] float32
        temperature: torch.Tensor,  # [B] schedule temperature of each row at this step
        greedy: list[bool],  # rows that take the argmax instead of a sample
        bound: torch.Tensor,  # [B] entropy bound of each row
        generators: list[torch.Generator],
    ) -> StepResult:
        b, c, v = logits.shape
        z = logits / temperature[:, None, None]
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        argmax = z.argmax(dim=-1)
        rows_sampled, rows_noise = [], []
        for row in range(b):
            gen = generators[row]
            if greedy[row]:
                rows_sampled.append(argmax[row])
            else:
                rows_sampled.append(torch.multinomial(probs[row], 1, generator=gen).squeeze(-1))
            rows_noise.append(torch.randint(0, v, (1, c), generator=gen, device=logits.device)[0])
        sampled, noise = torch.stack(rows_sampled), torch.stack(rows_noise)  # [B, C] each
        entropy = token_entropy(z)  # [B, C]
        accepted = entropy_bound_accept(entropy, bound)
        canvas = torch.where(accepted, sampled, noise)
        return StepResult(canvas, argmax, z, entropy.mean(dim=-1), accepted)


def stable_and_confident(
    history: list[torch.Tensor], argmax: torch.Tensor, mean_entropy: torch.Tensor, stability: int, confidence: float
) -> torch.Tensor:
    """Adaptive stop of one row: argmax equal to each of the last `stability` argmaxes and mean entropy < confidence.

    history: previous argmaxes [C] (oldest first, at most `stability`); returns a 0-dim bool tensor.
    """
    if stability == 0:
        stable = torch.ones((), dtype=torch.bool, device=argmax.device)
    elif len(history) < stability:
        stable = torch.zeros((), dtype=torch.bool, device=argmax.device)
    else:
        stable = torch.stack([(h == argmax).all() for h in history[-stability:]]).all()
    return stable & (mean_entropy < confidence)
