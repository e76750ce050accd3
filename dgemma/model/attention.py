"""Attention over the shared KV cache, and the per-forward description of which keys each query sees.

Encoder and decoder run the same code; they differ only in the `AttentionBatch` they are given:
the encoder's queries are causal (and windowed on sliding layers), the decoder's canvas queries see the
cached prefix (its last W-1 positions on sliding layers) plus the whole canvas. Visibility is stated in positions;
a cache whose sliding layers keep a ring (kv_cache.py) has its masks built from the position each slot holds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import FULL, SLIDING, AttentionSpec
from dgemma.model.kv_cache import KVCache, ring_positions
from dgemma.model.side_stream import SideStream
from dgemma.model.layers import (
    RMSNorm,
    Rotation,
    linear,
    norm_heads,
    norm_rope,
    pack_linears,
    still_packed,
    use_fused_norm_rope,
)


def visible_positions(
    prefix: torch.Tensor | int,  # [B, 1], or one row's prefix length
    offsets: torch.Tensor,  # [1, T] or [T]: each token's place after the prefix
    causal_tokens: int,  # the first this many tokens are encoder tokens; the rest one decoder canvas after them
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one visibility rule of every forward: (positions, first position a query sees on sliding layers, one past
    the last position it sees), each [B, T] (or [T]). An encoder query at i sees (i - W, i]; a canvas query sees the
    last W-1 positions before its canvas and the whole canvas. Full layers see every position before the end."""
    positions = prefix + offsets
    causal = offsets < causal_tokens
    canvas_start = prefix + causal_tokens
    key_start = torch.where(causal, positions - window + 1, canvas_start - (window - 1))
    key_end = torch.where(causal, positions + 1, prefix + offsets.shape[-1])
    return positions, key_start, key_end


@dataclass
class AttentionBatch:
    """Where a forward's tokens sit in the cache and what they may attend to."""

    rows: torch.Tensor  # [B] cache row of each batch row
    positions: torch.Tensor  # [B, T] absolute position of each token (drives RoPE)
    write_slots: dict[str, torch.Tensor]  # layer type -> [B, T] slot each token's K/V goes to (trash for padding)
    # Layer type -> the slots [start, end) that are read, in this order; on a sliding ring end may pass the ring's
    # size S, and slots wrap around (slot i is i mod S), so a window read across the end stays in position order.
    kv_range: dict[str, tuple[int, int]]
    row_range: tuple[int, int] | None  # rows are the contiguous range [a, b): read the cache in place, no gather
    # Decoder canvases only: per row, the positions [start, end) every query of the row sees on sliding layers
    # ([B] each). One contiguous key range per row lets attention skip the mask (`canvas_attention`).
    canvas_keys: tuple[torch.Tensor, torch.Tensor] | None = None
    # Per query, the positions [key_start, key_end) it sees on sliding layers ([0, key_end) on full ones), [B, T]:
    # what `dgemma.kernels.cache_attention` reads instead of the masks.
    key_start: torch.Tensor | None = None
    key_end: torch.Tensor | None = None
    written_end: torch.Tensor | None = None  # [B] one past each row's last written position (places a ring's slots)
    ring: int | None = None  # the sliding layers' ring size S (position p in slot p % S); None: the full layout
    _flash_bounds: dict = field(default_factory=dict, repr=False)  # slots per row -> `flash_bounds`
    _masks: dict = field(default_factory=dict, repr=False)  # layer type -> `mask`

    def mask(self, kind: str) -> torch.Tensor:
        """Which slots of `kv_range[kind]` each query may attend to: [B, 1, T, end - start] bool, True = may attend.
        Built on first use, once per forward: only the masked attention paths read it (the flash and cache-attention
        kernels read the bounds), so a decoded token or a canvas on a GPU builds none (~15 small kernels)."""
        if kind not in self._masks:
            start, end = self.kv_range[kind]
            read = torch.arange(start, end, device=self.positions.device)  # [K] slots in reading order
            if kind == SLIDING and self.ring is not None:
                # Each slot read is judged by the position it holds, with the full layout's rule (`ring_positions`
                # proves the slot really holds that position wherever the window can open it); held >= 0 keeps slots
                # this request never wrote closed.
                held = ring_positions(self.written_end, self.ring)[:, read % self.ring][:, None, :]  # [B, 1, K]
            else:
                held = read  # [K] the position a slot holds is the slot
            visible = held < self.key_end[..., None]  # [B, T, K]
            if kind == SLIDING:
                visible = visible & (held >= self.key_start[..., None]) & (held >= 0)
            self._masks[kind] = visible[:, None]
        return self._masks[kind]

    def flash_bounds(self, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`canvas_attention`'s offsets into a cache flattened to [rows * slots, Hkv, D]: (cu_q [B + 1], cu_k
        [B + 1], used_k [B]), int32. Computed once per forward, not once per sliding layer (6 kernels each)."""
        if slots not in self._flash_bounds:
            start, end = self.canvas_keys
            b, c = self.positions.shape
            seq_starts = self.rows.to(torch.int32) * slots + start.to(torch.int32)  # [B]
            cu_k = torch.cat([seq_starts, seq_starts[-1:] + (end[-1:] - start[-1:]).to(torch.int32)])  # [B + 1]
            cu_q = torch.arange(0, (b + 1) * c, c, dtype=torch.int32, device=start.device)  # [B + 1]
            self._flash_bounds[slots] = (cu_q, cu_k, (end - start).to(torch.int32))
        return self._flash_bounds[slots]

    @classmethod
    def from_bounds(
        cls,
        rows: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B, T]
        write_slots: torch.Tensor,  # [B, T] a token's position, or cache.trash_slot for padding
        key_start_sliding: torch.Tensor,  # [B, T] first position a query may see on sliding layers
        key_end: torch.Tensor,  # [B, T] one past the last position a query may see
        written_end: torch.Tensor,  # [B] one past the last position of the row written, this forward included
        kv_len: int,  # full layers read positions [0, kv_len)
        cache: KVCache,
        sliding_range: tuple[int, int] | None = None,  # slots sliding layers read; None: [0, kv_len) or the ring
        row_range: tuple[int, int] | None = None,
        canvas: bool = False,  # every query of a row has the same bounds (a decoder canvas)
    ) -> "AttentionBatch":
        """Bounds on the device, from which masks are computed (`mask`): usable inside a CUDA graph capture."""
        if not cache.ring:
            start, end = sliding_range or (0, kv_len)
            sliding_slots = write_slots
        else:
            ring = cache.sliding_slots
            start, end = sliding_range or (0, ring)
            padding = write_slots == cache.trash_slot
            sliding_slots = torch.where(padding, ring, torch.remainder(write_slots, ring))  # ring: its trash slot
        canvas_keys = (key_start_sliding[:, 0].clamp(min=0), key_end[:, 0]) if canvas else None
        return cls(rows, positions, {FULL: write_slots, SLIDING: sliding_slots},
                   {FULL: (0, kv_len), SLIDING: (start, end)}, row_range, canvas_keys, key_start_sliding, key_end,
                   written_end, cache.sliding_slots if cache.ring else None)

    @classmethod
    def _build(cls, rows: list[int], positions, write_slots, key_start_sliding, key_end, written_end: list[int],
               sliding_start: int, cache: KVCache, canvas: bool = False) -> "AttentionBatch":
        """From host-side bounds: reads only the slots some query may see (`sliding_start`: the earliest position
        any query may see on sliding layers), and no gather when the rows are contiguous."""
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        row_range = (rows[0], rows[0] + len(rows)) if contiguous else None
        kv_len = max(written_end)
        first = max(0, sliding_start)
        if cache.ring:
            ring = cache.sliding_slots
            first = max(first, kv_len - ring)  # at most the whole ring
            # The slots of positions [first, kv_len), in position order (a window that wraps costs a copy): a row's
            # keys then sit at the index they have in the full layout, so results are bit-identical to it, unless
            # ragged rows spread wider than the ring (then a row's oldest keys sit after its newest).
            sliding = (first % ring, first % ring + kv_len - first)
        else:
            sliding = (first, kv_len)
        rows_t = torch.tensor(rows, device=positions.device)
        written_t = torch.tensor(written_end, device=positions.device)
        return cls.from_bounds(rows_t, positions, write_slots, key_start_sliding, key_end, written_t, kv_len, cache,
                               sliding, row_range, canvas)

    @classmethod
    def for_encoder(
        cls, rows: list[int], prefix_lens: list[int], new_lens: list[int], sliding_window: int, cache: KVCache
    ) -> "AttentionBatch":
        """Causal chunk: row b appends new_lens[b] tokens after its prefix_lens[b] cached ones (right-padded)."""
        cache.check_write(max(new_lens))
        device = cache.keys[0].device
        width = max(new_lens)
        prefix = torch.tensor(prefix_lens, device=device)[:, None]  # [B, 1]
        offsets = torch.arange(width, device=device)[None, :]  # [1, T]
        positions, key_start, key_end = visible_positions(prefix, offsets, width, sliding_window)  # [B, T] each
        valid = offsets < torch.tensor(new_lens, device=device)[:, None]
        write_slots = torch.where(valid, positions, torch.full_like(positions, cache.trash_slot))
        written_end = [p + n for p, n in zip(prefix_lens, new_lens)]
        return cls._build(rows, positions, write_slots, key_start, key_end, written_end,
                          min(prefix_lens) - sliding_window + 1, cache)

    @classmethod
    def for_decoder(
        cls, rows: list[int], prefix_lens: list[int], canvas_length: int, sliding_window: int, cache: KVCache
    ) -> "AttentionBatch":
        """Bidirectional canvas after each row's prefix: sliding layers see the last W-1 cached positions."""
        cache.check_write(canvas_length)
        device = cache.keys[0].device
        prefix = torch.tensor(prefix_lens, device=device)[:, None]  # [B, 1]
        offsets = torch.arange(canvas_length, device=device)[None, :]  # [1, C]
        positions, key_start, key_end = visible_positions(prefix, offsets, 0, sliding_window)  # [B, C] each
        written_end = [p + canvas_length for p in prefix_lens]
        return cls._build(rows, positions, positions, key_start, key_end, written_end,
                          min(prefix_lens) - (sliding_window - 1), cache, canvas=True)

    @classmethod
    def for_encode_and_decode(
        cls, rows: list[int], prefix_lens: list[int], canvas_length: int, sliding_window: int, cache: KVCache
    ) -> AttentionBatch:
        """A committed canvas and the next canvas in one forward (`DiffusionGemma.encode_and_decode_hidden`):
        per row, C causal encoder tokens after the prefix P, as `for_encoder`, then a decoder canvas whose prefix
        is P + C, as `for_decoder`. The bounds differ per query, so attention takes the masked path."""
        c = canvas_length
        cache.check_write(2 * c)
        device = cache.keys[0].device
        prefix = torch.tensor(prefix_lens, device=device)[:, None]  # [B, 1]
        offsets = torch.arange(2 * c, device=device)[None, :]  # [1, 2C]
        positions, key_start, key_end = visible_positions(prefix, offsets, c, sliding_window)  # [B, 2C] each
        written_end = [p + 2 * c for p in prefix_lens]
        return cls._build(rows, positions, positions, key_start, key_end, written_end,
                          min(prefix_lens) - sliding_window + 1, cache)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, spec: AttentionSpec, eps: float,
                 kernel_devices: tuple[str, ...] = ("cuda",)):
        super().__init__()
        self.num_heads = num_heads
        self.spec = spec
        self.eps = eps
        self.q_proj = nn.Linear(hidden_size, num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
        # Full layers use the raw key projection as values ("k-as-v").
        self.v_proj = nn.Linear(hidden_size, spec.num_kv_heads * spec.head_dim, bias=False) if spec.has_v_proj else None
        self.o_proj = nn.Linear(num_heads * spec.head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, eps)
        self.k_norm = RMSNorm(spec.head_dim, eps)
        # Device types that may run the fused norm+RoPE Triton kernel: () forces the eager path (tests compare
        # the two), and tests add "cpu" under TRITON_INTERPRET=1.
        self.kernel_devices = kernel_devices
        self.packed: torch.Tensor | None = None  # [(Hq + 2 Hkv) * D, H] (no v rows on full layers), see `pack`
        # Where the keys and values are normalised into the cache beside the queries' norm (inference on a GPU;
        # `DiffusionGemma.set_side_stream`).
        self.side_stream: SideStream | None = None

    def _projections(self) -> list[nn.Linear]:
        return [p for p in (self.q_proj, self.k_proj, self.v_proj) if p is not None]

    def pack(self) -> None:
        """q, k and v projections as one GEMM (inference; see `dgemma.model.layers.pack_linears`)."""
        self.packed = pack_linears(self._projections())

    def _apply(self, fn, recurse=True):
        self.packed = None  # a moved or cast weight is a new tensor: the packing ends
        self.side_stream = None  # the stream belongs to the device the layer leaves
        return super()._apply(fn, recurse)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, Hq, D], k and v [B, T, Hkv, D] (v is k on full layers), before their norms;
        views of one GEMM's output when packed."""
        b, t, _ = x.shape
        d, hkv = self.spec.head_dim, self.spec.num_kv_heads
        if still_packed(self.packed, self._projections()):
            sizes = [p.weight.shape[0] for p in self._projections()]
            parts = linear(x, self.packed, self.kernel_devices).split(sizes, dim=-1)
            q_raw, k_raw = parts[0].view(b, t, self.num_heads, d), parts[1].view(b, t, hkv, d)
            v_raw = parts[2].view(b, t, hkv, d) if self.v_proj is not None else k_raw
            return q_raw, k_raw, v_raw
        q_raw = linear(x, self.q_proj.weight, self.kernel_devices).view(b, t, self.num_heads, d)
        k_raw = linear(x, self.k_proj.weight, self.kernel_devices).view(b, t, hkv, d)
        if self.v_proj is None:
            return q_raw, k_raw, k_raw
        return q_raw, k_raw, linear(x, self.v_proj.weight, self.kernel_devices).view(b, t, hkv, d)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [B, T, Hq * D] -> [B, T, H]."""
        return linear(out, self.o_proj.weight, self.kernel_devices)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        rotation: Rotation,  # the batch's positions and this layer type's frequencies
        batch: AttentionBatch,
        kind: str,  # layer type: selects the mask and the slots read
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.spec.head_dim
        q_raw, k_raw, v_raw = self.project(x)  # [B, T, Hq, D], [B, T, Hkv, D] x 2
        keys, values = cache.keys[layer], cache.values[layer]  # [rows, slots + 1, Hkv, D]
        # Write first, then attend: the canvas (and a causal chunk) attends to its own keys through the cache.
        if (FUSED_QKV_NORM and keys.dtype == k_raw.dtype == rotation.dtype and rotation.inv_freq.dtype == torch.float32
                and use_fused_norm_rope(k_raw, None, None, self.kernel_devices)):
            from dgemma.kernels.norm_rope import qkv_norm_rope_triton

            q = qkv_norm_rope_triton(q_raw, k_raw, v_raw, self.q_norm.weight, self.k_norm.weight, rotation.positions,
                                     rotation.inv_freq, self.eps,
                                     (keys, values, batch.rows, batch.write_slots[kind]))  # [B, T, Hq, D]
        else:
            cos, sin = rotation.tables()  # [B, T, D] each
            q = self.norm_and_write(q_raw, k_raw, v_raw, cos, sin, batch, kind, cache, layer)
        if use_canvas_attention(q, batch, kind, cache, self.kernel_devices):
            out = canvas_attention(q, keys, values, *batch.flash_bounds(keys.shape[1]))  # [B, T, Hq, D]
            return self.project_out(out.reshape(b, t, self.num_heads * d))
        if use_cache_attention(q, batch, kind, cache, self.kernel_devices):
            from dgemma.kernels.cache_attention import cache_attention_triton  # no mask over the whole ring

            sliding = kind == SLIDING  # a window (on a ring: position p in slot p % S); full layers: all before
            out = cache_attention_triton(q, keys, values, batch.rows, batch.key_start if sliding else None,
                                         batch.key_end, cache.sliding_slots if sliding and cache.ring else None)
            return self.project_out(out.reshape(b, t, self.num_heads * d))
        keys, values = read_slots(keys, batch, kind, cache), read_slots(values, batch, kind, cache)

        mask = batch.mask(kind)
        if q.is_cuda and d > 256:
            # No fused kernel takes head_dim 512 (full layers); SDPA would fall back to float32 math.
            return self.project_out(grouped_attention(q, keys, values, mask).reshape(b, t, self.num_heads * d))
        # Gemma 4 attention has scale 1.0: q and k are RMS-normalised instead of scaled by 1/sqrt(d).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask, scale=1.0, enable_gqa=True,
        )  # [B, Hq, T, D]
        return self.project_out(out.transpose(1, 2).reshape(b, t, self.num_heads * d))

    def norm_and_write(self, q_raw: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, batch: AttentionBatch, kind: str, cache: KVCache, layer: int) -> torch.Tensor:
        """The queries normalised and rotated ([B, T, Hq, D], returned) and the keys and values into the cache, in
        three norms: the path of eager devices, and of GPUs with `FUSED_QKV_NORM` off."""
        side = SideStream.active(self.side_stream)
        if side:  # the keys' and values' kernels run beside the queries' (two short chains instead of one longer)
            side.fork(self.write_kv, k_raw, v_raw, cos, sin, batch, kind, cache, layer)
        q = norm_rope(q_raw, self.q_norm.weight, cos, sin, self.eps, self.kernel_devices)
        if side:
            side.join()
        else:
            self.write_kv(k_raw, v_raw, cos, sin, batch, kind, cache, layer)
        return q

    def write_kv(self, k_raw: torch.Tensor, v_raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 batch: AttentionBatch, kind: str, cache: KVCache, layer: int) -> None:
        """The new keys (normalised, rotated) and values (normalised) into the cache at the batch's write slots."""
        keys, values = cache.keys[layer], cache.values[layer]  # [rows, slots + 1, Hkv, D]
        slots = batch.write_slots[kind]  # [B, T]
        if keys.dtype == k_raw.dtype and use_fused_norm_rope(k_raw, cos, sin, self.kernel_devices):
            from dgemma.kernels.norm_rope import norm_rope_triton  # writes the cache itself: no index kernels

            norm_rope_triton(k_raw, self.k_norm.weight, cos, sin, self.eps, into=(keys, batch.rows, slots))
            norm_rope_triton(v_raw, None, None, None, self.eps, into=(values, batch.rows, slots))
            return
        k = norm_rope(k_raw, self.k_norm.weight, cos, sin, self.eps, self.kernel_devices)
        v = norm_heads(v_raw, self.eps, self.kernel_devices)
        keys[batch.rows[:, None], slots] = k.to(keys.dtype)  # autocast may compute k in float32
        values[batch.rows[:, None], slots] = v.to(values.dtype)


# Whether a layer's query, key and value norms run as one kernel that also computes the rotation's angles
# (`qkv_norm_rope_triton`) where the fused norms run, instead of three kernels (the keys' and values' on the side
# stream) over cos/sin tables built each forward. Bit-identical either way (tests/test_gpu.py). On: with the AR loop
# advancing on the device (`GraphedEncoder.run_next`), one H100 (`bash scripts/ar_chain_ab.sh`, three rounds,
# 2026-12-07) gave an AR token 281.5 / 281.5 / 281.7 -> 286.2 / 286.5 / 286.5 tok/s, and 283.3 / 283.6 / 283.6 without
# PDL on the one launch, which therefore keeps it. (The nineteenth session measured it slower before the loop advanced
# on the device: 266.5 / 270.4 -> 254.5 / 257.0 tok/s; a batch-1 step 23.24 / 23.15 -> 23.17 / 22.88 ms.)
FUSED_QKV_NORM = True


# Where `cache_attention` runs, from measurements on an H100 (docs/benchmarks.md):
# * a sliding layer's attention over a ring (a long context), where it replaces SDPA with a mask over the whole ring
#   (a canvas at a 4096-token prefix: 307 -> 145 us a layer at batch 1, 697 -> 291 us at batch 8);
# * a full layer with head_dim > 256 (the released model's 512, where no flash kernel runs), in place of two
#   batched matmuls that read and mask every slot. With scores as one product over the whole head_dim (seventh
#   session's tiles), a canvas at a 1024-token prefix: 229 -> 64 us a layer at batch 1, 1416 -> 423 us at batch 8;
#   whole model: step b8 68.70 -> 66.04 ms, a 1024-token prefill 35.12 -> 33.45 ms, step b1 24.51 -> 24.44 ms.
#   Smaller full layers (SDPA's) only in a cache of at least 4096 positions, where the earlier sweep measured it;
# * from a canvas-sized number of queries up: for single tokens its grid had a program per KV head only (AR 159 ->
#   125 tok/s on sliding layers).
# Single tokens (autoregressive decoding) take it on every layer with the key range split over many programs
# (flash decoding). H100, one token at a 1152-slot cache, per layer: sliding 16.4 -> 8.8 us (SDPA with a mask),
# full 20.8 -> 10.5 us (two batched matmuls over every slot); AR end to end 187.6/184.8 -> 197.5/194.0 tok/s
# (`scripts/decode_attention_ab.py`, off/on/off/on, 2026-12-07). A canvas gains nothing from splitting (its 256
# queries already fill the grid: 92 -> 58 us at best on a sliding layer, against flash attention's 41 us).
CACHE_ATTENTION_MIN_TOKENS = 16
CACHE_ATTENTION_MAX_TOKENS = 2048  # longer prompt chunks: not measured against the masked path
CACHE_ATTENTION_MIN_FULL_POSITIONS = 4096
CACHE_ATTENTION_DECODE_TOKENS = 1  # queries a row at most for the split (decoding) path; 0: off


def use_cache_attention(q: torch.Tensor, batch: AttentionBatch, kind: str, cache: KVCache,
                        kernel_devices: tuple[str, ...]) -> bool:
    """Whether attention runs as `dgemma.kernels.cache_attention`: a decoded token on any layer, or a sliding layer
    on a ring or a full layer (above), inference in bf16/fp16 with a power-of-two head_dim >= 16, on a kernel device.
    Shapes, dtypes and flags only: a captured graph keeps the choice."""
    t, d = q.shape[1], q.shape[-1]
    chunk = (CACHE_ATTENTION_MIN_TOKENS <= t <= CACHE_ATTENTION_MAX_TOKENS
             and ((kind == SLIDING and cache.ring)
                  or (kind == FULL and (d > 256 or cache.capacity >= CACHE_ATTENTION_MIN_FULL_POSITIONS))))
    return (
        (t <= CACHE_ATTENTION_DECODE_TOKENS or chunk)
        and batch.key_end is not None
        and q.device.type in kernel_devices
        and q.dtype in (torch.bfloat16, torch.float16)
        and d >= 16 and d & (d - 1) == 0
        and not torch.is_grad_enabled()
    )


def use_canvas_attention(q: torch.Tensor, batch: AttentionBatch, kind: str, cache: KVCache,
                         kernel_devices: tuple[str, ...]) -> bool:
    """Whether a sliding layer's decoder attention runs as `canvas_attention` (flash attention over each row's key
    range, no mask): CUDA inference in bf16/fp16 with head_dim <= 256, a decoder batch, and the full layout
    (in a ring a row's window may wrap around the ring's end: two ranges). Shapes, dtypes and flags only: a
    captured graph keeps the choice."""
    return (
        kind == SLIDING
        and batch.canvas_keys is not None
        and not cache.ring
        and q.device.type == "cuda" and "cuda" in kernel_devices
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
        and not torch.is_grad_enabled()
        and flash_varlen_supported()  # last: torch.compile (training, kernels off) cannot trace the schema lookup
    )


@functools.cache
def flash_varlen_supported() -> bool:
    """This PyTorch's flash attention op takes per-sequence key counts (seqused_k), which `canvas_attention` needs."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and any(a.name == "seqused_k" for a in op.default._schema.arguments)


def canvas_attention(
    q: torch.Tensor,  # [B, C, Hq, D] the canvas queries
    keys: torch.Tensor,  # [rows, slots + 1, Hkv, D] one layer's whole cache (slot = position)
    values: torch.Tensor,  # [rows, slots + 1, Hkv, D]
    cu_q: torch.Tensor,  # [B + 1] int32: where each row's queries start in q flattened to [B * C, Hq, D]
    cu_k: torch.Tensor,  # [B + 1] int32: where each row's first visible key sits in the flattened cache
    used_k: torch.Tensor,  # [B] int32: how many keys each row sees (`AttentionBatch.flash_bounds`)
) -> torch.Tensor:
    """Attention of each row's canvas over one contiguous key range of its cache row, with no mask: [B, C, Hq, D].

    A decoder canvas sees one contiguous key range per row, and masked attention over a fixed key length (what a
    captured graph needs) cost 143 us a layer at batch 1 on an H200 where the same attention without a mask took
    37 us. Flash attention's variable-length mode takes per-sequence offsets into a flat key tensor (cu_seqlens_k)
    and a per-sequence key count (seqused_k): the cache, flattened to [rows * (slots + 1), Hkv, D], is addressed in
    place, with no gather and no mask. All bounds stay on the device, so it is capturable. Grouped-query heads are
    native to the kernel. Scale 1.0 as everywhere in Gemma 4 attention.
    """
    b, c, hq, d = q.shape
    slots = keys.shape[1]
    flat_k = keys.view(-1, keys.shape[2], d)  # [rows * slots, Hkv, D]
    flat_v = values.view(-1, values.shape[2], d)
    out = torch.ops.aten._flash_attention_forward(
        q.reshape(b * c, hq, d), flat_k, flat_v, cu_q, cu_k, c, slots, 0.0, False, False,
        scale=1.0, seqused_k=used_k,
    )[0]  # [B * C, Hq, D]
    return out.view(b, c, hq, d)


def read_slots(t: torch.Tensor, batch: AttentionBatch, kind: str, cache: KVCache) -> torch.Tensor:
    """The batch's rows and the slots its `kind` layers read: [rows, slots + 1, Hkv, D] -> [B, end - start, Hkv, D].
    A view when nothing wraps around a ring's end and the rows are contiguous, else a copy."""
    start, end = batch.kv_range[kind]
    if batch.row_range is not None:
        t = t[batch.row_range[0] : batch.row_range[1]]
    else:
        t = t.index_select(0, batch.rows)
    slots = cache.slots_of_kind[kind]
    if end <= slots:
        return t[:, start:end]
    return torch.cat([t[:, start:slots], t[:, : end - slots]], dim=1)  # wrapped: the ring's end, then its start


_SCORES_BUDGET_BYTES = 1 << 30  # float32 attention scores one grouped_attention call may hold at once


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as two batched matmuls in the activation dtype (as the reference's eager path computes it),
    with the query heads of a KV head stacked so keys are never repeated.

    q: [B, T, Hq, D]; keys, values: [B, S, Hkv, D]; mask: [B, 1, T, S] -> [B, T, Hq, D].
    """
    b, t, hq, d = q.shape
    s, hkv = keys.shape[1], keys.shape[2]
    # The float32 softmax of one forward's scores would be b*Hq*T*S*4 bytes (17 GiB for an 8192-token chunk over a
    # 32k context): long prompts go in query chunks, each row's softmax is its own, so the result is unchanged.
    rows = max(1, _SCORES_BUDGET_BYTES // (b * hq * s * 4))
    if t > rows:
        return torch.cat([grouped_attention(q[:, i : i + rows], keys, values, mask[:, :, i : i + rows])
                          for i in range(0, t, rows)], dim=1)
    g = hq // hkv
    qg = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)  # [B, Hkv, G*T, D]
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1))  # [B, Hkv, G*T, S], scale 1.0
    scores = scores.view(b, hkv, g, t, s).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(b, hkv, g * t, s)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [B, Hkv, G*T, D]
    return out.view(b, hkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d)
