"""The tiny model with a window of 8 and canvases of 4 that the ring-cache and fused-encode tests share: prompts
several windows long are cheap, so sliding rings wrap many times."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from dgemma.checkpoint.random_init import InitScale, build_random_model, preset
from dgemma.config import ModelConfig
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache

W, C = 8, 4
CPU = torch.device("cpu")


def small_window_config() -> ModelConfig:
    return replace(preset("tiny"), sliding_window=W, canvas_length=C)


def small_window_model(config: ModelConfig) -> DiffusionGemma:
    # Peaked logits (large embedding): canvases stop early, and the sampler's choices are not near ties that
    # rounding could flip.
    return build_random_model(config, dtype="float32", seed=3, scale=InitScale(embed_std=3.0, perturb=0.1))


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def encode_in_pieces(config: ModelConfig, model: DiffusionGemma, rows_and_ids: Iterable[tuple[int, list[int]]],
                     max_write: int | None) -> KVCache:
    """A 3-row cache of 96 positions (a ring for `max_write` tokens a forward, or the full layout for None) holding
    each row's ids, encoded eagerly in pieces the ring takes."""
    cache = KVCache(config, 3, 96, torch.float32, CPU, max_write_tokens=max_write)
    piece = max_write or 96
    for row, ids in rows_and_ids:
        for start in range(0, len(ids), piece):
            chunk = ids[start : start + piece]
            model.encode(torch.tensor([chunk]), AttentionBatch.for_encoder([row], [start], [len(chunk)], W, cache),
                         cache)
    return cache
