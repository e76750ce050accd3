"""The training optimizers: AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan et al. 2024; the update-RMS matching of Liu et al. 2025, "Muon is scalable for LLM training") keeps a
momentum per weight matrix and applies its nearest semi-orthogonal matrix (five Newton-Schulz iterations) instead of
Adam's elementwise normalised step. Every direction of the matrix then moves at the same rate, which trains small
transformers in fewer steps than AdamW. Its updates are scaled by 0.2 * sqrt(max(rows, cols)) so their RMS is about
AdamW's: the same lr, schedule and weight decay serve both.

Muon takes every parameter of two or more dimensions except the tied embedding (which is also the output head, where
Adam's per-coordinate steps suit the rare tokens' rows); a 3-D expert tensor [experts, out, in] is one matrix per
expert. Matrices of one shape are updated together as one batch: a step is a few batched matrix products, not a few
per matrix.
"""

from __future__ import annotations

import torch

from dgemma.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic iteration tuned for speed of convergence near zero, not exactness


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """g: [..., m, n] -> [..., m, n], about U V^T of each matrix's SVD (singular values pushed into ~[0.7, 1.2])."""
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is stable here on tensor cores; CPUs are faster in fp32
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT  # [..., min, min]
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon:
    """Nesterov momentum, orthogonalised per matrix, decoupled weight decay; skips a step when found_inf is set.

    found_inf (a 0-d float tensor, 1.0 = skip) is read on the device, as the fused AdamW reads it: no host sync.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float, momentum: float = 0.95,
                 ns_steps: int = 5):
        if not params:
            raise ConfigError("Muon needs at least one matrix parameter")
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.ndim < 2:
                raise ConfigError(f"Muon updates matrices; got a parameter of shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.param_groups = [{"params": ps, "lr": lr, "weight_decay": weight_decay} for ps in by_shape.values()]
        self.momentum, self.ns_steps = momentum, ns_steps
        # One stacked buffer per shape group: [k, *shape] for its k matrices.
        self.buffers = [torch.zeros((len(g["params"]), *g["params"][0].shape), device=g["params"][0].device)
                        for g in self.param_groups]
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self) -> None:
        keep = None if self.found_inf is None else self.found_inf == 0  # [] bool on the device
        for group, buf in zip(self.param_groups, self.buffers):
            params = group["params"]
            # [k, *shape]: the group's k gradients (a parameter without one counts as a zero gradient)
            grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).float()
            if keep is not None:
                grads = torch.where(keep, grads, 0.0)  # a skipped step must not leave NaN in the momentum
                new_buf = torch.where(keep, buf * self.momentum + grads, buf)
            else:
                new_buf = buf * self.momentum + grads
            buf.copy_(new_buf)
            update = orthogonalize(grads + self.momentum * buf, self.ns_steps)  # Nesterov: [k, *shape]
            rows, cols = update.shape[-2:]
            scale = 0.2 * max(rows, cols) ** 0.5
            lr, decay = group["lr"], group["weight_decay"]
            stacked = torch.stack([p.detach() for p in params])
            new = stacked * (1 - lr * decay) - (lr * scale) * update
            if keep is not None:
                new = torch.where(keep, new, stacked)
            torch._foreach_copy_(params, list(new.unbind(0)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        buffers = [b.detach().cpu().clone() for b in self.buffers]  # a copy: a live buffer would change under a save
        return {"buffers": buffers, "lr": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["buffers"]
        if [tuple(b.shape) for b in saved] != [tuple(b.shape) for b in self.buffers]:
            raise ConfigError("the saved Muon state does not match this model's matrices")
        for buf, b in zip(self.buffers, saved):
            buf.copy_(b)
        for group, lr in zip(self.param_groups, state["lr"]):
            group["lr"] = lr


class Optimizers:
    """Several optimizers over disjoint parameters, driven as one (lr, found_inf, step, state)."""

    def __init__(self, parts: dict[str, object]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @property
    def found_inf(self):
        return next(iter(self.parts.values())).found_inf

    @found_inf.setter
    def found_inf(self, value) -> None:
        for opt in self.parts.values():
            opt.found_inf = value

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" in state and set(self.parts) == {"adamw"}:
            state = {"adamw": state}  # saved before there was a choice: AdamW's own state
        if set(state) != set(self.parts):
            raise ConfigError(f"the saved optimizer state holds {sorted(state)}, this run uses {sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def build_optimizer(kind: str, named: list[tuple[str, torch.Tensor]], lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> Optimizers:
    """named: (name, float32 master parameter). Matrices decay, norm weights and scalars (multipliers around 1) don't."""
    if kind not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {kind!r}")
    to_muon = [p for n, p in named if kind == "muon" and p.ndim >= 2 and not n.startswith("embed_tokens.")]
    chosen = {id(p) for p in to_muon}
    rest = [(n, p) for n, p in named if id(p) not in chosen]
    groups = [{"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0}]
    # Fused: one kernel per step on GPUs and CPUs alike, and it skips non-finite steps on the device (found_inf).
    parts: dict[str, object] = {"adamw": torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                                           fused=True)}
    if to_muon:
        parts["muon"] = Muon(to_muon, lr=lr, weight_decay=weight_decay)
    return Optimizers(parts)
