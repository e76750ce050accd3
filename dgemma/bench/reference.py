"""The Hugging Face reference built on *our* weight tensors, for same-process comparisons in `dgemma bench`.

Two bf16 copies of the full-size model do not fit on an 80 GB card, so the reference is built on the meta device
and every text parameter is pointed at the tensor dgemma already holds (tied groups included). Only the small
vision tower of the reference config is materialised. `transformers` is imported here and nowhere on the
serving path.
"""

from __future__ import annotations

import torch

from dgemma.model.diffusion_gemma import DiffusionGemma


def _set(module: torch.nn.Module, dotted: str, tensor: torch.Tensor, buffer: bool = False) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name)
    if buffer:
        owner._buffers[leaf] = tensor
    else:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def reference_sharing_weights(model: DiffusionGemma):
    """A `DiffusionGemmaForBlockDiffusion` whose text weights are `model`'s tensors (no copy)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

    device, dtype = model.device, model.dtype
    hf_dict = model.config.to_hf_dict()
    config = DiffusionGemmaConfig.from_dict(hf_dict)
    config.text_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(config)
    ref.model.encoder.vision_tower.to_empty(device=device)
    ref.model.encoder.embed_vision.to_empty(device=device)
    for name, param in model.named_parameters():
        if name == "encoder_layer_scalars":
            for i in range(model.config.num_layers):
                _set(ref, f"model.encoder.language_model.layers.{i}.layer_scalar", param[i : i + 1], buffer=True)
            continue
        if name.endswith("layer_scalar"):
            _set(ref, f"model.decoder.{name}", param.data, buffer=True)
            continue
        _set(ref, f"model.decoder.{name}", param.data)
        if not name.startswith("self_conditioning."):
            _set(ref, f"model.encoder.language_model.{name}", param.data)  # tied: the same tensor
    _set(ref, "lm_head.weight", model.embed_tokens.weight.data)
    scale = torch.tensor(model.config.hidden_size**0.5, device=device)
    for emb in (ref.model.decoder.embed_tokens, ref.model.encoder.language_model.embed_tokens):
        emb._buffers["embed_scale"] = scale
    for owner in (ref.model.decoder, ref.model.encoder.language_model):
        cfg = config.text_config
        owner.rotary_emb = DiffusionGemmaTextRotaryEmbedding(cfg, device=device)
    for name, tensor in list(ref.named_buffers()):
        if tensor.is_meta:
            raise RuntimeError(f"reference buffer {name} was not materialised")
    ref.to(dtype)  # the vision tower only; shared tensors already have this dtype
    return ref.eval()
