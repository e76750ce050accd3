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
from dgemma.errors import ConfigError


def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one position of one row takes, keys and values of every layer."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * config.attention(i).num_kv_heads * config.attention(i).head_dim * size
               for i in range(config.num_layers))


def step_workspace_bytes(config: ModelConfig, rows: int) -> int:
    """A generous estimate of what a denoising step of `rows` canvases needs besides weights and cache: the bf16
    LM-head output over the vocabulary (also the self-conditioning probabilities) dominates."""
    return int(1.5 * rows * config.canvas_length * config.vocab_size * 2) + (2 << 30)


def max_positions_that_fit(config: ModelConfig, dtype: torch.dtype, rows: int, free_bytes: int) -> int:
    """Positions per row a cache of `rows` rows can have in `free_bytes`, leaving the step's workspace."""
    room = free_bytes - step_workspace_bytes(config, rows)
    return max(0, room // (rows * bytes_per_position(config, dtype)) - 1)


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: the driver's free memory plus what PyTorch's caching allocator holds
    reserved but unused (it hands that out first)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits_on_device(config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype,
                         device: torch.device) -> None:
    """A clear error before allocating, instead of an out-of-memory error halfway through start-up."""
    if device.type != "cuda":
        return
    free = free_device_bytes(device)
    fit = max_positions_that_fit(config, dtype, rows, free)
    if capacity > fit:
        need = rows * (capacity + 1) * bytes_per_position(config, dtype)
        raise ConfigError(
            f"the KV cache for max_num_seqs={rows} x max_model_len={capacity} needs {need / 1e9:.1f} GB, but "
            f"{free / 1e9:.1f} GB are free on {device} after the weights (and a step needs "
            f"~{step_workspace_bytes(config, rows) / 1e9:.1f} GB of workspace): at most {fit} positions per row "
            f"fit; lower max_model_len or max_num_seqs"
        )


class KVCache:
    def __init__(self, config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype, device: torch.device):
        check_fits_on_device(config, rows, capacity, dtype, torch.device(device))
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
