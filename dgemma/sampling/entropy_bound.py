"""The Entropy Bound sampler: one denoising step's accept / renoise rule, and the adaptive stopping rule.

Randomness is per request (one `torch.Generator` each), drawn in the reference's order: the initial canvas
with `randint`, then per step `multinomial` followed by `randint` for renoising. A request's output therefore
depends on its seed only, never on which other requests share its batch, and a single request reproduces
the Hugging Face reference token for token.
"""

from __future__ import annotations

from collections.abc import Callable
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
    mean_entropy: torch.Tensor  # [B] mean over the canvas of the entropy of softmax(z)
    accepted: torch.Tensor  # [B, C] bool
    soft: torch.Tensor | None  # [B, C, H] self-conditioning input for the next step, if asked for


class EntropyBoundSampler:
    """Per-row knobs arrive as tensors so requests with different settings share one batched step.

    Rows are processed one at a time, and the logits are scaled in place: besides the [B, C, V] logits the step
    holds a few [C, V] temporaries, never a second batch-sized vocabulary tensor.
    """

    def step(
        self,
        logits: torch.Tensor,  # [B, C, V] float32; consumed (scaled in place)
        temperature: torch.Tensor,  # [B] schedule temperature of each row at this step
        greedy: list[bool],  # rows that take the argmax instead of a sample
        bound: torch.Tensor,  # [B] entropy bound of each row
        generators: list[torch.Generator],
        soft_embedding: Callable[[torch.Tensor], torch.Tensor] | None = None,  # z [C, V] -> [C, H]
    ) -> StepResult:
        b, c, v = logits.shape
        canvas, argmax, entropy, soft = [], [], [], []
        for row in range(b):
            gen = generators[row]
            z = logits[row].div_(temperature[row])  # [C, V]
            best = z.argmax(dim=-1)  # [C]
            if greedy[row]:
                sampled = best
            else:
                probs = torch.softmax(z, dim=-1, dtype=torch.float32)
                sampled = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                del probs
            noise = torch.randint(0, v, (1, c), generator=gen, device=logits.device)[0]
            canvas.append((sampled, noise))
            argmax.append(best)
            entropy.append(token_entropy(z))
            if soft_embedding is not None:
                soft.append(soft_embedding(z))
        entropy_t = torch.stack(entropy)  # [B, C]
        accepted = entropy_bound_accept(entropy_t, bound)
        sampled_t = torch.stack([s for s, _ in canvas])
        noise_t = torch.stack([n for _, n in canvas])
        return StepResult(
            canvas=torch.where(accepted, sampled_t, noise_t),
            argmax=torch.stack(argmax),
            mean_entropy=entropy_t.mean(dim=-1),
            accepted=accepted,
            soft=torch.stack(soft) if soft else None,
        )


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
