"""The encoder's KV cache, shared by many requests: one row per request, one slot per absolute position.

Layout per layer: keys and values [rows, capacity + 1, kv_heads, head_dim]. Slot p of a row holds the key
of position p, so attention masks are plain position arithmetic. The decoder writes the canvas being
denoised into the slots right after the row's prefix (scratch space that the encoder overwrites when the
canvas is committed), so a denoising step never copies the prefix. The last slot is a trash slot: padded
tokens of a ragged batch write there and no query ever reads it.
"""

from __future__ import annotations

import torch

from dgemma.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.rows = rows
        self.capacity = capacity  # positions per row (prefix + one canvas of scratch)
        self.trash_slot = capacity
        self.keys: list[torch.Tensor] = []  # per layer: [rows, capacity + 1, kv_heads, head_dim]
        self.values: list[torch.Tensor] = []
        for layer in range(config.num_layers):
            spec = config.attention(layer)
            shape = (rows, capacity + 1, spec.num_kv_heads, spec.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
