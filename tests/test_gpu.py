"""GPU results agree with the CPU float32 path (skipped without CUDA).

bfloat16 keeps 8 bits of mantissa: each rounding is up to 2^-9 relative, and a forward through a few layers
accumulates many of them, so bf16 logits differ from float32 by ~1% of their scale. We check the relative
L2 error of the logits (< 3%) and that the most likely token agrees on almost every position (> 90%): a
wrong kernel (a missed norm, a wrong RoPE or routing) gives errors of order 100% and near-random argmaxes.
A float32 GPU run must match the CPU to rounding (1e-3 relative: TF32 is off for float32 matmuls by default).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_wiring import (
    decode_attention_kernel_off_and_on,
    decoder_attention_kernel_off_and_on,
    argmax_agreement,
    attention_kernel_off_and_on,
    count_calls,
    experts_kernel_off_and_on,
    inputs,
    rel_err,
    ring_canvas,
    run,
    set_kernel_devices,
    spy_on_kernels,
)

from dgemma.checkpoint.random_init import InitScale, build_random_model, preset
from dgemma.config import FULL, SLIDING
from dgemma.model.moe import FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_logits(model, prompt, canvas, soft_logits):
    """The transformers reference on the same weight tensors (shared, not copied)."""
    from transformers.cache_utils import DynamicCache

    from dgemma.bench.reference import reference_sharing_weights

    ref = reference_sharing_weights(model)
    device = model.device
    with torch.no_grad():
        cache = DynamicCache(config=ref.config.get_text_config())
        ref.model.encoder(input_ids=prompt.to(device), past_key_values=cache)
        return ref(decoder_input_ids=canvas.to(device), past_key_values=cache,
                   self_conditioning_logits=soft_logits.to(device, model.dtype)).logits.float().cpu()


def compare(config, scale, prompt_len, bf16_abs_tol=None):
    """Our GPU logits vs CPU float32. bf16 must be no less accurate than the reference's own bf16 run on the
    same GPU (random models can be chaotic: the reference itself may be far from float32 there)."""
    prompt, canvas, soft_logits = inputs(config, prompt_len)
    _, truth = run(build_random_model(config, "float32", "cpu", seed=1, scale=scale), prompt, canvas, soft_logits)

    def on_gpu(dtype):  # the same weights (a CUDA generator would draw different ones)
        model = build_random_model(config, "float32", "cpu", seed=1, scale=scale).to("cuda", dtype)
        model.reset_buffers(torch.device("cuda"))
        return model

    gpu32 = on_gpu(torch.float32)
    _, ours32 = run(gpu32, prompt, canvas, soft_logits)
    del gpu32
    gpu16 = on_gpu(torch.bfloat16)
    _, ours16 = run(gpu16, prompt, canvas, soft_logits)
    ref16 = reference_logits(gpu16, prompt, canvas, soft_logits)
    agree = lambda a: (a.argmax(-1) == truth.argmax(-1)).float().mean().item()  # noqa: E731
    report = {"fp32": rel_err(ours32, truth), "bf16": rel_err(ours16, truth), "reference_bf16": rel_err(ref16, truth),
              "bf16_argmax_agree": agree(ours16), "reference_bf16_argmax_agree": agree(ref16)}
    print(config.num_layers, "layers:", report)
    assert report["fp32"] < 1e-3, report
    assert report["bf16"] <= 1.25 * report["reference_bf16"] + 2e-3, report
    assert report["bf16_argmax_agree"] >= report["reference_bf16_argmax_agree"] - 0.05, report
    if bf16_abs_tol is not None:
        assert report["bf16"] < bf16_abs_tol, report


def test_tiny_preset_on_gpu_matches_cpu_float32():
    compare(preset("tiny"), InitScale(embed_std=1.0, perturb=0.1), prompt_len=100)


def test_a_slice_of_the_full_size_model_on_gpu_matches_cpu_float32():
    """Two layers (one sliding, one full: head_dim 512, k-as-v, proportional RoPE) of the released shapes,
    128 experts top-8, the 262144-token vocabulary, a prompt longer than the 1024-token window. Random routers
    give near-ties among 128 experts, and bf16 rounding flips some top-8 choices (in the reference too), so the
    bound is relative to the reference's own bf16 error, plus the argmax agreement."""
    config = replace(preset("26b-a4b"), layer_types=[SLIDING, FULL])
    compare(config, InitScale(embed_std=0.02, perturb=0.1), prompt_len=1200)


def test_fused_sampler_matches_torch_on_gpu():
    from dgemma.kernels.fused_sampler import fused_sample

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(3, 64, 262144, device="cuda", generator=gen) * 8).to(torch.bfloat16)
    temperature = torch.tensor([0.5, 0.7, 0.8], device="cuda")
    probs_buf = logits.clone()
    entropy, argmax, sample, noise = fused_sample(probs_buf, temperature, torch.tensor([1, 2, 3], device="cuda"),
                                                  torch.tensor([0, 0, 1], dtype=torch.int32, device="cuda"), 30.0)
    z = 30 * torch.tanh(logits.float() / 30) / temperature[:, None, None]
    assert torch.allclose(entropy, torch.distributions.Categorical(logits=z).entropy(), atol=1e-3)
    assert torch.equal(argmax, z.argmax(-1))
    assert torch.equal(sample[2], argmax[2])  # greedy row
    assert (sample[:2] != argmax[:2]).any()  # sampled rows do sample
    assert ((noise >= 0) & (noise < 262144)).all()
    expected = torch.softmax(z.to(torch.bfloat16), -1, dtype=torch.float32)
    assert (probs_buf.float() - expected).abs().max() < 2e-2  # bf16 probabilities
    assert (probs_buf.float().sum(-1) - 1).abs().max() < 2e-2
    # One program per position (no vocabulary split) draws the same tokens from the same seeds.
    one = fused_sample(logits.clone(), temperature, torch.tensor([1, 2, 3], device="cuda"),
                       torch.tensor([0, 0, 1], dtype=torch.int32, device="cuda"), 30.0, splits=1)
    assert all(torch.equal(a, b) for a, b in zip(one[1:], (argmax, sample, noise)))


def test_mlp_activation_kernel_matches_eager_gelu_times_up_in_bf16_on_gpu():
    from dgemma.kernels.gated_gelu import gelu_mul_triton

    gate_up = (2 * torch.randn(256, 2 * 2112, device="cuda")).to(torch.bfloat16)  # one canvas of the released MLP
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.gelu(gate, approximate="tanh") * up
    out = gelu_mul_triton(gate_up)
    # The same float32 steps and roundings as torch's kernel; the compilers may fuse a multiply-add differently,
    # which moves a rare value by one bf16 step.
    assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=0)
    assert (out != expected).float().mean() < 1e-3


def test_cuda_graph_engine_is_reproducible_and_runs_fixed_steps():
    from dgemma.engine.engine import Engine
    from dgemma.engine.request import Request
    from dgemma.engine.scheduler import SchedulerConfig
    from dgemma.sampling.params import SamplingParams

    model = build_random_model("tiny", "bfloat16", "cuda", seed=3, scale=InitScale(embed_std=3.0, perturb=0.1))
    outputs = []
    for _ in range(2):
        engine = Engine(model, SchedulerConfig(max_num_seqs=4, max_model_len=512, canvas_length=32))
        assert engine.canvas_encoder is not None  # the graph path is in use
        reqs = [Request(str(i), list(range(5, 40 + 7 * i)), SamplingParams(
            max_new_tokens=96, max_denoising_steps=8, seed=i, ignore_eos=True, adaptive_stopping=(i % 2 == 0),
            confidence_threshold=3.0, stability_threshold=0)) for i in range(6)]
        for r in reqs:
            engine.add_request(r)
        while engine.has_work:
            engine.step()
        outputs.append([r.output_ids for r in reqs])
        assert all(len(r.output_ids) == 96 for r in reqs)
        assert reqs[1].stats.forwards_per_canvas == [8, 8, 8]  # adaptive stopping off
        assert min(reqs[0].stats.forwards_per_canvas) < 8  # on: stops early
    assert outputs[0] == outputs[1]


def test_side_stream_changes_no_result_on_gpu():
    """The side stream (`dgemma.model.side_stream`) moves kernels of the captured steps, not their arithmetic: a
    graphed engine's tokens equal those of one stream exactly, on the tiny preset and on a 3-layer slice of the
    released shapes (256-token canvases over the 262144-token vocabulary). A missing wait (the MLP reading its input
    before the norms wrote it, the attention reading keys not yet written, a buffer reused while the other stream
    still reads it) gives other tokens."""
    from dgemma.engine.engine import Engine
    from dgemma.engine.request import Request
    from dgemma.engine.scheduler import SchedulerConfig
    from dgemma.sampling.params import SamplingParams

    slice_config = replace(preset("26b-a4b"), layer_types=[SLIDING, FULL, SLIDING])
    for config, scale, new_tokens, prompt_len in (("tiny", InitScale(embed_std=3.0, perturb=0.1), 96, 40),
                                                  (slice_config, InitScale(embed_std=0.02, perturb=0.1), 512, 300)):
        model = build_random_model(config, "bfloat16", "cuda", seed=3, scale=scale)
        model.prepare_inference()
        assert all(layer.side_stream is not None and layer.self_attn.side_stream is layer.side_stream
                   for layer in model.layers)
        cfg = model.config
        params = SamplingParams(max_new_tokens=new_tokens, max_denoising_steps=4, ignore_eos=True,
                                adaptive_stopping=False)

        def generate(side: bool) -> list[list[int]]:
            model.set_side_stream(side)
            engine = Engine(model, SchedulerConfig(max_num_seqs=4, max_model_len=prompt_len + new_tokens + 64,
                                                   canvas_length=cfg.canvas_length))
            assert engine.canvas_encoder is not None  # the graph path
            reqs = [Request(str(i), list(range(5 + i, 5 + i + prompt_len + 7 * i)), params.with_overrides(seed=i))
                    for i in range(3)]
            for r in reqs:
                engine.add_request(r)
            while engine.has_work:
                engine.step()
            return [r.output_ids for r in reqs]

        assert generate(True) == generate(False)
        del model


def results_off_and_on(switch, layer_types: list[str], device: str = "cuda") -> list[dict]:
    """What a switch must not change, with switch(False) then switch(True), on a slice of the released shapes (bf16,
    the same random weights): the eager KV cache and logits of one prompt and canvas, a graphed engine's tokens for
    two requests, and graphed greedy autoregressive tokens for two prompts."""
    from dgemma.engine.autoregressive import generate_ar
    from dgemma.engine.engine import Engine
    from dgemma.engine.request import Request
    from dgemma.engine.scheduler import SchedulerConfig
    from dgemma.sampling.params import SamplingParams

    config = replace(preset("26b-a4b"), layer_types=layer_types)
    prompt, canvas, soft_logits = inputs(config, 300)
    model = build_random_model(config, "bfloat16", device, seed=1, scale=InitScale(embed_std=0.02, perturb=0.1))
    model.prepare_inference()
    params = SamplingParams(max_new_tokens=512, max_denoising_steps=4, ignore_eos=True, adaptive_stopping=False)
    results = []
    for on in (False, True):
        switch(on)
        engine = Engine(model, SchedulerConfig(max_num_seqs=2, max_model_len=1024, canvas_length=256))
        reqs = [Request(str(i), list(range(5 + i, 305 + 9 * i)), params.with_overrides(seed=i)) for i in range(2)]
        for r in reqs:
            engine.add_request(r)
        while engine.has_work:
            engine.step()
        cache, logits = run(model, prompt, canvas, soft_logits)
        ar = generate_ar(model, [list(range(7, 307)), list(range(11, 200))], 48, ignore_eos=True)
        results.append(dict(cache=cache.keys + cache.values, logits=logits, tokens=[r.output_ids for r in reqs],
                            ar_tokens=[r.token_ids for r in ar]))
    return results


def assert_bit_identical(off: dict, on: dict) -> None:
    assert torch.equal(on["logits"], off["logits"])
    assert all(torch.equal(a, b) for a, b in zip(on["cache"], off["cache"]))
    assert on["tokens"] == off["tokens"]
    assert on["ar_tokens"] == off["ar_tokens"] and all(len(t) == 48 for t in off["ar_tokens"])


def test_folds_into_the_output_kernel_change_no_result_on_gpu(monkeypatch):
    """`FOLD_MOE_COMBINE` and `FOLD_NEXT_NORM`: the layer's output kernel sums the experts' rows as the combine kernel
    does and applies the next norm as the norm kernel does, so a slice of the released shapes gives bit-identical
    bf16 logits and KV cache with the folds on and off (eager, and in the graphed engine's and AR tokens)."""
    from dgemma.model import diffusion_gemma

    def fold(on: bool) -> None:
        monkeypatch.setattr(diffusion_gemma, "FOLD_MOE_COMBINE", on)
        monkeypatch.setattr(diffusion_gemma, "FOLD_NEXT_NORM", on)

    assert_bit_identical(*results_off_and_on(fold, [SLIDING, FULL]))


def test_programmatic_dependent_launch_changes_no_result_on_gpu(monkeypatch):
    """PDL (`dgemma.kernels.launch`) only lets a kernel's programs start before the kernel ahead of it ends, and each
    waits for that kernel's writes before it reads or stores anything: on a slice of the released shapes, bf16
    logits and KV cache (eager), a graphed engine's tokens and graphed autoregressive tokens are bit-identical with
    PDL on and off. A kernel that read before its wait would race and show here as differing bits."""
    from dgemma.kernels import launch

    assert_bit_identical(*results_off_and_on(lambda on: monkeypatch.setattr(launch, "PDL", on),
                                             [SLIDING, FULL, SLIDING]))


def test_one_launch_of_the_head_norms_changes_no_result_on_gpu(monkeypatch):
    """`FUSED_QKV_NORM`: one kernel normalises and rotates the queries and writes the keys and values, computing the
    rotation's angles as `rope_cos_sin` computes its tables (the CUDA math library's float32 cos and sin, rounded to
    bf16), in place of three kernels over the tables. The same roundings: bit-identical logits, KV cache, graphed
    engine tokens and graphed AR tokens on a slice of the released shapes (a sliding and a full layer)."""
    from dgemma.model import attention

    assert_bit_identical(*results_off_and_on(lambda on: monkeypatch.setattr(attention, "FUSED_QKV_NORM", on),
                                             [SLIDING, FULL]))


def test_queued_steps_change_no_token_on_gpu(monkeypatch):
    """`denoisers.must_read`: a graphed engine whose fixed-steps canvases are queued (read once, at their last step)
    gives the tokens of one that reads every step, for two requests in one batch: the host's writes between steps
    (knobs, bounds, new canvases) are ordered on the stream behind the steps still running."""
    from dgemma.engine import denoisers

    queued, every_step = denoisers.must_read, lambda requests: True
    off, on = results_off_and_on(lambda on: monkeypatch.setattr(denoisers, "must_read", queued if on else every_step),
                                 [SLIDING, FULL])
    assert on["tokens"] == off["tokens"] and all(len(t) == 512 for t in off["tokens"])


def test_few_row_products_match_f_linear_in_bf16_on_gpu():
    """`dgemma.kernels.gemv` on every dense shape of an autoregressive token of the released model, 1 and 4 rows:
    float32 sums of the same bf16 products as F.linear in another order, so the outputs differ by the final bf16
    rounding (relative L2 ~ 2^-9 / sqrt(3)) and no more; a wrong row, chunk or stride gives errors of order 1."""
    import torch.nn.functional as F

    from dgemma.kernels.gemv import gemv_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in [(8192, 2816), (9216, 2816), (2816, 4096), (2816, 8192), (4224, 2816), (2816, 2112), (128, 2816),
                 (262144, 2816)]:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        for rows in (1, 4):
            x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
            want = F.linear(x.float(), w.float())
            got = gemv_triton(x, w)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            assert rel_err(got.float(), want) < 2e-3, (n, k, rows)


def test_fused_norm_rope_matches_torch_on_gpu():
    """The kernel rounds the rotation once where the eager path rounds three times, and its normalised value may
    differ by one rounding: errors stay within a few bf16 ulps of the largest normalised value (a wrong rotation
    or norm gives errors of the order of the values themselves)."""
    from dgemma.kernels.norm_rope import norm_rope_triton
    from dgemma.model.layers import apply_rope, rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    for d, heads in [(256, 16), (512, 2), (16, 2)]:
        x = torch.randn(2, 37, heads, d, device="cuda", generator=gen).to(torch.bfloat16)
        w = torch.randn(d, device="cuda", generator=gen).to(torch.bfloat16)
        angles = torch.rand(2, 37, d, device="cuda", generator=gen) * 6.3
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        normed = rms_norm(x, w, 1e-6)
        expected = apply_rope(normed, cos, sin).float()
        got = norm_rope_triton(x, w, cos, sin, 1e-6).float()
        assert (got - expected).abs().max() <= 2**-5 * normed.float().abs().max(), d


def test_fused_moe_matches_grouped_mm_on_gpu():
    """Same products as torch._grouped_mm with float32 accumulation: within bf16 rounding (relative L2 < 1%), for
    every tile bucket of the full-size shapes (256 to 8192 tokens: 16 to 512 assignments per expert, from 128 on
    with 2 to 4 programs sharing an expert's passes) and for odd small shapes."""
    from dgemma.kernels.fused_moe import fused_moe_triton
    from dgemma.model.moe import experts_grouped

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, h, i, e, k in [(256, 2816, 704, 128, 8), (1024, 2816, 704, 128, 8), (2048, 2816, 704, 128, 8),
                          (4096, 2816, 704, 128, 8), (8192, 2816, 704, 128, 8),
                          (37, 64, 32, 8, 2), (300, 200, 48, 16, 4)]:
        x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
        gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
        down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(torch.bfloat16)
        probs = torch.randn(n, e, device="cuda", generator=gen).softmax(-1)
        weights, experts = torch.topk(probs, k)
        expected = experts_grouped(x, weights, experts, gate_up, down).float()
        got = fused_moe_triton(x, weights, experts, gate_up, down).float()
        assert rel_err(got, expected) < 1e-2, (n, h, i, e, k, rel_err(got, expected))


def test_fused_moe_with_a_program_per_assignment_matches_the_grouped_kernels_on_gpu(monkeypatch):
    """`DIRECT_MAX_ASSIGNMENTS` (decoded tokens): 1 and 4 tokens of the released expert shapes, each assignment in its
    own program, give the grouped kernels' rows. Each row's products are the same instructions whichever rows share
    its 16-row tile, so they should agree bit for bit; the bound allows one bf16 rounding."""
    from dgemma.kernels import fused_moe

    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i, e, k = 2816, 704, 128, 8
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(torch.bfloat16)
    for n in (1, 4):
        x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
        weights, experts = torch.topk(torch.randn(n, e, device="cuda", generator=gen).softmax(-1), k)
        experts[1:, :2] = experts[0, :2]  # tokens sharing experts: their weights are read once per assignment
        monkeypatch.setattr(fused_moe, "DIRECT_MAX_ASSIGNMENTS", 0)
        grouped = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, combine=False).float()
        monkeypatch.setattr(fused_moe, "DIRECT_MAX_ASSIGNMENTS", n * k)
        direct = fused_moe.fused_moe_triton(x, weights, experts, gate_up, down, combine=False).float()
        assert rel_err(direct, grouped) < 2**-9, (n, rel_err(direct, grouped))


def test_fused_moe_tma_loads_give_the_pointer_loads_rows_on_gpu(monkeypatch):
    """`TMA` (`moe_tiles.TMA_*_FROM`, off by default): the weight tiles and the down product's rows copied by the
    tensor-memory accelerator give the rows the pointer loads give, at the released shapes for every tile bucket (a
    decoded token through the direct path, 1 to 32 canvases with splits and tails) and in FP8. The same products in
    the same order, so they should agree bit for bit; the bound allows one bf16 rounding."""
    from dgemma.kernels import fused_moe
    from dgemma.kernels.moe_tiles import tiles_for
    from dgemma.model.fp8 import quantize_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i, e, k = 2816, 704, 128, 8
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(torch.bfloat16)
    (g8, gs), (d8, ds) = quantize_rows(gate_up), quantize_rows(down)
    for n in (1, 256, 1024, 2048, 8192):
        x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
        weights, experts = torch.topk(torch.randn(n, e, device="cuda", generator=gen).softmax(-1), k)
        direct = n * k <= fused_moe.DIRECT_MAX_ASSIGNMENTS
        for label, gu, dn, scales in (("bf16", gate_up, down, None), ("fp8", g8, d8, (gs, ds))):
            tiles = tiles_for(n * k, e, fp8=scales is not None, direct=direct)
            plain = fused_moe.fused_moe_triton(x, weights, experts, gu, dn, *tiles, scales=scales,
                                               combine=False).float()
            tma = fused_moe.fused_moe_triton(x, weights, experts, gu, dn, *(dict(t, TMA=True) for t in tiles),
                                             scales=scales, combine=False).float()
            assert rel_err(tma, plain) < 2**-9, (n, label, rel_err(tma, plain), torch.equal(tma, plain))


def test_fused_moe_with_fp8_weights_matches_the_dequantized_experts_on_gpu():
    """FP8 weights widened in the kernel and scaled per row compute the dequantized weights' products: within bf16
    rounding of torch._grouped_mm over the dequantized bf16 weights (relative L2 < 1%), for the small-load and the
    split 128-row tiles; and the experts stay within e4m3's rounding of the bf16 weights (tests/test_fp8.py says why
    10%)."""
    from dgemma.kernels.fused_moe import fused_moe_triton
    from dgemma.kernels.moe_tiles import tiles_for
    from dgemma.model.fp8 import dequantize_rows, quantize_rows
    from dgemma.model.moe import experts_grouped

    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i, e, k = 2816, 704, 128, 8
    gate_up = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
    down = (torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5).to(torch.bfloat16)
    (g8, gs), (d8, ds) = quantize_rows(gate_up), quantize_rows(down)
    g_deq, d_deq = dequantize_rows(g8, gs, torch.bfloat16), dequantize_rows(d8, ds, torch.bfloat16)
    for n in (256, 2048, 8192):
        x = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
        weights, experts = torch.topk(torch.randn(n, e, device="cuda", generator=gen).softmax(-1), k)
        expected = experts_grouped(x, weights, experts, g_deq, d_deq).float()
        got = fused_moe_triton(x, weights, experts, g8, d8, scales=(gs, ds)).float()
        assert rel_err(got, expected) < 1e-2, (n, rel_err(got, expected))
        full = experts_grouped(x, weights, experts, gate_up, down).float()
        assert rel_err(got, full) < 0.1, (n, rel_err(got, full))
        swapped = [dict(t, SWAP_AB=True) for t in tiles_for(n * k, e, fp8=True)]  # weights as the first operand
        got = fused_moe_triton(x, weights, experts, g8, d8, *swapped, scales=(gs, ds)).float()
        assert rel_err(got, expected) < 1e-2, (n, "SWAP_AB", rel_err(got, expected))


def test_combine_kernel_matches_the_batched_matmul_it_replaced_on_gpu():
    """bf16 rows, float32 weights rounded to bf16, float32 sums: the batched matmul's result up to the order of
    K = 8 float32 additions, so at most one bf16 rounding step apart."""
    from dgemma.kernels.fused_moe import combine_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (256, 2048):
        rows = torch.randn(n * 8, 2816, device="cuda", generator=gen).to(torch.bfloat16)
        weights = torch.rand(n, 8, device="cuda", generator=gen)
        expected = torch.bmm(weights.to(torch.bfloat16)[:, None, :], rows.view(n, 8, 2816))[:, 0].float()
        got = combine_triton(rows, weights).float()
        assert ((got - expected).abs() <= 2**-7 * expected.abs() + 1e-6).all(), n


def test_routing_and_residual_norm_kernels_match_eager_on_gpu():
    """The released shapes (H 2816, top-8 of 128 experts, 256 tokens), bf16. Grouping is the stable sort exactly;
    routing picks the same experts (a bf16 router ties two experts on a few rows at most) with float32 weights
    within float32 rounding; the residual norms round where the eager path rounds, so they differ from it only
    through the order of each row's sum of squares: at most one bf16 ulp, on a few elements."""
    import copy

    from dgemma.kernels.routing import group_by_expert_triton
    from dgemma.model.moe import group_by_expert

    config = preset("26b-a4b")
    layer = build_random_model(replace(config, layer_types=[SLIDING]), "bfloat16", "cuda", seed=1,
                               scale=InitScale(embed_std=0.02, perturb=0.1)).layers[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = config.hidden_size
    x, attn, dense, routed = (torch.randn(1, 256, h, device="cuda", generator=gen).to(torch.bfloat16)
                              for _ in range(4))
    eager_layer = copy.deepcopy(layer)
    eager_layer.kernel_devices = eager_layer.router.kernel_devices = ()
    with torch.no_grad():
        fused_out = layer.attention_residual(x, attn)
        eager_out = eager_layer.attention_residual(x, attn)
        fused_out += (layer.layer_output(fused_out[0], dense, routed, layer.layer_scalar),)
        eager_out += (eager_layer.layer_output(eager_out[0], dense, routed, layer.layer_scalar),)
        for got, want in zip(fused_out, eager_out):
            ulp = 2.0**-7 * want.float().abs()
            assert ((got.float() - want.float()).abs() <= ulp).all()
            assert (got != want).float().mean() < 0.01
        z = fused_out[2].reshape(-1, h)
        weights, experts = layer.router(z)
        eager_weights, eager_experts = eager_layer.router(z)
    # bf16 router logits tie often (8 bits): the kernel takes the lower expert id among equal probabilities, which
    # torch.topk does not promise. The chosen probabilities must be the same; the weights where the ids are.
    probs = torch.softmax(layer.router.proj(z), dim=-1, dtype=torch.float32)  # [N, E]
    assert torch.equal(probs.gather(1, experts), probs.gather(1, eager_experts))
    same = (experts == eager_experts).all(-1)
    assert rel_err(weights[same], eager_weights[same]) < 1e-5
    for got, want in zip(group_by_expert_triton(experts, config.num_experts),
                         group_by_expert(experts, config.num_experts)):
        assert torch.equal(got, want)


# The fused kernels in the model (dgemma.model.moe.use_fused_moe, dgemma.model.layers.use_fused_norm_rope decide).

TINY = (preset("tiny"), InitScale(embed_std=1.0, perturb=0.1))
# Two layers of the released shapes: head_dim 256 and 512 (proportional RoPE, k-as-v), 128 experts top-8.
SLICE = (replace(preset("26b-a4b"), layer_types=[SLIDING, FULL]), InitScale(embed_std=0.02, perturb=0.1))


@pytest.mark.parametrize("config,scale", [TINY, SLICE], ids=["tiny", "26b-a4b-slice"])
def test_attention_and_experts_with_fused_kernels_match_eager_on_gpu(config, scale, monkeypatch):
    """One module at a time, same inputs, kernel off then on. bfloat16 keeps 8 bits: the kernels round at other
    points than the eager path (once where it rounds up to three times), so outputs differ by about one bf16 eps
    (a CPU emulation of the kernels' rounding on the tiny model gave 0.15 to 0.9 eps in relative L2, and the
    float16 interpreter run in tests/test_kernel_wiring.py agrees with it). Four eps leaves room; a wrong norm,
    rotation, gather or scatter gives errors of order 1."""
    model = build_random_model(config, "bfloat16", "cuda", seed=1, scale=scale)
    calls = spy_on_kernels(monkeypatch)
    tol = 4 * torch.finfo(torch.bfloat16).eps
    gen = torch.Generator().manual_seed(0)
    h = config.hidden_size
    for layer in (config.layer_types.index(SLIDING), config.layer_types.index(FULL)):
        x = torch.randn(1, 100, h, generator=gen).to("cuda", torch.bfloat16)
        (out_eager, keys_eager), (out_fused, keys_fused) = attention_kernel_off_and_on(model, layer, x)
        assert rel_err(keys_fused, keys_eager) < tol, (layer, rel_err(keys_fused, keys_eager))
        assert rel_err(out_fused, out_eager) < tol, (layer, rel_err(out_fused, out_eager))
    # 16 to 512 assignments per expert: each tile set, up to the largest call the kernel takes.
    for per_expert in (16, 64, 128, 256, FUSED_MOE_MAX_ASSIGNMENTS_PER_EXPERT):
        n = per_expert * config.num_experts // config.top_k_experts
        x = torch.randn(n, h, generator=gen).to("cuda", torch.bfloat16)
        eager, fused = experts_kernel_off_and_on(model, 0, x)
        assert rel_err(fused, eager) < tol, (per_expert, rel_err(fused, eager))
    # Each layer's q, k and v in one launch (FUSED_QKV_NORM); the attention of a head_dim-512 full layer.
    assert calls == {"norm_rope": 0, "qkv_norm_rope": 2, "fused_moe": 5, "route_top_k": 5, "attention_residual": 0,
                     "layer_output": 0, "gelu_mul": 0, "cache_attention": int(config.full.head_dim > 256)}


@pytest.mark.parametrize("config,scale,prefix,max_write", [(*TINY, 200, 64), (*SLICE, 1500, 256)],
                         ids=["tiny", "26b-a4b-slice"])
def test_canvas_attention_over_a_sliding_ring_matches_masked_attention_on_gpu(config, scale, prefix, max_write,
                                                                             monkeypatch):
    """Long contexts keep only a ring of W - 1 + max_write slots on sliding layers, where a row's window may wrap
    around the ring's end. `cache_attention` maps each visible position to its slot instead of masking the whole
    ring; ragged rows (two prefixes) check the per-row bounds. Same tolerance as the module tests above."""
    model = build_random_model(config, "bfloat16", "cuda", seed=1, scale=scale)
    cache, attend = ring_canvas(model, prefix, max_write)
    assert cache.ring and cache.sliding_slots < prefix
    calls = spy_on_kernels(monkeypatch)
    outs = [attend(()), attend(("cuda",))]
    assert calls["cache_attention"] == 1
    assert rel_err(outs[1], outs[0]) < 4 * torch.finfo(torch.bfloat16).eps, rel_err(outs[1], outs[0])


@pytest.mark.parametrize("config,scale,prompt_len,draws", [(*TINY, 100, 8), (*SLICE, 200, 2)],
                         ids=["tiny", "26b-a4b-slice"])
def test_model_with_fused_kernels_is_as_accurate_as_eager_on_gpu(config, scale, prompt_len, draws, monkeypatch):
    """A whole bf16 encode + decode with the kernels and without, both against float32 on the same weights. Random
    models amplify rounding (and bf16 flips near-tied top-8 routing choices), so the two bf16 runs are compared
    through their distance to float32, with the bounds `compare` uses against the reference's own bf16 run.

    The argmax agreement is pooled over `draws` prompts: on the tiny random model bf16 alone moves ~45% of the
    argmaxes, so one 32-token canvas has a binomial standard error of ~0.09 and two correct paths differed by 3
    tokens in 32 on an H200. Over 8 canvases (256 tokens) the error is ~0.03: a slack of 0.1 is 3 errors, and a
    broken kernel agrees on almost no token."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (1, prompt_len), generator=gen) for _ in range(draws)]
    canvases = [torch.randint(0, config.vocab_size, (1, config.canvas_length), generator=gen) for _ in range(draws)]
    soft = [3 * torch.randn(1, config.canvas_length, config.vocab_size, generator=gen) for _ in range(draws)]

    def logits_of(model) -> torch.Tensor:  # [draws, C, V]
        return torch.cat([run(model, p, c, s)[1] for p, c, s in zip(prompts, canvases, soft)])

    model = build_random_model(config, "float32", "cuda", seed=1, scale=scale)
    set_kernel_devices(model, ())
    truth = logits_of(model)
    model = model.to(torch.bfloat16)
    model.reset_buffers(torch.device("cuda"))
    eager = logits_of(model)
    calls = spy_on_kernels(monkeypatch)
    set_kernel_devices(model, ("cuda",))
    model.prepare_inference()  # as an LLM runs it
    fused = logits_of(model)
    # Every layer's q, k and v in both passes (one launch: FUSED_QKV_NORM); the experts wherever a pass has <= 32
    # assignments per expert (all here); every layer's routing, residual norms and dense MLP activation; the attention
    # of every full layer of head_dim 512.
    per_pass = 2 * config.num_layers * draws
    full_attention = 2 * config.layer_types.count(FULL) * draws if config.full.head_dim > 256 else 0
    assert calls == {"norm_rope": 0, "qkv_norm_rope": per_pass, "fused_moe": per_pass, "route_top_k": per_pass,
                     "attention_residual": per_pass, "layer_output": per_pass, "gelu_mul": per_pass,
                     "cache_attention": full_attention}, calls
    report = {"fused": rel_err(fused, truth), "eager": rel_err(eager, truth),
              "fused_argmax_agree": argmax_agreement(fused, truth), "eager_argmax_agree": argmax_agreement(eager, truth)}
    print(config.num_layers, "layers:", report)
    assert report["fused"] <= 1.25 * report["eager"] + 2e-3, report
    assert report["fused_argmax_agree"] >= report["eager_argmax_agree"] - 0.1, report


@pytest.mark.parametrize("config,scale", [TINY, SLICE], ids=["tiny", "26b-a4b-slice"])
def test_decoder_attention_without_a_mask_matches_masked_attention_on_gpu(config, scale, monkeypatch):
    """Flash attention over each row's key range (`canvas_attention`) against masked SDPA, bf16, one sliding layer.
    Ragged prefixes on both sides of the window (the window's start moves), rows not contiguous, a row at
    prefix 0. Both are exact attention in bf16 with float32 softmax: they differ by rounding (4 bf16 eps in
    relative L2, as for the other kernels); a wrong offset or key count is an error of order 1."""
    from dgemma.model import attention

    calls = {}
    count_calls(monkeypatch, calls, attention, "canvas_attention", "n")
    model = build_random_model(config, "bfloat16", "cuda", seed=1, scale=scale)
    layer = config.layer_types.index(SLIDING)
    w = config.sliding_window
    rows, prefixes = [3, 0, 2], [w + 37, 5, 0 if w > 64 else 2 * w]
    masked, flash = decoder_attention_kernel_off_and_on(model, layer, rows, prefixes)
    assert calls["n"] == 1
    assert rel_err(flash, masked) < 4 * torch.finfo(torch.bfloat16).eps, rel_err(flash, masked)


@pytest.mark.parametrize("config,scale", [TINY, SLICE], ids=["tiny", "26b-a4b-slice"])
def test_decoded_token_attention_through_the_split_kernel_matches_masked_attention_on_gpu(config, scale,
                                                                                          monkeypatch):
    """Autoregressive mode: one token per row attends through `cache_attention` with its key range split over
    many programs (flash decoding), on a sliding and a full layer (head_dim 512 in the slice), ragged prefixes
    on both sides of the window, rows not contiguous. Same tolerance as the module tests: both are exact
    attention in bf16 with a float32 softmax; a wrong slice, merge or bound is an error of order 1."""
    model = build_random_model(config, "bfloat16", "cuda", seed=1, scale=scale)
    calls = spy_on_kernels(monkeypatch)
    w = config.sliding_window
    for layer in (config.layer_types.index(SLIDING), config.layer_types.index(FULL)):
        masked, kernel = decode_attention_kernel_off_and_on(model, layer, [3, 0, 2], [w + 37, 5, 3 * w])
        assert rel_err(kernel, masked) < 4 * torch.finfo(torch.bfloat16).eps, (layer, rel_err(kernel, masked))
    assert calls["cache_attention"] == 2


# A committed canvas encoded by the next canvas's first denoising forward (tests/test_fused_canvas_encode.py on CPU).


def test_cuda_graph_engine_fuses_canvas_encodes_and_stays_reproducible():
    """Three requests in lock-step start their second and third canvases with the fused graph.

    Tokens are not compared with the unfused engine beyond the first canvas: in bf16 the fused forward rounds
    differently (matmuls over 2C rows may pick other kernels, and masked attention replaces the mask-free canvas
    attention on sliding layers), a random model amplifies rounding (bf16 alone moves ~45% of its argmaxes away
    from float32), and one flipped token changes every later step of a generation. What must agree exactly: the
    first canvas, which no fused step touches, and a fused run with itself. The next test checks the fused step's
    accuracy against float32."""
    from dgemma.engine.engine import Engine
    from dgemma.engine.request import Request
    from dgemma.engine.scheduler import SchedulerConfig
    from dgemma.sampling.params import SamplingParams

    model = build_random_model("tiny", "bfloat16", "cuda", seed=3, scale=InitScale(embed_std=3.0, perturb=0.1))
    params = SamplingParams(max_new_tokens=96, max_denoising_steps=8, ignore_eos=True, adaptive_stopping=False)

    def generate(fuse: bool):
        engine = Engine(model, SchedulerConfig(max_num_seqs=4, max_model_len=512, canvas_length=32),
                        fuse_canvas_encode=fuse)
        assert engine.canvas_encoder is not None and engine.fuse_canvas_encode == fuse
        reqs = [Request(str(i), list(range(5 + i, 45 + i)), params.with_overrides(seed=i)) for i in range(3)]
        for r in reqs:
            engine.add_request(r)
        fused_steps = []
        while engine.has_work:
            engine.step()
            if engine.last_step.fused_encodes:
                fused_steps.append(engine.last_step.fused_encodes)
        assert all(len(r.output_ids) == 96 and r.stats.forwards_per_canvas == [8, 8, 8] for r in reqs)
        return [r.output_ids for r in reqs], fused_steps

    first, fused_steps = generate(True)
    again, _ = generate(True)
    plain, plain_fused_steps = generate(False)
    assert fused_steps == [3, 3] and plain_fused_steps == []
    assert first == again
    assert [out[:32] for out in first] == [out[:32] for out in plain]


def test_fused_graph_step_is_as_accurate_as_the_encoder_and_denoiser_graphs_on_gpu():
    """The first step of a canvas after a committed one, replayed as CUDA graphs in bf16: the fused graph, and the
    encoder graph then the denoiser graph, each against float32 (same weights, eager). As for the fused kernels,
    the two bf16 paths are compared through their distance to float32: the committed tokens' keys in the cache
    (relative L2) and the step's argmax, pooled over 4 draws of 3 rows (384 positions: a binomial standard error
    of ~0.025, so a slack of 0.1 is 4 errors; a wrong scalar, bound or row gives near-random argmaxes)."""
    from dgemma.engine.cuda_graphs import GraphedDenoiser, GraphedEncoder
    from dgemma.model.attention import AttentionBatch
    from dgemma.model.kv_cache import KVCache

    config, scale = TINY
    c, w, device = config.canvas_length, config.sliding_window, torch.device("cuda")
    rows = [0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4):
        prefixes = torch.randint(w + 1, 3 * w, (3,), generator=gen).tolist()  # longer than the window
        prompts = [torch.randint(3, config.vocab_size, (p,), generator=gen) for p in prefixes]
        committed = torch.randint(3, config.vocab_size, (3, c), generator=gen)  # [3, C]
        canvas = torch.randint(0, config.vocab_size, (3, c), generator=gen)  # [3, C]
        draws.append((prefixes, prompts, committed, canvas))
    capacity = 3 * w + 2 * c

    def encode_prompts(model, cache, prompts):
        for row, ids in zip(rows, prompts):
            model.encode(ids[None].to(device), AttentionBatch.for_encoder([row], [0], [len(ids)], w, cache), cache)

    def committed_keys(cache, prefixes) -> torch.Tensor:  # every layer's keys of the committed canvases, flat
        return torch.cat([cache.keys[layer][row, p : p + c].float().flatten()
                          for layer in range(config.num_layers) for row, p in zip(rows, prefixes)])

    model = build_random_model(config, "float32", "cuda", seed=1, scale=scale)
    set_kernel_devices(model, ())
    truth = []
    with torch.no_grad():
        for prefixes, prompts, committed, canvas in draws:
            cache = KVCache(config, 3, capacity, torch.float32, device)
            encode_prompts(model, cache, prompts)
            model.encode(committed.to(device), AttentionBatch.for_encoder(rows, prefixes, [c] * 3, w, cache), cache)
            batch = AttentionBatch.for_decoder(rows, [p + c for p in prefixes], c, w, cache)
            truth.append((model.decode(canvas.to(device), batch, cache).argmax(-1), committed_keys(cache, prefixes)))
    model = model.to(torch.bfloat16)
    model.reset_buffers(device)
    set_kernel_devices(model, ("cuda",))
    knobs = [(1.0, 0.1, 0.0, 7 + row, 1, 1) for row in rows]  # greedy
    report = {}
    with torch.no_grad():  # as the engine's steps run (the kernels serve inference only)
        for fused in (False, True):
            cache = KVCache(config, 3, capacity, torch.bfloat16, device)
            denoiser = GraphedDenoiser(model, cache, [3], fuse_canvas_encode=fused)
            encoder = GraphedEncoder(model, cache, c, [3])
            agree, errors = [], []
            for (prefixes, prompts, committed, canvas), (truth_argmax, truth_keys) in zip(draws, truth):
                encode_prompts(model, cache, prompts)
                if not fused:
                    encoder.run(rows, committed, prefixes)
                for row, p in zip(rows, prefixes):
                    denoiser.start_canvas(row, p + c, torch.Generator(device=device).manual_seed(row))
                denoiser.canvas[:3].copy_(canvas)
                denoiser.step(rows, knobs, committed if fused else None)
                agree.append((denoiser.argmax[:3] == truth_argmax).float().mean().item())
                errors.append(rel_err(committed_keys(cache, prefixes), truth_keys))
            report["fused" if fused else "separate"] = {"argmax_agree": sum(agree) / len(agree),
                                                        "keys_rel_err": max(errors)}
    print(report)
    fused, separate = report["fused"], report["separate"]
    assert fused["keys_rel_err"] <= 1.25 * separate["keys_rel_err"] + 2e-3, report
    assert fused["argmax_agree"] >= separate["argmax_agree"] - 0.1, report


@pytest.mark.parametrize("backend,scope", [(None, "objective"), ("inductor", "objective"), ("inductor", "layers")],
                         ids=["eager", "compiled", "compiled_layers"])
def test_captured_training_step_matches_the_eager_step_on_gpu(monkeypatch, backend, scope):
    """The graphed forward+backward (dgemma/train/step_graphs.py), compiled (`--compile objective` or `layers`) or
    not, gives the eager loss and gradients, for every batch replayed into a shape's buffers and across shapes. The
    noise is fixed (a static tensor the graph reads), so both sides see the same corrupted canvases."""
    import copy
    import random

    import dgemma.train.objective as objective
    from dgemma.train.dataset import collate, pad_batch
    from dgemma.train.step_graphs import GraphedLossStep
    from dgemma.train.trainer import model_preset, training_objective, use_dense_experts

    model = build_random_model(model_preset("micro", 64, [1]), "float32", "cuda", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    use_dense_experts(model)
    model.set_kernel_devices(())
    c = model.config.canvas_length
    uniforms = {}

    def fixed_uniforms(rows, canvas_length, device, generator=None):
        if rows not in uniforms:  # made before any capture (the warm-up pass comes first), read by the graph
            gen = torch.Generator().manual_seed(rows)
            uniforms[rows] = torch.rand(rows, 3 + 2 * canvas_length, generator=gen).to(device)
        return uniforms[rows]  # [rows, 3 + 2C], the same numbers for both sides

    monkeypatch.setattr(objective, "row_uniforms", fixed_uniforms)
    reference = copy.deepcopy(model)  # eager: "layers" compiles the model's own layers
    params, reference_params = list(model.parameters()), list(reference.parameters())
    cfg = objective.ObjectiveConfig()
    loss = training_objective(model, cfg, backend, scope)
    step = GraphedLossStep(params, lambda b: loss(b, None), lambda: torch.autocast("cuda", enabled=False),
                           capture=True)
    rng = random.Random(0)
    for shape in ((8, 32), (8, 32), (4, 64), (8, 32), (4, 64)):
        rows = [([2] + [rng.randrange(3, 64) for _ in range(rng.randrange(6, shape[1] - 1))], 3)
                for _ in range(shape[0] - 1)]
        batch = pad_batch(collate(rows, c, 0, rng), *shape, 0)
        model.zero_grad(set_to_none=True)
        got = step.step(batch, torch.device("cuda"))
        got_grads = [p.grad.clone() for p in params]
        reference.zero_grad(set_to_none=True)
        want = objective.block_diffusion_loss(reference, batch.to("cuda"), cfg)
        want.loss.backward()
        assert rel_err(got.loss, want.loss.detach()) < 1e-4
        for g, p in zip(got_grads, reference_params):
            assert (g - p.grad).abs().max() <= 1e-3 * p.grad.abs().max() + 1e-6
    assert sorted(step.shapes) == [(4, 64), (8, 32)]


def test_compiled_captured_training_step_draws_new_noise_at_every_replay():
    """With `--compile` the objective's torch.rand runs inside the captured graph: each replay must corrupt the
    canvas anew (a graph that froze its noise would train on one corruption per batch shape)."""
    import random

    from dgemma.train.dataset import collate
    from dgemma.train.objective import ObjectiveConfig
    from dgemma.train.step_graphs import GraphedLossStep
    from dgemma.train.trainer import model_preset, training_objective, use_dense_experts

    model = build_random_model(model_preset("micro", 64, [1]), "float32", "cuda", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    use_dense_experts(model)
    model.set_kernel_devices(())
    loss = training_objective(model, ObjectiveConfig(), "inductor")
    step = GraphedLossStep(list(model.parameters()), lambda b: loss(b, None),
                           lambda: torch.autocast("cuda", enabled=False), capture=True)
    rng = random.Random(0)
    batch = collate([([2] + [rng.randrange(3, 64) for _ in range(30)], 5) for _ in range(8)], 16, 0, rng)
    step.prepare(batch, torch.device("cuda"))
    noise = [step.step(batch, torch.device("cuda")).noise for _ in range(3)]
    assert step.shapes[(8, 31)].graph is not None
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[1], noise[2])


@pytest.mark.parametrize("noise_samples", [1, 2])
def test_training_objective_traces_as_one_graph_on_gpu(noise_samples):
    """`--compile` traces the whole objective as one graph on CUDA, as on a CPU: a graph break splits the compiled
    step into pieces, each compiled and guarded separately. CUDA-only code is where breaks hid: the KV cache's
    free-memory check (a driver query) and copy.copy of the cache split one step into ten graphs on an H100."""
    import random

    from dgemma.train.dataset import collate
    from dgemma.train.objective import ObjectiveConfig, block_diffusion_loss
    from dgemma.train.trainer import MasterWeights, model_preset, use_dense_experts

    model = build_random_model(model_preset("micro", 64, [1]), "float32", "cuda", seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    use_dense_experts(model)
    model.set_kernel_devices(())
    MasterWeights(model, torch.bfloat16)  # the trainer's bf16 model with float32 master weights
    rng = random.Random(0)
    batch = collate([([2] + [rng.randrange(3, 64) for _ in range(40)], 8) for _ in range(8)], 16, 0, rng)
    cfg = ObjectiveConfig(noise_samples=noise_samples)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(lambda b: block_diffusion_loss(model, b, cfg, None))(batch.to("cuda"))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
