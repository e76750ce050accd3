"""Packed projections (`DiffusionGemma.pack_projections`): each layer's q/k/v and its dense MLP's gate/up run as one
GEMM over one concatenated weight. The model must compute the same thing with no second copy of any weight, and
the packing must never survive a change of the weights it views, nor run where gradients are wanted."""

from __future__ import annotations

import pytest
import torch
from kernel_wiring import inputs, rel_err, run

from dgemma.checkpoint.random_init import InitScale, build_random_model

SCALE = InitScale(embed_std=1.0, perturb=0.1)


def weight_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def test_a_packed_model_computes_the_same_logits_and_keys_without_a_second_copy_of_any_weight():
    plain = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    packed = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    bytes_before = weight_bytes(packed)
    packed.pack_projections()
    assert weight_bytes(packed) == bytes_before  # the old weights are freed, the new ones are views
    attention = packed.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.packed.data_ptr()
    cache_plain, logits_plain = run(plain, *inputs(plain.config))
    cache_packed, logits_packed = run(packed, *inputs(packed.config))
    # The same dot products; only a GEMM's blocking may differ with its width: float32 rounding.
    assert rel_err(logits_packed, logits_plain) < 1e-5
    for layer in range(plain.config.num_layers):
        assert rel_err(cache_packed.keys[layer], cache_plain.keys[layer]) < 1e-5
        assert rel_err(cache_packed.values[layer], cache_plain.values[layer]) < 1e-5


def test_moving_or_casting_a_packed_model_ends_the_packing_and_keeps_the_results():
    plain = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE).to(torch.bfloat16)
    model = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    model.pack_projections()
    model.to(torch.bfloat16)
    assert all(layer.self_attn.packed is None and layer.mlp.packed is None for layer in model.layers)
    model.reset_buffers(torch.device("cpu"))
    plain.reset_buffers(torch.device("cpu"))
    assert torch.equal(run(model, *inputs(model.config))[1], run(plain, *inputs(plain.config))[1])


def test_a_replaced_weight_is_used_even_if_the_packing_was_not_told():
    """Loading a tensor into a packed model replaces a Parameter: the old packed copy must not be read."""
    model = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    model.pack_projections()
    before = run(model, *inputs(model.config))[1]
    attention = model.layers[0].self_attn
    attention.q_proj.weight = torch.nn.Parameter(attention.q_proj.weight.detach() * 2, requires_grad=False)
    after = run(model, *inputs(model.config))[1]
    model.layers[0].self_attn.packed = None  # the plain path, with the new weight
    assert torch.equal(run(model, *inputs(model.config))[1], after)
    assert not torch.equal(after, before)


def test_gradients_reach_the_projection_weights_of_a_packed_model():
    """The packed GEMM serves inference only: with gradients on, the layers run their projections one by one."""
    model = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    model.pack_projections()
    for p in model.parameters():
        p.requires_grad_(True)
    layer = model.layers[0]
    x = torch.randn(1, 5, model.config.hidden_size)
    layer.mlp(x).sum().backward()
    q, k, v = layer.self_attn.project(x)
    (q.sum() + k.sum() + v.sum()).backward()
    for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.k_proj,
                   layer.self_attn.v_proj):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_an_llm_packs_an_inference_model_but_not_one_being_trained():
    from dgemma.llm import LLM

    inference = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    LLM.from_model(inference)
    assert inference.layers[0].self_attn.packed is not None
    training = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    for p in training.parameters():
        p.requires_grad_(True)
    params_before = [id(p) for p in training.parameters()]
    LLM.from_model(training)
    assert training.layers[0].self_attn.packed is None
    assert [id(p) for p in training.parameters()] == params_before  # an optimizer's references stay valid


def test_preparing_a_cpu_model_for_inference_packs_it_and_keeps_one_stream():
    """`prepare_inference` is what LLM runs: packing everywhere, the dense MLPs' side stream only on a GPU (its
    results against one stream are checked in tests/test_gpu.py)."""
    model = build_random_model("tiny", "float32", "cpu", seed=1, scale=SCALE)
    model.prepare_inference()
    assert model.layers[0].mlp.packed is not None
    assert all(layer.side_stream is None and layer.self_attn.side_stream is None for layer in model.layers)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        model.set_side_stream(True)
