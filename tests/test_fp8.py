"""FP8 expert weights (`--quantization fp8`): what is stored, what every path computes, and how far it is from the
full-precision model.

The numeric kernel test runs the fused MoE kernel on a CPU through the Triton interpreter (TRITON_INTERPRET=1, in
float16: the interpreter cannot check bfloat16); tests/test_gpu.py checks bfloat16 at full-size shapes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from kernel_wiring import interpreted, rel_err

from dgemma.checkpoint.loader import load_model
from dgemma.checkpoint.random_init import InitScale, build_random_model
from dgemma.errors import ConfigError
from dgemma.model.fp8 import FP8, FP8_MAX, dequantize_rows, quantize_rows
from dgemma.model.moe import experts_loop


# e4m3 keeps 3 mantissa bits: rounding moves a normal number by at most half a step, 2^-4 of itself. Below 2^-6
# (times the row's scale) the numbers are subnormal, spaced 2^-9 apart: at most 2^-10 of the scale there.
HALF_STEP = 2.0**-4
HALF_SUBNORMAL_STEP = 2.0**-10


def expert_weights(e=4, h=64, i=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) * h**-0.5  # [E, 2I, H]
    down = torch.randn(e, h, i, generator=gen) * i**-0.5  # [E, H, I]
    return gate_up, down


def test_each_quantized_weight_is_within_half_an_e4m3_step_of_itself():
    w = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 40)[:, None]
    w8, scale = quantize_rows(w)
    assert w8.dtype == FP8 and w8.shape == w.shape and scale.shape == (3, 40) and scale.dtype == torch.float32
    back = dequantize_rows(w8, scale, torch.float32)
    bound = HALF_STEP * w.abs() + HALF_SUBNORMAL_STEP * scale[..., None]
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()


def test_each_rows_largest_magnitude_becomes_the_largest_e4m3_number_and_zero_rows_stay_zero():
    w = torch.zeros(1, 3, 8)
    w[0, 0] = torch.tensor([1.0, -3.0, 0.5, 2.0, 0, 0, 0, 0.1])
    w[0, 1] = 1e-30  # tiny but not zero: still a finite scale
    w8, scale = quantize_rows(w)
    assert w8.float()[0, 0].abs().max() == FP8_MAX and w8.float()[0, 0, 1] == -FP8_MAX
    assert torch.isfinite(w8.float()).all() and torch.isfinite(scale).all()
    assert scale[0, 2] == 1.0 and (w8.float()[0, 2] == 0).all()  # the all-zero row


def test_quantize_rows_names_the_shape_it_needs():
    with pytest.raises(ValueError, match=r"expects \[experts, out, in\], got \(4, 4\)"):
        quantize_rows(torch.zeros(4, 4))


@pytest.fixture(scope="module")
def pair():
    """The same random tiny model in float32 and with FP8 experts."""
    scale = InitScale(embed_std=1.0, perturb=0.1)
    full = build_random_model("tiny", "float32", "cpu", seed=1, scale=scale)
    fp8 = build_random_model("tiny", "float32", "cpu", seed=1, scale=scale, quantization="fp8")
    return full, fp8


def test_fp8_experts_keep_the_checkpoint_layout_in_half_the_expert_bytes(pair):
    full, fp8 = pair
    a, b = full.state_dict(), fp8.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)  # scales are not saved
    for layer_full, layer_fp8 in zip(full.layers, fp8.layers):
        experts = layer_fp8.experts
        assert experts.quantized and experts.gate_up_proj.dtype == FP8 and experts.down_proj.dtype == FP8
        assert experts.gate_up_scale.shape == experts.gate_up_proj.shape[:2]
        assert experts.down_scale.shape == experts.down_proj.shape[:2]
        assert layer_fp8.mlp.gate_proj.weight.dtype == torch.float32  # everything else keeps the model's dtype
        assert not layer_full.experts.quantized


def test_fp8_experts_compute_the_dequantized_weights_function(pair):
    _, fp8 = pair
    experts = fp8.layers[0].experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, fp8.config.hidden_size, generator=gen)
    weights, ids = torch.topk(torch.randn(37, fp8.config.num_experts, generator=gen).softmax(-1), 2)
    gate_up = dequantize_rows(experts.gate_up_proj, experts.gate_up_scale, torch.float32)
    down = dequantize_rows(experts.down_proj, experts.down_scale, torch.float32)
    with torch.no_grad():
        assert torch.equal(experts(x, weights, ids), experts_loop(x, weights, ids, gate_up, down))


def test_fp8_experts_differ_from_full_precision_as_much_as_e4m3_rounding_allows():
    """Relative rounding of up to 2^-4 per weight, spread evenly, is ~2^-4 / sqrt(3) = 3.6% RMS for one product;
    the experts chain two (gate/up, then down), so ~5%. The bound leaves twice that; a wrong scale or layout would
    be off by far more."""
    gate_up, down = expert_weights()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 64, generator=gen)
    weights, ids = torch.topk(torch.randn(50, 4, generator=gen).softmax(-1), 2)
    (g8, gs), (d8, ds) = quantize_rows(gate_up), quantize_rows(down)
    full = experts_loop(x, weights, ids, gate_up, down)
    fp8 = experts_loop(x, weights, ids, dequantize_rows(g8, gs, torch.float32), dequantize_rows(d8, ds, torch.float32))
    assert 0 < rel_err(fp8, full) < 0.1


@interpreted
@pytest.mark.parametrize("swap", [False, True])  # SWAP_AB: the weight tile as the product's first operand
@pytest.mark.parametrize("n", [37, 250])  # the small-load tiles; 128-row tiles
def test_interpreted_fused_moe_reads_fp8_weights_and_their_scales(n, swap):
    from dgemma.kernels.fused_moe import fused_moe_triton
    from dgemma.kernels.moe_tiles import tiles_for

    gate_up, down = expert_weights(seed=n)
    (g8, gs), (d8, ds) = quantize_rows(gate_up), quantize_rows(down)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 64, generator=gen).half()
    weights, ids = torch.topk(torch.randn(n, 4, generator=gen).softmax(-1), 2)
    expected = experts_loop(x.float(), weights, ids, dequantize_rows(g8, gs, torch.float32),
                            dequantize_rows(d8, ds, torch.float32))
    tiles = [dict(t, SWAP_AB=swap, TAIL_M=32) for t in tiles_for(n * 2, 4, fp8=True)]  # a tail pass where it fits
    got = fused_moe_triton(x, weights, ids, g8, d8, *tiles, scales=(gs, ds))
    assert got.dtype == torch.float16
    assert rel_err(got.float(), expected) < 4 * torch.finfo(torch.float16).eps  # float16 rounding only


def test_fused_moe_refuses_scales_of_the_wrong_shape():
    pytest.importorskip("triton")
    from dgemma.kernels.fused_moe import fused_moe_triton

    gate_up, down = expert_weights()
    (g8, gs), (d8, ds) = quantize_rows(gate_up), quantize_rows(down)
    x = torch.zeros(5, 64, dtype=torch.float16)
    ids = torch.zeros(5, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"FP8 scales must be \[4, 64\] and \[4, 64\]"):
        fused_moe_triton(x, torch.zeros(5, 2), ids, g8, d8, scales=(gs[:, :3], ds))


def test_loading_with_fp8_quantizes_the_experts_and_generates(tiny_checkpoint):
    from dgemma.llm import LLM

    model, _, report = load_model(tiny_checkpoint, "float32", "cpu", quantization="fp8")
    full, _, full_report = load_model(tiny_checkpoint, "float32", "cpu")
    assert all(layer.experts.gate_up_proj.dtype == FP8 for layer in model.layers)
    expert_params = sum(layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel() for layer in model.layers)
    assert full_report.weight_bytes - report.weight_bytes == 3 * expert_params  # 4 bytes -> 1 byte each
    llm = LLM(tiny_checkpoint, quantization="fp8")
    [result] = llm.generate([[2, 10, 11, 12]], max_new_tokens=16, seed=0, ignore_eos=True)
    assert len(result.token_ids) == 16


def test_an_unknown_quantization_is_refused_by_name(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"quantization must be one of \['fp8'\] or none, got 'int4'"):
        load_model(tiny_checkpoint, "float32", "cpu", quantization="int4")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        build_random_model("tiny", "float32", "cpu", quantization="fp4")


def test_fp8_is_refused_on_a_gpu_whose_kernels_cannot_read_it(monkeypatch):
    import dgemma.model.fp8 as fp8

    monkeypatch.setattr(fp8, "fp8_kernel_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"compute capability 8.9 or later .* NVIDIA A100-SXM4-80GB is 8.0"):
        fp8.check_quantization("fp8", torch.device("cuda"))
    assert fp8.check_quantization("none", torch.device("cuda")) is None


def test_cli_generates_with_fp8_experts_and_refuses_other_schemes(tiny_checkpoint, capsys):
    from dgemma.cli import main

    assert main(["generate", "--model", str(tiny_checkpoint), "Hello", "--quantization", "fp8", "--max-new-tokens",
                 "8", "--seed", "0", "--json"]) == 0
    assert '"token_ids"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_checkpoint), "Hello", "--quantization", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_bench_refuses_the_reference_comparison_with_fp8_weights(capsys):
    from dgemma.cli import main

    assert main(["bench", "--random-weights", "--preset", "tiny", "--device", "cpu", "--quantization", "fp8",
                 "--compare-reference"]) == 2
    assert "--compare-reference runs the transformers reference on the same weight tensors" in capsys.readouterr().err


def test_bench_counts_fp8_weights_at_one_byte(capsys):
    import json

    from dgemma.cli import main

    args = ["bench", "--random-weights", "--preset", "tiny", "--device", "cpu", "--skip", "steps,prefill,concurrency",
            "--mode", "diffusion"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--quantization", "fp8"]) == 0
    fp8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp8["quantization"] == "fp8" and full["quantization"] == "none"
    assert fp8["weight_gb"] < full["weight_gb"]
    # Each run measures its own copy bandwidth (noisy on a shared CPU): the floor is its weight bytes over that
    # bandwidth, so fewer bytes give a lower floor at any one bandwidth.
    for res in (full, fp8):
        assert res["step_floor_ms"] == pytest.approx(res["weight_gb"] / res["copy_bandwidth_gbps"] * 1e3)
