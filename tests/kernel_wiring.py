"""Helpers shared by tests/test_kernel_wiring.py (CPU, Triton interpreter) and tests/test_gpu.py: run a model, or
one layer's attention or experts, with the fused Triton kernels allowed or not, and count the kernel calls."""

from __future__ import annotations

import os

import pytest
import torch

from dgemma.config import FULL, SLIDING
from dgemma.model import attention
from dgemma.model.attention import AttentionBatch
from dgemma.model.kv_cache import KVCache
from dgemma.model.layers import Rotation

# Tests that run Triton kernels on a CPU (through the interpreter) run only when asked.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs Triton kernels on a CPU: set TRITON_INTERPRET=1")


def set_kernel_devices(model, devices: tuple[str, ...]) -> None:
    model.set_kernel_devices(devices)


def count_calls(monkeypatch, calls: dict[str, int], module, name: str, key: str) -> None:
    """Replace module.name by a spy that counts its calls in calls[key] (set to 0 here)."""
    real = getattr(module, name)
    calls[key] = 0

    def spy(*args, **kwargs):
        calls[key] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def spy_on_kernels(monkeypatch) -> dict[str, int]:
    """Count calls of the wired kernels: proves a comparison ran the kernel path and not the eager one twice."""
    from dgemma.kernels import cache_attention, fused_moe, gated_gelu, norm_rope, residual_norms, routing

    calls = {}
    for module, name, key in ((fused_moe, "fused_moe_triton", "fused_moe"), (norm_rope, "norm_rope_triton", "norm_rope"),
                              (norm_rope, "qkv_norm_rope_triton", "qkv_norm_rope"),
                              (routing, "route_top_k", "route_top_k"),
                              (residual_norms, "attention_residual_triton", "attention_residual"),
                              (residual_norms, "layer_output_triton", "layer_output"),
                              (cache_attention, "cache_attention_triton", "cache_attention"),
                              (gated_gelu, "gelu_mul_triton", "gelu_mul")):
        count_calls(monkeypatch, calls, module, name, key)
    return calls


def inputs(config, prompt_len: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `run` takes, the same for every call: a prompt of random ids [1, prompt_len] (no special tokens), a random
    canvas [1, C] and self-conditioning logits [1, C, V]."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, prompt_len), generator=gen)
    canvas = torch.randint(0, config.vocab_size, (1, config.canvas_length), generator=gen)
    soft_logits = 3 * torch.randn(1, config.canvas_length, config.vocab_size, generator=gen)
    return prompt, canvas, soft_logits


def run(model, prompt, canvas, soft_logits):
    """Encoder KV of the prompt and decoder logits of a canvas, self-conditioned on soft_logits."""
    cfg, device = model.config, model.device
    n = prompt.shape[1]
    cache = KVCache(cfg, 1, n + cfg.canvas_length, model.dtype, device)
    with torch.no_grad():
        model.encode(prompt.to(device), AttentionBatch.for_encoder([0], [0], [n], cfg.sliding_window, cache), cache)
        soft = model.soft_embedding(soft_logits.to(device))
        logits = model.decode(canvas.to(device), AttentionBatch.for_decoder([0], [n], cfg.canvas_length,
                                                                              cfg.sliding_window, cache), cache, soft)
    return cache, logits.float().cpu()


def attention_kernel_off_and_on(model, layer: int, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer's attention over x [1, T, H] (a causal chunk from position 0), kernel off then on:
    [(output [1, T, H], keys written to the cache [1, T, Hkv, D])] in float32."""
    cfg, attn, kind = model.config, model.layers[layer].self_attn, model.layers[layer].kind
    t = x.shape[1]
    results = []
    for devices in ((), (x.device.type,)):
        cache = KVCache(cfg, 1, t, model.dtype, x.device)
        batch = AttentionBatch.for_encoder([0], [0], [t], cfg.sliding_window, cache)
        rotation = Rotation(batch.positions, model.inv_freq_full if kind == FULL else model.inv_freq_sliding,
                            model.dtype)
        attn.kernel_devices = devices
        with torch.no_grad():
            out = attn(x, rotation, batch, kind, cache, layer)
        results.append((out.float(), cache.keys[layer][:, :t].float()))
    return results


def ring_canvas(model, prefix: int, max_write: int):
    """A decoder canvas on the first sliding layer, over a cache whose sliding layers keep a ring: two rows (prefixes
    `prefix` and `prefix` - 7) encoded in chunks of `max_write` tokens, so the ring holds W - 1 + max_write slots.
    Returns (cache, attend): attend(devices) runs that layer's attention with the kernels of `devices` allowed and
    returns its output [2, C, H] in float32."""
    from dgemma.bench.measure import encoded_prefix

    cfg = model.config
    c = cfg.canvas_length
    cache = encoded_prefix(model, 2, prefix, prefix + c, max_write)
    batch = AttentionBatch.for_decoder([0, 1], [prefix, prefix - 7], c, cfg.sliding_window, cache)
    layer = cfg.layer_types.index(SLIDING)
    attn = model.layers[layer].self_attn
    rotation = Rotation(batch.positions, model.inv_freq_sliding, model.dtype)
    x = torch.randn(2, c, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)

    def attend(devices: tuple[str, ...]) -> torch.Tensor:
        attn.kernel_devices = devices
        with torch.no_grad():
            return attn(x, rotation, batch, SLIDING, cache, layer).float()

    return cache, attend


def experts_kernel_off_and_on(model, layer: int, x: torch.Tensor) -> list[torch.Tensor]:
    """One layer's routed experts over x [N, H] with its own router, kernel off then on: [[N, H] float32] * 2."""
    router, experts = model.layers[layer].router, model.layers[layer].experts
    results = []
    with torch.no_grad():
        weights, ids = router(x)  # [N, K] each
        for devices in ((), (x.device.type,)):
            experts.kernel_devices = devices
            results.append(experts(x, weights, ids).float())
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def argmax_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions whose most likely token agrees. a, b: [..., V] logits."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def decoder_attention_kernel_off_and_on(model, layer: int, rows: list[int], prefixes: list[int], seed: int = 0
                                        ) -> list[torch.Tensor]:
    """One sliding layer's decoder attention for canvases of `rows` after `prefixes` cached positions of random
    keys, kernel off (masked attention) then on (`canvas_attention` on a GPU): [[B, C, H] float32] * 2."""
    c = model.config.canvas_length
    return _attention_over_random_prefixes(
        model, layer, rows, max(prefixes) + c, c, seed,
        lambda cache: AttentionBatch.for_decoder(rows, prefixes, c, model.config.sliding_window, cache))


def decode_attention_kernel_off_and_on(model, layer: int, rows: list[int], prefixes: list[int], seed: int = 0
                                       ) -> list[torch.Tensor]:
    """One layer's attention for a single decoded token per row (autoregressive mode) after `prefixes` cached
    positions of random keys, kernel off (masked attention) then on (`cache_attention` with the key range split,
    switched on for the call whatever the default): [[B, 1, H] float32] * 2."""
    switched_on, attention.CACHE_ATTENTION_DECODE_TOKENS = attention.CACHE_ATTENTION_DECODE_TOKENS, 1
    try:
        return _attention_over_random_prefixes(
            model, layer, rows, max(prefixes) + 1, 1, seed,
            lambda cache: AttentionBatch.for_encoder(rows, prefixes, [1] * len(rows), model.config.sliding_window,
                                                     cache))
    finally:
        attention.CACHE_ATTENTION_DECODE_TOKENS = switched_on


def _attention_over_random_prefixes(model, layer: int, rows: list[int], capacity: int, tokens: int, seed: int,
                                    make_batch) -> list[torch.Tensor]:
    """`layer`'s attention for `tokens` new tokens of each of `rows`, over a cache whose keys and values are random
    (standing in for encoded prefixes), kernel off then on: [[B, tokens, H] float32] * 2."""
    cfg, attn, kind = model.config, model.layers[layer].self_attn, model.layers[layer].kind
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(cfg, max(rows) + 1, capacity, model.dtype, device)
    for t in (cache.keys[layer], cache.values[layer]):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    x = torch.randn(len(rows), tokens, cfg.hidden_size, generator=gen).to(device, model.dtype)
    batch = make_batch(cache)
    rotation = Rotation(batch.positions, model.inv_freq_full if kind == FULL else model.inv_freq_sliding, model.dtype)
    results = []
    for devices in ((), (device.type,)):
        attn.kernel_devices = devices
        with torch.no_grad():
            results.append(attn(x, rotation, batch, kind, cache, layer).float())
    return results
