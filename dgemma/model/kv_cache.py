"""The encoder's KV cache, shared by many requests: one row per request.

Full-attention layers: keys and values [rows, capacity + 1, kv_heads, head_dim]. Slot p of a row holds the key of
position p, so their masks are plain position arithmetic.

Sliding-window layers: by default the same layout. A cache built with `max_write_tokens` (the most tokens one
forward writes into a row: the engine knows it) gives them instead a ring of S = min(capacity, W - 1 +
max_write_tokens) slots, [rows, S + 1, kv_heads, head_dim], position p in slot p % S: a sliding query never sees
further back than W - 1 positions, so the rest of the prefix need not be kept. With S = capacity the ring is the
full layout (slot = position), so small caches do not change at all. Why S slots are enough, and which position
a slot holds, is in `ring_positions`.

The decoder writes the canvas being denoised into the slots of the positions right after the row's prefix
(scratch space that the encoder overwrites when the canvas is committed), so a denoising step never copies the
prefix. The last slot of every layer is a trash slot: padded tokens of a ragged batch write there and no query
ever reads it.
"""

from __future__ import annotations

import torch

from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.errors import ConfigError


def slot_bytes(config: ModelConfig, dtype: torch.dtype, kind: str) -> int:
    """Bytes one slot of one row takes over all layers of type `kind` (SLIDING or FULL), keys and values."""
    return sum(2 * config.attention(i).num_kv_heads * config.attention(i).head_dim * dtype.itemsize
               for i in range(config.num_layers) if config.layer_types[i] == kind)


def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one position of one row takes in the full layout, keys and values of every layer."""
    return slot_bytes(config, dtype, SLIDING) + slot_bytes(config, dtype, FULL)


def sliding_slots(config: ModelConfig, capacity: int, max_write_tokens: int | None) -> int:
    """Slots per row of a sliding layer: capacity (full layout, `max_write_tokens` None), else the ring size
    min(capacity, W - 1 + max_write_tokens)."""
    if max_write_tokens is None:
        return capacity
    if not isinstance(max_write_tokens, int) or max_write_tokens <= 0:
        raise ConfigError(f"max_write_tokens must be a positive integer or None, got {max_write_tokens!r}")
    return min(capacity, config.sliding_window - 1 + max_write_tokens)


def cache_bytes(config: ModelConfig, dtype: torch.dtype, rows: int, capacity: int,
                max_write_tokens: int | None = None) -> int:
    """What `KVCache(config, rows, capacity, dtype, device, max_write_tokens).nbytes` will be (trash slots included)."""
    s = sliding_slots(config, capacity, max_write_tokens)
    return rows * ((capacity + 1) * slot_bytes(config, dtype, FULL) + (s + 1) * slot_bytes(config, dtype, SLIDING))


def step_workspace_bytes(config: ModelConfig, rows: int) -> int:
    """A generous estimate of what a denoising step of `rows` canvases needs besides weights and cache: the bf16
    LM-head output over the vocabulary (also the self-conditioning probabilities) dominates."""
    return int(1.5 * rows * config.canvas_length * config.vocab_size * 2) + (2 << 30)


def max_positions_that_fit(config: ModelConfig, dtype: torch.dtype, rows: int, free_bytes: int,
                           max_write_tokens: int | None = None) -> int:
    """Positions per row (the capacity) a cache of `rows` rows can have in `free_bytes`, leaving the step's
    workspace; with `max_write_tokens`, for a cache whose sliding layers keep a ring (see `sliding_slots`)."""
    room = free_bytes - step_workspace_bytes(config, rows)
    full_layout = max(0, room // (rows * bytes_per_position(config, dtype)) - 1)
    if max_write_tokens is None:
        return full_layout
    ring = sliding_slots(config, 1 << 62, max_write_tokens)  # the ring of an unbounded capacity
    if full_layout <= ring:  # up to `ring` positions the ring is the full layout
        return full_layout
    # Beyond it the sliding layers cost a fixed ring + 1 slots per row; only full layers grow with the capacity.
    per_full = slot_bytes(config, dtype, FULL)
    if per_full == 0:  # no full layer: any length fits
        return config.max_position_embeddings
    fixed = (ring + 1) * slot_bytes(config, dtype, SLIDING)
    return max(0, (room // rows - fixed) // per_full - 1)


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: the driver's free memory plus what PyTorch's caching allocator holds
    reserved but unused (it hands that out first)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits_on_device(config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype,
                         device: torch.device, max_write_tokens: int | None = None) -> None:
    """A clear error before allocating, instead of an out-of-memory error halfway through start-up."""
    if device.type != "cuda" or torch.compiler.is_compiling():  # a compiled training step cannot trace the query
        return
    free = free_device_bytes(device)
    fit = max_positions_that_fit(config, dtype, rows, free, max_write_tokens)
    if capacity > fit:
        need = cache_bytes(config, dtype, rows, capacity, max_write_tokens)
        ring = sliding_slots(config, capacity, max_write_tokens)
        raise ConfigError(
            f"the KV cache for max_num_seqs={rows} x max_model_len={capacity} (sliding layers keeping {ring} slots "
            f"per row) needs {need / 1e9:.1f} GB, but {free / 1e9:.1f} GB are free on {device} after the weights "
            f"(and a step needs ~{step_workspace_bytes(config, rows) / 1e9:.1f} GB of workspace): at most {fit} "
            f"positions per row fit; lower max_model_len or max_num_seqs"
        )


def ring_positions(written_end: torch.Tensor, ring: int) -> torch.Tensor:
    """The position each slot of a sliding ring holds: written_end [B] -> [B, ring]; < 0: never written.

    written_end is one past the last position the row has written, this forward's writes included. Slot s holds
    the latest position q < written_end with q = s (mod ring): q = L - 1 - ((L - 1 - s) mod ring).

    Why no query ever reads a slot whose content is not that q. Let T_max = ring - (W - 1): `KVCache.check_write`
    refuses forwards that write more tokens per row, and every forward writes its K/V before its queries attend.
    Take a forward writing positions [a, a + T) of a row, T <= T_max, so L = a + T. Its queries sit at t >= a (the
    decoder's canvas starts at the prefix P = a) and may see, on sliding layers, only positions q >= a - W + 1
    (causal: q > t - W; canvas: q >= P - W + 1, and a canvas that follows a committed canvas encoded in the same
    forward has P = a + C), and q < L. These at most W - 1 + T <= ring positions fall in distinct slots. Each such
    q was written: by this forward if q >= a; else it is committed, and the last write of q was the encoder's (a
    canvas's scratch write of q came before the commit that encoded q). Its slot was written again only if some
    forward wrote a position q + k * ring, k >= 1, i.e. >= a - W + 1 + ring >=
    a + T_max. None did: every forward of the row's request so far started at a position <= a (prefixes only grow,
    and an earlier canvas started at an earlier prefix) and wrote only positions below its start + T_max. So every
    slot a mask may open holds exactly ring_positions(L). A slot holding anything else (an older position, a
    scratch canvas position >= L, a previous request's data) maps to q < a - W + 1 or q < 0, which the masks close.
    """
    slots = torch.arange(ring, device=written_end.device)  # [S]
    last = written_end[:, None] - 1  # [B, 1]
    return last - torch.remainder(last - slots, ring)  # [B, S]


class KVCache:
    def __init__(self, config: ModelConfig, rows: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 max_write_tokens: int | None = None):
        """`max_write_tokens`: None keeps every position on every layer (the training objective's decoder reads a
        shorter prefix than its encoder wrote, which a ring cannot serve); an int gives sliding layers a ring
        sized for forwards that write at most that many tokens per row (see `sliding_slots`)."""
        check_fits_on_device(config, rows, capacity, dtype, torch.device(device), max_write_tokens)
        self.rows = rows
        self.capacity = capacity  # positions per row (prefix + one canvas of scratch)
        self.sliding_window = config.sliding_window
        self.sliding_slots = sliding_slots(config, capacity, max_write_tokens)  # S: slots of a sliding layer
        # A real ring (smaller than the full layout) limits the tokens a forward may write per row.
        self.ring = self.sliding_slots < capacity
        self.max_write_tokens = self.sliding_slots - (config.sliding_window - 1) if self.ring else None
        self.trash_slot = capacity  # a full layer's trash slot; a sliding ring's is sliding_slots
        self.slots_of_kind = {FULL: capacity, SLIDING: self.sliding_slots}
        self.keys: list[torch.Tensor] = []  # per layer: [rows, slots + 1, kv_heads, head_dim]
        self.values: list[torch.Tensor] = []
        for layer in range(config.num_layers):
            spec = config.attention(layer)
            shape = (rows, self.slots_of_kind[config.layer_types[layer]] + 1, spec.num_kv_heads, spec.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))

    def fits_write(self, tokens: int) -> bool:
        """Whether one forward may write `tokens` tokens per row (see `check_write`)."""
        return not self.ring or tokens <= self.max_write_tokens

    def check_write(self, tokens: int) -> None:
        """Refuse a forward that writes more tokens per row than the sliding ring was sized for: it would
        overwrite keys that its own queries still need (see `ring_positions`)."""
        if not self.fits_write(tokens):
            raise ValueError(
                f"a forward writes {tokens} tokens into a cache row, but this cache's sliding layers keep a ring of "
                f"{self.sliding_slots} slots (window {self.sliding_window} - 1 + {self.max_write_tokens}), sized for "
                f"at most {self.max_write_tokens} tokens per forward: split the work into smaller chunks or build the "
                f"cache with a larger max_write_tokens"
            )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
