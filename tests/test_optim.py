"""Specifications for the training optimizers (dgemma/train/optim.py): Muon's orthogonalised step, how parameters
are split between Muon and AdamW, skipped steps, and the state a resumed run reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from dgemma.errors import ConfigError
from dgemma.train.optim import Muon, Optimizers, build_optimizer, orthogonalize


def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_singular_values():
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))  # 3 matrices, one batch
    g[1] *= 1e3  # the scale of a gradient does not matter
    out = orthogonalize(g)
    assert out.shape == g.shape
    for matrix, result in zip(g, out):
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        s = torch.linalg.svdvals(result)
        # Five quintic iterations push every singular value into roughly [0.7, 1.2], not to exactly 1.
        assert s.min() > 0.5 and s.max() < 1.3, s
        polar = u @ vh
        cosine = (result * polar).sum() / (result.norm() * polar.norm())
        assert cosine > 0.95, cosine
    tall = orthogonalize(g.mT)  # a tall matrix is handled through its transpose
    assert torch.allclose(tall, out.mT, atol=1e-5)


def test_muon_lowers_a_least_squares_loss():
    torch.manual_seed(0)
    target = torch.randn(16, 32)
    inputs = torch.randn(64, 32)
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.1, weight_decay=0.0)
    losses = []
    for i in range(200):
        opt.param_groups[0]["lr"] = 0.1 * (1 - i / 200)  # an orthogonalised step has a fixed size: decay it
        loss = ((inputs @ w.T - inputs @ target.T) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])


def test_a_step_flagged_non_finite_changes_neither_weights_nor_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = Muon([w], lr=0.01, weight_decay=0.1)
    w.grad = torch.randn(8, 12)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    before, momentum = w.detach().clone(), opt.buffers[0].clone()
    w.grad = torch.full((8, 12), float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(opt.buffers[0], momentum)


def test_muon_takes_the_hidden_matrices_and_adamw_the_embedding_norms_and_scalars():
    named = [("embed_tokens.weight", torch.nn.Parameter(torch.randn(50, 8))),
             ("layers.0.self_attn.q_proj.weight", torch.nn.Parameter(torch.randn(8, 8))),
             ("layers.1.self_attn.q_proj.weight", torch.nn.Parameter(torch.randn(8, 8))),
             ("layers.0.experts.down_proj", torch.nn.Parameter(torch.randn(4, 8, 6))),
             ("layers.0.input_layernorm.weight", torch.nn.Parameter(torch.ones(8))),
             ("layers.0.layer_scalar", torch.nn.Parameter(torch.ones(1)))]
    opt = build_optimizer("muon", named, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    muon = [id(p) for g in opt.parts["muon"].param_groups for p in g["params"]]
    adamw = [id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]]
    names = {id(p): n for n, p in named}
    assert sorted(names[i] for i in muon) == ["layers.0.experts.down_proj", "layers.0.self_attn.q_proj.weight",
                                              "layers.1.self_attn.q_proj.weight"]
    assert sorted(names[i] for i in adamw) == ["embed_tokens.weight", "layers.0.input_layernorm.weight",
                                               "layers.0.layer_scalar"]
    assert len(opt.parts["muon"].param_groups) == 2  # the two q_proj matrices share one batched update
    decay = {names[p_id]: g["weight_decay"] for g in opt.parts["adamw"].param_groups for p_id in map(id, g["params"])}
    assert decay == {"embed_tokens.weight": 0.1, "layers.0.input_layernorm.weight": 0.0, "layers.0.layer_scalar": 0.0}
    plain = build_optimizer("adamw", named, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert list(plain.parts) == ["adamw"]
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        build_optimizer("sgd", named, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))


def _run(opt: Optimizers, params: list[torch.nn.Parameter], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad()


def test_a_reloaded_state_continues_exactly_like_the_uninterrupted_run():
    def fresh():
        torch.manual_seed(1)
        named = [("embed_tokens.weight", torch.nn.Parameter(torch.randn(20, 6))),
                 ("w", torch.nn.Parameter(torch.randn(6, 6))), ("b", torch.nn.Parameter(torch.randn(6)))]
        return [p for _, p in named], build_optimizer("muon", named, 1e-2, 0.1, (0.9, 0.95))

    params_a, opt_a = fresh()
    _run(opt_a, params_a, 3, seed=0)
    saved = copy.deepcopy({"params": list(params_a), "opt": opt_a.state_dict()})  # state_dict shares live tensors
    _run(opt_a, params_a, 2, seed=1)

    params_b, opt_b = fresh()
    with torch.no_grad():
        for p, s in zip(params_b, saved["params"]):
            p.copy_(s)
    opt_b.load_state_dict(saved["opt"])
    _run(opt_b, params_b, 2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    with pytest.raises(ConfigError, match="holds"):
        build_optimizer("adamw", [("w", torch.nn.Parameter(torch.randn(6, 6)))], 1e-2, 0.1,
                        (0.9, 0.95)).load_state_dict(saved["opt"])
