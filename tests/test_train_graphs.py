"""Specifications for the static-shape training step that CUDA graphs replay (dgemma/train/step_graphs.py).

A captured graph needs fixed shapes: batches are padded to few (rows, width) shapes, and the padding must change
no loss and no gradient. The capture itself needs CUDA (tests/test_gpu.py); the buffers around it run here.
"""

from __future__ import annotations

import random

import pytest
import torch

from dgemma.checkpoint.random_init import build_random_model
from dgemma.train.dataset import BatchSampler, Corpus, collate, pad_batch
from dgemma.train.objective import ObjectiveConfig, block_diffusion_loss
from dgemma.train.step_graphs import GraphedLossStep
from dgemma.train.trainer import model_preset

ROWS = [([2, 5, 6, 7, 8, 9, 10, 11, 12], 3), ([2, 5, 6, 40, 41], 3), ([2, 9, 9, 9, 50, 51, 52, 53, 54, 55, 56, 57], 4)]


def micro_model():
    model = build_random_model(model_preset("micro", 64, [1]), "float32", "cpu", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def loss_and_grads(model, batch, objective, seed=0):
    model.zero_grad(set_to_none=True)
    parts = block_diffusion_loss(model, batch, objective, torch.Generator().manual_seed(seed))
    parts.loss.backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def shape_batch(model, i: int, shape: tuple[int, int]):
    """A batch of `shape` (rows, width) whose rows differ by seed i."""
    rows = [([2] + [5 + (i + j) % 50] * (shape[1] - 1 - j), 3) for j in range(shape[0])]
    return collate(rows, model.config.canvas_length, 0, random.Random(i))


def assert_same_step(eager_model, eager, model, traced, batch, seed: int, shape) -> None:
    """One forward and backward of each objective on the batch, drawing from the default generator at `seed` (as
    the captured step does): the same loss, and the same gradients within 1e-4 of the largest."""
    results = []
    for m, fn in ((eager_model, eager), (model, traced)):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        parts = fn(batch, None)
        parts.loss.backward()
        results.append((parts.loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), shape
    scale = max(float(g.abs().max()) for g in want_grads)
    assert all((g - w).abs().max() <= 1e-4 * scale for g, w in zip(got_grads, want_grads)), shape


@pytest.mark.parametrize("objective", [ObjectiveConfig(), ObjectiveConfig(noise_samples=3, filler_weight=0.5)],
                         ids=["default", "noise_samples_3"])
def test_padding_rows_and_columns_change_no_loss_and_no_gradient(objective):
    model = micro_model()
    batch = collate(ROWS, model.config.canvas_length, 0, random.Random(0))
    padded = pad_batch(batch, rows=5, width=32, pad_id=0)
    assert padded.input_ids.shape == (5, 32) and padded.rows_real.tolist() == [True] * 3 + [False] * 2
    plain, plain_grads = loss_and_grads(model, batch, objective)
    pad, pad_grads = loss_and_grads(model, padded, objective)
    for name in ("loss", "diffusion", "ar", "canvas_accuracy"):
        assert torch.allclose(getattr(pad, name), getattr(plain, name), rtol=1e-5, atol=1e-6), name
    assert torch.equal(pad.noise[: plain.noise.shape[0]], plain.noise)  # the real rows drew the same noise
    assert plain_grads.keys() == pad_grads.keys()
    # float32 sums over more (zero) terms, so equal up to rounding; a scalar whose gradient cancels to ~1e-8 is judged
    # on the scale of all gradients, not its own
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    for name, grad in plain_grads.items():
        assert (pad_grads[name] - grad).abs().max() <= 1e-4 * scale, name


def test_a_padded_batch_counts_only_its_examples():
    batch = collate(ROWS, 4, 0, random.Random(0))
    padded = pad_batch(batch, rows=8, width=16, pad_id=0)
    assert (padded.examples, padded.encoder_tokens, padded.canvas_tokens) == (3, 9 + 5 + 12, 3 * 4)
    with pytest.raises(ValueError, match="does not fit the static shape 2 x 16"):
        pad_batch(batch, rows=2, width=16, pad_id=0)


def test_every_batch_fits_the_static_shape_of_its_width():
    gen = random.Random(0)
    lengths = [gen.randint(5, 200) for _ in range(3000)]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    corpus = Corpus(torch.randint(3, 60, (sum(lengths),), dtype=torch.int32), starts, torch.tensor(lengths),
                    torch.tensor([3] * len(lengths)), torch.zeros(len(lengths), dtype=torch.long), ["add"])
    sampler = BatchSampler(corpus, batch_size=64, canvas_length=16, pad_id=0, seed=0, max_batch_tokens=4096,
                           width_multiple=32)
    shapes = set()
    for _ in range(200):
        batch = next(sampler)
        rows, width = sampler.static_shape(int(batch.lengths.max()))
        assert batch.input_ids.shape[0] <= rows and batch.input_ids.shape[1] <= width and width % 32 == 0
        assert rows * width <= 4096
        shapes.add((rows, width))
    assert len(shapes) <= 7  # widths 32 .. 224: one graph each


def test_the_graph_step_without_capture_equals_the_eager_step_and_reuses_its_buffers():
    model = micro_model()
    objective = ObjectiveConfig()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(5)
    step = GraphedLossStep(params, lambda b: block_diffusion_loss(model, b, objective, gen),
                           lambda: torch.autocast("cpu", enabled=False), capture=False)
    batches = [pad_batch(collate(ROWS[i:], model.config.canvas_length, 0, random.Random(i)), 4, 16, 0)
               for i in range(3)]
    for batch in batches:
        state = gen.get_state()
        model.zero_grad(set_to_none=True)
        parts = step.step(batch, torch.device("cpu"))
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        model.zero_grad(set_to_none=True)
        gen.set_state(state)
        want = block_diffusion_loss(model, batch, objective, gen)
        want.loss.backward()
        assert torch.equal(parts.loss, want.loss.detach())
        for p, grad in zip(params, grads):
            assert (grad is None) == (p.grad is None) and (grad is None or torch.equal(grad, p.grad))
    assert list(step.shapes) == [(4, 16)]  # one static shape, its buffers refilled for each batch
    assert not any(t is b for t, b in zip(step.shapes[(4, 16)].inputs.tensors(), batches[0].tensors()))


def test_the_training_loop_with_static_shapes_pads_every_batch_and_learns(tmp_path, caplog):
    """The loop's CUDA-graph branch, on a CPU without capture: batches padded to (rows, width) shapes with widths
    that are multiples of 32, counters that count only real examples, and a loss that falls as in the eager loop."""
    import logging
    import re

    from test_train import STEPS, micro_config

    from dgemma.train.trainer import Trainer

    losses = []
    trainer = Trainer(micro_config(tmp_path / "model"), callback=lambda step, m: losses.append(m["loss"]))
    trainer.use_graphs = True
    with caplog.at_level(logging.INFO, logger="dgemma.train.step_graphs"):
        try:
            result = trainer.run()
        finally:
            trainer.tmp.cleanup()
    shapes = [tuple(map(int, m.groups())) for m in re.finditer(r"batches of (\d+) x (\d+) tokens", caplog.text)]
    assert shapes and all(width % 32 == 0 and rows == 16 for rows, width in shapes)
    assert len(losses) == STEPS and sum(losses[-5:]) < 0.65 * sum(losses[:5])  # as test_train's bar
    assert result.examples_seen == 16 * STEPS  # padding rows are not examples


def test_a_token_cap_below_one_padded_example_is_refused_before_any_data_is_made(tmp_path):
    from test_train import micro_config

    from dgemma.errors import ConfigError
    from dgemma.train.trainer import Trainer

    trainer = Trainer(micro_config(tmp_path / "model", max_length=300, max_batch_tokens=300))
    trainer.use_graphs = True
    try:
        with pytest.raises(ConfigError, match="padded to 320 tokens for CUDA graphs.*--no-cuda-graphs"):
            trainer.run()
    finally:
        trainer.tmp.cleanup()
    assert not (tmp_path / "model").exists()


def test_a_shape_prepared_ahead_is_the_one_real_batches_of_that_shape_replay():
    """The trainer prepares every static shape on stand-in batches while the corpus is generated; a real batch of
    a prepared shape is then copied into that shape's buffers, and its loss is its own, not the stand-in's."""
    model = micro_model()
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(5)
    step = GraphedLossStep(list(model.parameters()), lambda b: block_diffusion_loss(model, b, objective, gen),
                           lambda: torch.autocast("cpu", enabled=False), capture=False)
    c = model.config.canvas_length
    stand_in = collate([([7] * 16, 4)] * 4, c, 0, random.Random(0))
    step.prepare(stand_in, torch.device("cpu"))
    step.prepare(stand_in, torch.device("cpu"))  # once per shape
    assert list(step.shapes) == [(4, 16)]
    buffers = step.shapes[(4, 16)].inputs.tensors()
    batch = pad_batch(collate(ROWS, c, 0, random.Random(1)), 4, 16, 0)
    state = gen.get_state()
    got = step.step(batch, torch.device("cpu"))
    gen.set_state(state)
    assert torch.equal(got.loss, block_diffusion_loss(model, batch, objective, gen).loss.detach())
    assert list(step.shapes) == [(4, 16)] and all(a is b for a, b in zip(step.shapes[(4, 16)].inputs.tensors(), buffers))


def test_the_compiled_objective_traces_once_for_every_batch_shape_and_equals_eager():
    """`--compile` runs the objective through torch.compile with dynamic shapes: one trace serves batches of any
    rows and width (a recompile per shape would cost minutes with Inductor), and the traced function computes the
    eager loss and gradients. Traced here with AOTAutograd's eager backend, which needs no C++ compiler."""
    import torch._dynamo

    from dgemma.train.trainer import training_objective, use_dense_experts

    model = micro_model()
    use_dense_experts(model)  # as GPU training runs it
    objective = ObjectiveConfig(noise_samples=2)
    eager = training_objective(model, objective)
    torch._dynamo.reset()
    traced = training_objective(model, objective, "aot_eager")
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i, shape in enumerate([(4, 32), (6, 64), (3, 96)]):
        assert_same_step(model, eager, model, traced, shape_batch(model, i, shape), i, shape)
        if i == 0:
            graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs_after_first > frames_before
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_first  # no retrace for new shapes


def test_the_cache_memory_check_stays_out_of_a_compiled_step():
    """A training step builds KV caches on the device, and a cache checks the free GPU memory first: a driver query
    torch.compile cannot trace (on an H100 it split the compiled step into ten graphs; tests/test_gpu.py checks the
    whole objective there). Traced, the check is skipped, so even a CUDA cache traces as one graph here."""
    import torch._dynamo

    from dgemma.model.kv_cache import check_fits_on_device

    config = model_preset("micro", 64, [1])

    def build_check(n: torch.Tensor) -> torch.Tensor:
        check_fits_on_device(config, 4096, 1 << 20, torch.bfloat16, torch.device("cuda"))  # far beyond any card
        return n + 1

    torch._dynamo.reset()
    assert torch.compile(build_check, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1


def test_compiled_feed_forward_layers_share_one_trace_and_equal_eager():
    """`--compile layers` compiles `Layer.feed_forward` once for the whole model: it reads no layer index, so every
    layer replays the same trace. Graphs come only from the grad mode (the gradient-free self-conditioning pass),
    the layer scalar's type (a parameter in the decoder, a tensor in the encoder) and the first new width; none
    from the number of layers, and none from later widths. Loss and gradients equal the eager objective's."""
    import torch._dynamo

    from dgemma.train.trainer import training_objective, use_dense_experts

    model = micro_model()
    use_dense_experts(model)
    objective = ObjectiveConfig(noise_samples=2)
    eager = training_objective(model, objective)
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    traced_model = micro_model()
    use_dense_experts(traced_model)
    traced = training_objective(traced_model, objective, "aot_eager", scope="layers")
    graphs_after_shape = []
    for i, shape in enumerate([(4, 32), (6, 64), (3, 96), (5, 128)]):
        assert_same_step(model, eager, traced_model, traced, shape_batch(model, i, shape), i, shape)
        graphs_after_shape.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before)
    # A trace per layer would be >= 3 layers x 3 passes = 9 graphs.
    assert model.config.num_layers == 3 and graphs_after_shape[-1] <= 4, graphs_after_shape
    assert graphs_after_shape[-1] == graphs_after_shape[1], graphs_after_shape  # later widths: no new trace
