"""The block-diffusion training objective: an autoregressive loss on the encoder plus a denoising loss on the decoder.

For a batch of clean sequences (prompt + response) and one canvas-aligned block per row:

1. Encoder: the clean sequence runs through the causal encoder, which writes its K/V into a cache. Its final hidden
   states, through the tied LM head, predict each next response token (cross-entropy, weight `ar_loss_weight`).
   The encoder is causal, so the cache slots before the block are exactly the cache of the clean prefix that
   generation would have built.
2. Corruption: t ~ U(min_noise, 1) per row; each canvas token becomes a uniform random token with probability t
   (uniform noise over the whole vocabulary, as the sampler draws it; there is no mask token).
3. Decoder: the noisy canvas is denoised at positions [P, P + C) reading the prefix from the cache; cross-entropy
   against the clean block at every canvas position (the <pad> filler after the answer included).
   With `noise_samples` K > 1 each row's block is corrupted K times (each with its own t) and all K copies are
   denoised against the one encoder pass: K times the decoder's signal for the cost of decoder compute alone.
4. Self-conditioning, two-pass: for a random half of the rows the decoder first runs without gradient; its
   logits, divided by a temperature drawn from the sampler's schedule range (the sampler self-conditions on
   temperature-scaled logits), become the soft input of the graded pass. The other rows get a zero signal, which
   is what the first denoising step of generation sees.

Autograd and the cache: the model writes K/V into cache tensors in place. The encoder writes its own cache; each
decoder pass gets a clone (the decoder overwrites the slots after the prefix with the canvas, and an in-place
write into a tensor autograd saved would fail). Gradients flow from the decoder through the cache into the encoder,
as in one forward of the reference model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgemma.errors import ConfigError
from dgemma.model.attention import AttentionBatch, visible_positions
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache
from dgemma.train.dataset import IGNORE, TrainBatch


@dataclass
class ObjectiveConfig:
    ar_loss_weight: float = 1.0  # weight of the encoder's next-token loss (0 turns it off)
    min_noise: float = 0.001  # t ~ U(min_noise, 1): the corruption probability of a row
    self_cond_prob: float = 0.5  # share of rows trained with a first, gradient-free self-conditioning pass
    self_cond_t_min: float = 0.4  # the first pass's logits are divided by T ~ U(t_min, t_max) ...
    self_cond_t_max: float = 0.8  # ... the range of the sampler's temperature schedule
    weight_by_t: bool = False  # weight each row's denoising loss by 1/t (the ELBO weighting)
    # Weight of the <pad> filler after the answer in the denoising loss, relative to the answer's own tokens. At 1
    # the loss is a plain mean over the canvas; short answers then leave most of it to trivially predictable filler.
    filler_weight: float = 1.0
    # Noisy copies of each row's block the decoder denoises, each with its own t, all reading the one encoder pass:
    # more decoder signal per example at the cost of decoder compute only (the decoder is what lags; see
    # scripts/decoder_vs_encoder.py).
    noise_samples: int = 1

    def validate(self) -> "ObjectiveConfig":
        if not (self.ar_loss_weight >= 0 and math.isfinite(self.ar_loss_weight)):
            raise ConfigError(f"ar_loss_weight must be a finite number >= 0, got {self.ar_loss_weight!r}")
        if not 0 < self.min_noise < 1:
            raise ConfigError(f"min_noise must be in (0, 1), got {self.min_noise!r}")
        if not (0 <= self.filler_weight <= 1):
            raise ConfigError(f"filler_weight must be in [0, 1], got {self.filler_weight!r}")
        if not isinstance(self.noise_samples, int) or isinstance(self.noise_samples, bool) or self.noise_samples < 1:
            raise ConfigError(f"noise_samples must be an integer >= 1, got {self.noise_samples!r}")
        if not 0 <= self.self_cond_prob <= 1:
            raise ConfigError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob!r}")
        if not 0 < self.self_cond_t_min <= self.self_cond_t_max:
            raise ConfigError(
                f"self-conditioning temperatures need 0 < t_min <= t_max, got {self.self_cond_t_min!r}, "
                f"{self.self_cond_t_max!r}"
            )
        return self


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: diffusion + ar_loss_weight * ar, what backward() runs on
    diffusion: torch.Tensor  # scalar: mean cross-entropy over canvas positions
    ar: torch.Tensor  # scalar: mean next-token cross-entropy over response tokens (0 when off)
    canvas_accuracy: torch.Tensor  # scalar: argmax == clean token, over real (non-filler) canvas tokens
    noise: torch.Tensor  # [B * noise_samples] t of each denoised row


def corrupt(canvas: torch.Tensor, t: torch.Tensor, vocab_size: int, flip_u: torch.Tensor, token_u: torch.Tensor
            ) -> torch.Tensor:
    """Replace each token of canvas [B, C] with a uniform random id with probability t [B], from uniforms
    flip_u and token_u in [0, 1) ([B, C] each). -> [B, C]"""
    noise = (token_u * vocab_size).long().clamp(max=vocab_size - 1)  # [B, C] uniform over the vocabulary
    return torch.where(flip_u < t[:, None], noise, canvas)


def row_uniforms(rows: int, canvas_length: int, device: torch.device, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Every random number a step draws, in one call: [rows, 3 + 2C] uniforms, a row per denoised row (noise
    level, self-conditioning choice, temperature, then C flips and C noise tokens). Row i's numbers do not depend
    on how many rows follow it (on a CPU generator), so padding rows at the end change nothing before them."""
    shape = (rows, 3 + 2 * canvas_length)
    if generator is None:  # no generator argument at all: torch.compile cannot trace rand(generator=None) with
        return torch.rand(shape, device=device)  # symbolic sizes
    return torch.rand(shape, device=device, generator=generator)


# The two helpers below change the cache object in place: torch.compile cannot trace copy.copy (a graph break that,
# on a GPU, split the compiled step into ten graphs).


def use_copies(cache: KVCache, keys: list[torch.Tensor], values: list[torch.Tensor], detach: bool) -> KVCache:
    """Point the cache at copies of `keys` and `values` (one tensor per layer), so a decoder pass writes its canvas
    without touching tensors autograd saved; `detach` cuts the copies from the graph."""
    cache.keys = [(k.detach() if detach else k).clone() for k in keys]
    cache.values = [(v.detach() if detach else v).clone() for v in values]
    return cache


def repeat_rows(cache: KVCache, times: int) -> KVCache:
    """Each row of the cache `times` times in a row ([B, ...] -> [B * times, ...]), in place; differentiable, so the
    decoder's gradient still reaches the encoder that wrote the rows."""
    cache.rows = cache.rows * times
    cache.keys = [k.repeat_interleave(times, dim=0) for k in cache.keys]
    cache.values = [v.repeat_interleave(times, dim=0) for v in cache.values]
    return cache


def block_diffusion_loss(
    model: DiffusionGemma, batch: TrainBatch, config: ObjectiveConfig, generator: torch.Generator | None = None
) -> LossParts:
    """The training loss of one batch (see the module docstring). Runs under the caller's autocast, if any."""
    cfg = model.config
    ids = batch.input_ids  # [B, T]
    b, t_len = ids.shape
    c, w = cfg.canvas_length, cfg.sliding_window
    device = ids.device
    rows = torch.arange(b, device=device)  # [B]

    # 1. Encoder over the clean sequences; the cache's dtype is the residual stream's (the weights', fp32 master).
    #    Attention bounds come from device tensors over the whole cache (no host-side lengths): the step has a
    #    fixed shape per batch shape, and a CUDA graph can hold it.
    cache = KVCache(cfg, b, t_len + c, model.dtype, device)
    offsets = torch.arange(t_len, device=device)[None, :]  # [1, T]
    positions, key_start, key_end = visible_positions(0, offsets, t_len, w)  # [1, T] each
    positions, key_start, key_end = (x.expand(b, t_len) for x in (positions, key_start, key_end))  # [B, T] each
    slots = torch.where(offsets < batch.lengths[:, None], positions, cache.trash_slot)  # [B, T]
    enc = AttentionBatch.from_bounds(rows, positions, slots, key_start, key_end, batch.lengths, t_len, cache,
                                     row_range=(0, b))
    hidden = model.encode(ids, enc, cache)  # [B, T, H]
    if config.ar_loss_weight > 0:
        # Every position goes through the (small) LM head and ignore_index drops prompt and padding: selecting the
        # response positions first would need their count on the host (a sync per step) and a slow scatter in
        # backward.
        ar_logits = model.logits(hidden)  # [B, T, V] float32
        ar = F.cross_entropy(ar_logits.flatten(0, 1), batch.ar_targets.flatten(), ignore_index=IGNORE)
    else:
        ar = torch.zeros((), device=device)

    # 2. Corrupt one block per row, noise_samples times (row i's copies are rows i*K .. i*K + K - 1).
    clean, real, prefix, row_weight = batch.canvas, batch.canvas_real, batch.prefix_lens, batch.rows_real.float()
    if config.noise_samples > 1:
        k = config.noise_samples
        clean, real = clean.repeat_interleave(k, dim=0), real.repeat_interleave(k, dim=0)  # [B*K, C] each
        prefix, row_weight = prefix.repeat_interleave(k), row_weight.repeat_interleave(k)  # [B*K] each
        cache = repeat_rows(cache, k)
        b = b * k
        rows = torch.arange(b, device=device)
    u = row_uniforms(b, c, device, generator)  # [B, 3 + 2C]
    noise = config.min_noise + (1 - config.min_noise) * u[:, 0]  # [B]
    noisy = corrupt(clean, noise, cfg.vocab_size, u[:, 3 : 3 + c], u[:, 3 + c :])  # [B, C]
    positions, key_start, key_end = visible_positions(prefix[:, None], torch.arange(c, device=device)[None, :], 0, w)
    dec = AttentionBatch.from_bounds(rows, positions, positions, key_start, key_end, prefix + c, t_len + c, cache,
                                     row_range=(0, b), canvas=True)

    # 3. Self-conditioning input from a gradient-free first pass, for a random subset of rows.
    encoded = cache.keys, cache.values  # what both decoder passes read; each writes its canvas into copies
    soft = None
    if config.self_cond_prob > 0:
        chosen = u[:, 1] < config.self_cond_prob  # [B]
        with torch.no_grad():
            first = model.decode(noisy, dec, use_copies(cache, *encoded, detach=True))  # [B, C, V] float32
            lo, hi = config.self_cond_t_min, config.self_cond_t_max
            temperature = lo + (hi - lo) * u[:, 2]  # [B]
            soft = model.soft_embedding(first / temperature[:, None, None])  # [B, C, H]
            soft = soft * chosen[:, None, None].to(soft.dtype)  # zero signal = "first step" for the other rows

    # 4. The graded denoising pass: a mean over the canvas positions of real rows (padding rows weigh 0).
    logits = model.decode(noisy, dec, use_copies(cache, *encoded, detach=False), soft)  # [B, C, V] float32
    ce = F.cross_entropy(logits.reshape(b * c, -1), clean.reshape(-1), reduction="none").view(b, c)
    if config.weight_by_t:
        ce = ce / noise[:, None]
    weights = torch.where(real, 1.0, config.filler_weight) * row_weight[:, None]  # [B, C]
    diffusion = (ce * weights).sum() / weights.sum().clamp(min=1e-6)
    with torch.no_grad():
        hits = (logits.argmax(-1) == clean) & real
        accuracy = hits.sum() / real.sum().clamp(min=1)
    return LossParts(diffusion + config.ar_loss_weight * ar, diffusion.detach(), ar.detach(), accuracy, noise)
