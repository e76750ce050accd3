"""Loading checkpoints: the happy path, memory, and one specific error per kind of broken checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.checkpoint.loader import load_model
from dgemma.checkpoint.random_init import InitScale, build_random_model, preset, write_random_checkpoint
from dgemma.errors import CheckpointError, ConfigError


@pytest.fixture()
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may break."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


def edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config)
    (path / "config.json").write_text(json.dumps(config))


def test_written_checkpoint_has_the_released_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    assert "model.decoder.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied: stored once
    assert "model.encoder.language_model.layers.0.layer_scalar" in tensors
    full_layer = 5
    assert f"model.decoder.layers.{full_layer}.self_attn.v_proj.weight" not in tensors  # k-as-v on full layers
    assert tensors["model.decoder.layers.0.experts.gate_up_proj"].shape == (8, 64, 64)


def test_loaded_weights_equal_the_built_ones(tiny_checkpoint):
    model, _, report = load_model(tiny_checkpoint, dtype="float32")
    built = build_random_model("tiny", dtype="float32", seed=0, scale=InitScale(embed_std=1.0, perturb=0.1))
    for (name, a), (_, b) in zip(model.named_parameters(), built.named_parameters()):
        assert torch.equal(a, b), name
    assert report.weight_bytes == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_selectable(tiny_checkpoint, dtype):
    model, _, _ = load_model(tiny_checkpoint, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_tied_tensors_are_one_tensor_in_memory(tiny_checkpoint):
    model, _, _ = load_model(tiny_checkpoint, dtype="float32")
    # One embedding serves encoder input, decoder input and the LM head; one set of layers serves both passes.
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(storages) == len(set(storages))
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for t in load_file(tiny_checkpoint / "model.safetensors").values())


def test_sharded_checkpoint_with_index_loads(tmp_path):
    path = write_random_checkpoint(tmp_path / "sharded", "tiny", max_shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _, _ = load_model(path, dtype="float32")
    assert model.config.num_layers == 6


def test_vision_weights_are_skipped_with_a_note(ckpt, caplog):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.encoder.vision_tower.patch_embedder.input_proj.weight"] = torch.zeros(4, 4)
    tensors["model.encoder.embed_vision.embedding_projection.weight"] = torch.zeros(4, 4)
    save_file(tensors, ckpt / "model.safetensors")
    with caplog.at_level("INFO"):
        _, _, report = load_model(ckpt, dtype="float32")
    assert len(report.skipped_vision) == 2
    assert "vision input is not supported yet" in caplog.text


def test_writing_refuses_to_overwrite_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        write_random_checkpoint(tmp_path / "x", "tiny")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary directory left behind


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="fetching it from the Hugging Face Hub failed.*offline"):
        load_model("google/diffusiongemma-26B-A4B-it")


def test_missing_directory_is_named():
    with pytest.raises(CheckpointError, match="no-such-dir: no such checkpoint directory"):
        load_model("./no-such-dir")


@pytest.mark.parametrize("breakage,message", [
    (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
    (lambda p: (p / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    (lambda p: edit_config(p, lambda c: c.update(model_type="llama")),
     r"config\.json: model_type is 'llama'; dgemma loads 'diffusion_gemma'"),
    (lambda p: edit_config(p, lambda c: c.update(architectures=["LlamaForCausalLM"])),
     r"architectures \['LlamaForCausalLM'\] do not include 'DiffusionGemmaForBlockDiffusion'"),
    (lambda p: edit_config(p, lambda c: c["text_config"].update(hidden_size=-4)),
     r"config\.json: config field 'hidden_size' must be a positive integer, got -4"),
    (lambda p: edit_config(p, lambda c: c["text_config"].update(top_k_experts=99)),
     r"'top_k_experts' \(99\) exceeds 'num_experts' \(8\)"),
    (lambda p: edit_config(p, lambda c: c["text_config"].pop("num_experts")), r"text_config\.num_experts is missing"),
    (lambda p: edit_config(p, lambda c: c["text_config"].update(layer_types=["sliding_attention"])),
     r"layer_types has 1 entries for 6 layers"),
    (lambda p: edit_config(p, lambda c: c["text_config"].update(num_attention_heads=3)),
     r"num_attention_heads \(3\) is not a multiple of num_key_value_heads \(2\)"),
    (lambda p: (p / "model.safetensors").unlink(), r"no model\.safetensors or model\.safetensors\.index\.json"),
])
def test_broken_config_or_missing_files_give_specific_errors(ckpt, breakage, message):
    breakage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt, dtype="float32")


def _rewrite(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.decoder.layers.3.router.per_expert_scale"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.decoder\.layers\.3\.router\.per_expert_scale"):
        load_model(ckpt, dtype="float32")


def test_unexpected_tensor_is_named_with_its_file(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.decoder.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.decoder\.layers\.0\.mlp\.extra\.weight"):
        load_model(ckpt, dtype="float32")


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.decoder.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.decoder\.norm\.weight has shape \[63\], expected \[64\]"):
        load_model(ckpt, dtype="float32")


def test_truncated_safetensors_is_detected(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(ckpt, dtype="float32")


def test_corrupt_safetensors_header_is_detected(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(ckpt, dtype="float32")


def test_missing_shard_is_named(tmp_path):
    path = write_random_checkpoint(tmp_path / "sharded", "tiny", max_shard_bytes=200_000)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard missing \(listed in model\.safetensors\.index\.json"):
        load_model(path, dtype="float32")


def test_unknown_dtype_and_unavailable_device_are_rejected(tiny_checkpoint):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(tiny_checkpoint, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(tiny_checkpoint, device="cuda")


def test_full_size_preset_has_the_released_shapes():
    from dgemma.model.diffusion_gemma import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(preset("26b-a4b"))
    params = dict(model.named_parameters())
    experts = sum(p.numel() for name, p in params.items() if ".experts." in name)
    assert experts == 22_837_985_280  # "the routed experts are 22.84 B"
    # 25,823,778,864 unique parameters in the release, of which ~0.57 B are the vision tower we skip.
    assert sum(p.numel() for p in params.values()) == 25_250_986_812
    assert params["layers.5.self_attn.k_proj.weight"].shape == (2 * 512, 2816)  # full layer: 2 KV heads of 512
    assert params["layers.0.self_attn.v_proj.weight"].shape == (8 * 256, 2816)  # sliding: 8 KV heads of 256
    assert "layers.5.self_attn.v_proj.weight" not in params


def test_kv_cache_sizing_matches_what_is_allocated():
    from dgemma.model.kv_cache import KVCache, bytes_per_position, max_positions_that_fit, step_workspace_bytes

    config = preset("tiny")
    cache = KVCache(config, rows=3, capacity=100, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.nbytes == 3 * 101 * bytes_per_position(config, torch.float32)  # one trash slot per row
    # The full-size model: 225,280 bytes per position in bf16 (25 sliding layers of 8x256, 5 full of 2x512).
    big = preset("26b-a4b")
    assert bytes_per_position(big, torch.bfloat16) == 25 * 2 * 8 * 256 * 2 + 5 * 2 * 2 * 512 * 2
    free = 29_400_000_000  # an 80 GB card after 50.5 GB of weights
    fit = max_positions_that_fit(big, torch.bfloat16, 32, free)
    assert 32 * (fit + 1) * 225_280 + step_workspace_bytes(big, 32) <= free
    assert fit >= 2048  # the benchmark's 32 concurrent 1024 + 1024-token requests fit
