"""Builders for tiny Hugging Face reference models (test-only: transformers is never imported by dgemma)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)


@dataclass(frozen=True)
class TinySpec:
    """One tiny configuration; together the specs exercise every path of the model."""

    name: str
    layer_types: tuple[str, ...]
    vocab: int = 128
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2  # sliding layers
    head_dim: int = 8
    full_head_dim: int = 16
    full_kv_heads: int = 1
    window: int = 8
    experts: int = 4
    top_k: int = 2
    canvas: int = 8
    embed_std: float = 1.0  # peaked logits: the sampler accepts many tokens, canvases stop early, EOS appears


SPECS = [
    # GQA on both layer types, prompts longer than the window, one full layer last.
    TinySpec("gqa", ("sliding_attention",) * 5 + ("full_attention",)),
    # Full layers in the middle too, no query grouping on sliding layers, more experts and top-3.
    TinySpec("mixed", ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"),
             kv_heads=4, full_kv_heads=2, experts=8, top_k=3, window=6, canvas=6, hidden=48, head_dim=12, full_head_dim=24),
    # A single expert path and a wide canvas.
    TinySpec("wide", ("sliding_attention", "sliding_attention", "full_attention"), experts=6, top_k=1, canvas=16,
             window=12, heads=2, kv_heads=1, full_kv_heads=1),
]


def build_reference(spec: TinySpec, seed: int = 0):
    """A random reference model with non-trivial norms, scales and scalars (a loader that drops one is caught)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=2 * spec.hidden,
                num_hidden_layers=len(spec.layer_types), layer_types=list(spec.layer_types),
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                global_head_dim=spec.full_head_dim, num_global_key_value_heads=spec.full_kv_heads,
                sliding_window=spec.window, num_experts=spec.experts, top_k_experts=spec.top_k,
                moe_intermediate_size=spec.hidden // 2, max_position_embeddings=4096,
                use_bidirectional_attention="vision", eos_token_id=1, pad_token_id=0, bos_token_id=2)
    config = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=spec.canvas)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.7 + 0.6 * torch.rand_like(b))
        model.model.decoder.embed_tokens.weight.normal_(0.0, spec.embed_std)
    return model


def reference_prefix(reference, ids_chunks):
    """The reference's cache after encoding the chunks [1, n] one after another."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=reference.config.get_text_config())
    with torch.no_grad():
        for ids in ids_chunks:
            reference.model.encoder(input_ids=ids, past_key_values=cache)
    return cache


def our_prefix(model, ids_chunks, capacity=256):
    """(our cache, its length) after encoding the chunks [1, n] one after another into row 0."""
    from dgemma.model.attention import AttentionBatch
    from dgemma.model.kv_cache import KVCache

    cache = KVCache(model.config, 1, capacity, torch.float32, torch.device("cpu"))
    done = 0
    with torch.no_grad():
        for ids in ids_chunks:
            n = ids.shape[1]
            batch = AttentionBatch.for_encoder([0], [done], [n], model.config.sliding_window, cache)
            model.encode(ids, batch, cache)
            done += n
    return cache, done


def decoder_logits(ours, reference, ids_chunks, canvas, sc_logits=None, capacity=256):
    """(our logits, the reference's) of one denoising forward of canvas [1, C] after the encoded chunks,
    self-conditioned on sc_logits [1, C, V] (None: the first step's zero signal). float32, CPU."""
    from dgemma.model.attention import AttentionBatch

    with torch.no_grad():
        ref = reference(decoder_input_ids=canvas, past_key_values=reference_prefix(reference, ids_chunks),
                        self_conditioning_logits=sc_logits).logits
        cache, length = our_prefix(ours, ids_chunks, capacity)
        cfg = ours.config
        batch = AttentionBatch.for_decoder([0], [length], cfg.canvas_length, cfg.sliding_window, cache)
        soft = ours.soft_embedding(sc_logits) if sc_logits is not None else None
        logits = ours.decode(canvas, batch, cache, soft)
    return logits, ref
