"""Load a checkpoint directory (or hub id) in the Hugging Face layout into a `DiffusionGemma`.

The model is built on the meta device and every tensor is assigned straight from the memory-mapped file,
converted to the requested dtype on the target device, so peak memory stays close to one copy of the weights.
Every problem is reported as a `CheckpointError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dgemma.checkpoint.layout import TIED_DUPLICATE, checkpoint_tensors, is_vision
from dgemma.config import ModelConfig
from dgemma.errors import CheckpointError, ConfigError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.fp8 import check_quantization
from dgemma.model.moe import Experts

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


@dataclass
class LoadReport:
    """What the loader did, for logs and tests."""

    tensors_loaded: int = 0
    skipped_vision: list[str] = field(default_factory=list)
    skipped_tied_duplicates: list[str] = field(default_factory=list)
    weight_bytes: int = 0


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local directory as is; anything else that looks like `owner/name` is fetched from the Hugging Face Hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise CheckpointError(f"{text}: is a file; a checkpoint is a directory with config.json and safetensors")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such checkpoint directory (and not a hub id like 'google/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as exc:  # the hub client raises many kinds; all mean "could not get it"
        raise CheckpointError(
            f"{text}: not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). If this machine is offline, "
            "download the checkpoint elsewhere and pass its directory."
        ) from None


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing (a checkpoint directory needs it)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config(path: Path) -> ModelConfig:
    data = read_json(path / "config.json")
    try:
        return ModelConfig.from_hf_dict(data, source=str(path / "config.json"))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or a single model.safetensors."""
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no 'weight_map'")
        files = {}
        for name, shard in weight_map.items():
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{shard_path}: shard missing (listed in {index_path.name} for tensor {name})")
            files[name] = shard_path
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in check_safetensors(single)}


def check_safetensors(file: Path) -> dict[str, dict]:
    """Read and check a safetensors header against the file size: catches truncated and corrupt files."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{file}: truncated (only {size} bytes, no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{file}: corrupt safetensors header (declares {header_len} header bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{file}: truncated ({size} bytes on disk, the header needs {8 + header_len + end})")
    return header


def _assign(model: DiffusionGemma, param_name: str, tensor: torch.Tensor,
            quantization: str | None = None) -> torch.Tensor:
    """Put `tensor` in the model as `param_name`; returns what is stored (FP8 weights once quantized)."""
    if param_name.startswith("encoder_layer_scalars["):
        layer = int(param_name[len("encoder_layer_scalars[") : -1])
        model.encoder_layer_scalars.data[layer] = tensor.reshape(())
        return tensor
    module_name, _, attr = param_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
    if quantization == "fp8" and isinstance(module, Experts):
        module.quantize_fp8((attr,))  # now, so only one expert tensor is ever held at full precision
    return getattr(module, attr)


def load_weights(model: DiffusionGemma, path: Path, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> LoadReport:
    expected = checkpoint_tensors(model)
    files = weight_files(path)
    report = LoadReport()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    # The encoder scalars are one tensor per layer on disk but one parameter here: allocate it first.
    model.encoder_layer_scalars = torch.nn.Parameter(
        torch.ones(model.config.num_layers, dtype=dtype, device=device), requires_grad=False
    )
    seen: set[str] = set()
    for file, names in by_file.items():
        header = check_safetensors(file)
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({exc})") from None
        with handle:
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
                if is_vision(name):
                    report.skipped_vision.append(name)
                    continue
                if name not in expected:
                    if TIED_DUPLICATE.match(name):
                        report.skipped_tied_duplicates.append(name)
                        continue
                    raise CheckpointError(f"{file}: unexpected tensor {name} (not part of a DiffusionGemma text model)")
                param_name, shape = expected[name]
                on_disk = tuple(header[name]["shape"])
                if on_disk != shape:
                    raise CheckpointError(f"{file}: tensor {name} has shape {list(on_disk)}, expected {list(shape)}")
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"{file}: tensor {name} cannot be read ({exc})") from None
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected floating point")
                tensor = tensor.to(device=device, dtype=dtype)
                stored = _assign(model, param_name, tensor, quantization)
                seen.add(name)
                report.tensors_loaded += 1
                report.weight_bytes += stored.numel() * stored.element_size()
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor {', '.join(missing[:5])}{more}")
    if report.skipped_vision:
        log.info(
            "%s: skipped %d vision tensors (vision input is not supported yet; text generation is unaffected)",
            path, len(report.skipped_vision),
        )
    return report


def load_model(
    model: str | os.PathLike, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> tuple[DiffusionGemma, Path, LoadReport]:
    """Build the model from a checkpoint directory or hub id; returns (model in eval mode, local path, report).
    `quantization="fp8"` stores the routed experts' weights in float8 as they load (`dgemma.model.fp8`)."""
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available on this machine")
    quantization = check_quantization(quantization, device)
    path = resolve_model_path(model)
    config = load_config(path)
    with torch.device("meta"):
        net = DiffusionGemma(config)
    report = load_weights(net, path, dtype, device, quantization)
    net.reset_buffers(device)
    return net.eval(), path, report
