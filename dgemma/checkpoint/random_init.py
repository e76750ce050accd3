"""Random-weight models and checkpoints, for tests and benchmarks.

One generator of (checkpoint name, tensor) pairs serves both uses: `build_random_model` assigns the tensors
straight into a model on any device (the full-size preset is built on a GPU without touching disk), and
`write_random_checkpoint` streams them into safetensors shards in the Hugging Face layout, so memory never
holds more than one shard.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dgemma.checkpoint.layout import checkpoint_tensors
from dgemma.checkpoint.loader import _assign, parse_dtype
from dgemma.config import FULL, SLIDING, AttentionSpec, ModelConfig
from dgemma.errors import CheckpointError, ConfigError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.fp8 import check_quantization


def _layer_types(n: int) -> list[str]:
    return [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]


PRESETS: dict[str, ModelConfig] = {
    # Small enough to run a whole generation in well under a second on a laptop CPU.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        top_k_experts=2, num_attention_heads=4, layer_types=_layer_types(6),
        sliding=AttentionSpec(head_dim=16, num_kv_heads=2, rope_theta=10_000.0),
        full=AttentionSpec(head_dim=32, num_kv_heads=1, rope_theta=1_000_000.0, partial_rotary_factor=0.25,
                           has_v_proj=False),
        sliding_window=32, canvas_length=32, max_position_embeddings=8192, eos_token_id=[1, 5],
    ),
    # The released google/diffusiongemma-26B-A4B-it text model.
    "26b-a4b": ModelConfig(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_experts=128,
        top_k_experts=8, num_attention_heads=16, layer_types=_layer_types(30),
        sliding=AttentionSpec(head_dim=256, num_kv_heads=8, rope_theta=10_000.0),
        full=AttentionSpec(head_dim=512, num_kv_heads=2, rope_theta=1_000_000.0, partial_rotary_factor=0.25,
                           has_v_proj=False),
        sliding_window=1024, canvas_length=256, max_position_embeddings=262144, eos_token_id=[1, 106, 50],
    ),
}

# The released generation_config.json (its token ids come from the model config when writing).
DEFAULT_GENERATION_CONFIG = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], layer_types=list(PRESETS[name].layer_types))


@dataclass
class InitScale:
    """Standard deviations of the random weights.

    `embed_std` sets how peaked the logits are (the LM head is the embedding); tests raise it so that the
    sampler sees confident positions, early stopping and EOS. `perturb` makes norm weights and scalars differ
    from 1 so that a loader or kernel that ignores one of them is caught.
    """

    linear_std: float = 0.02
    embed_std: float = 0.02
    perturb: float = 0.0


def random_tensors(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    scale: InitScale | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) for every tensor of a random model, deterministically from `seed`."""
    scale = scale or InitScale()
    device = torch.device(device)
    with torch.device("meta"):
        layout = checkpoint_tensors(DiffusionGemma(config))
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, (param_name, shape) in layout.items():
        leaf = param_name.rsplit(".", 1)[-1]
        is_norm_like = leaf in ("scale", "per_expert_scale") or "norm" in param_name or "scalar" in param_name
        if is_norm_like:
            t = torch.ones(shape, device=device)
            if scale.perturb:
                t += scale.perturb * torch.randn(shape, generator=gen, device=device)
        else:
            std = scale.embed_std if param_name == "embed_tokens.weight" else scale.linear_std
            t = torch.randn(shape, generator=gen, device=device) * std
        yield name, t.to(dtype)


def build_random_model(
    config: ModelConfig | str, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
    seed: int = 0, scale: InitScale | None = None, quantization: str | None = None,
) -> DiffusionGemma:
    """A random-weight model materialised tensor by tensor on `device` (no file, one copy of the weights);
    `quantization="fp8"`: the experts' weights in float8, as `load_model` stores them."""
    config = preset(config) if isinstance(config, str) else config.validate()
    dtype, device = parse_dtype(dtype), torch.device(device)
    quantization = check_quantization(quantization, device)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    layout = checkpoint_tensors(model)
    model.encoder_layer_scalars = torch.nn.Parameter(torch.ones(config.num_layers, dtype=dtype, device=device),
                                                     requires_grad=False)
    for name, tensor in random_tensors(config, seed, dtype, device, scale):
        _assign(model, layout[name][0], tensor, quantization)
    model.reset_buffers(device)
    return model.eval()


def write_checkpoint_files(
    out_dir: str | Path,
    config: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    generation_config: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype_name: str = "float32",
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write a complete checkpoint directory atomically: into a temporary sibling, renamed at the end.

    `tokenizer_dir` supplies tokenizer.json, tokenizer_config.json and chat_template.jinja; without it a small
    BPE tokenizer is built. An existing non-empty `out_dir` is an error, so nothing is ever half-overwritten.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_shards(tmp, tensors, max_shard_bytes)
        hf = config.to_hf_dict()
        if config.raw and "vision_config" in config.raw:
            hf["vision_config"] = config.raw["vision_config"]
        hf["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        gen = dict(DEFAULT_GENERATION_CONFIG if generation_config is None else generation_config)
        gen.setdefault("eos_token_id", list(config.eos_token_id))
        gen.setdefault("pad_token_id", config.pad_token_id)
        gen.setdefault("bos_token_id", config.bos_token_id)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _write_tokenizer(tmp, tokenizer_dir, config)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tmp: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards plus their index when over one shard."""
    shards: list[list[str]] = []  # tensor names per written shard
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            save_file(current, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shards.append(list(current))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.detach().to("cpu").contiguous()
        current_bytes += nbytes
    flush()
    if len(shards) == 1:
        (tmp / "shard-0.safetensors").rename(tmp / "model.safetensors")
        return
    weight_map, total_size = {}, 0
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{i}.safetensors").rename(tmp / final)
        total_size += (tmp / final).stat().st_size
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(tmp: Path, tokenizer_dir: str | Path | None, config: ModelConfig) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    if tokenizer_dir is not None:
        for name in names:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy(src, tmp / name)
        return
    from dgemma.checkpoint.tokenizer_builder import build_default_tokenizer, write_tokenizer_files

    vocab = min(config.vocab_size, 512)
    write_tokenizer_files(tmp, build_default_tokenizer(vocab_size=vocab))


def write_random_checkpoint(
    out_dir: str | Path, config: ModelConfig | str = "tiny", seed: int = 0, dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu", scale: InitScale | None = None, generation_config: dict | None = None,
    tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 4 << 30,
) -> Path:
    """`dgemma init-random`: a random checkpoint in exactly the on-disk format of the released model."""
    config = preset(config) if isinstance(config, str) else config.validate()
    dtype = parse_dtype(dtype)
    dtype_name = {v: k for k, v in {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                     "float16": torch.float16}.items()}[dtype]
    return write_checkpoint_files(
        out_dir, config, random_tensors(config, seed, dtype, device, scale), generation_config,
        tokenizer_dir, dtype_name, max_shard_bytes,
    )
