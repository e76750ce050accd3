"""How the model's tensors are named and shaped on disk (the Hugging Face layout), in one place.

Tied tensors are stored once, under decoder names. The encoder's own tensors are its per-layer scalars and the
vision tower; a checkpoint may also repeat tied tensors under encoder names, which we recognise and skip.
"""

from __future__ import annotations

import re

import torch

from dgemma.config import ModelConfig

DECODER_PREFIX = "model.decoder."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# Tied copies that some writers store under encoder names (the reference's save drops them).
TIED_DUPLICATE = re.compile(r"^(lm_head\.weight|model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$).+)$")


def encoder_scalar_name(layer: int) -> str:
    return f"model.encoder.language_model.layers.{layer}.layer_scalar"


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint name -> (parameter name in our model, shape of that one tensor on disk)."""
    config: ModelConfig = model.config
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, param in model.named_parameters():
        if name == "encoder_layer_scalars":
            for i in range(config.num_layers):
                out[encoder_scalar_name(i)] = (f"{name}[{i}]", (1,))
        else:
            out[DECODER_PREFIX + name] = (name, tuple(param.shape))
    return out


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)
