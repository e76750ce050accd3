"""Autoregressive decoding with the encoder: the encoder is a complete Gemma 4 causal LM.

Same weights, same kernels and the same KV cache as block diffusion, one token per forward, so diffusion and
token-by-token decoding can be compared on identical hardware, weights and code (`dgemma bench --mode ar`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch

from dgemma.engine.denoisers import use_cuda_graphs
from dgemma.model.attention import AttentionBatch
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.kv_cache import KVCache


@dataclass
class ARResult:
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prefill_ms: float
    decode_ms: float  # time of the token-by-token part

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.decode_ms / 1e3) if self.decode_ms else 0.0


@torch.no_grad()
def generate_ar(
    model: DiffusionGemma,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,  # 0: greedy
    seed: int | None = None,
    eos_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
) -> list[ARResult]:
    """Decode every prompt token by token; rows that hit EOS stop being reported (they keep their cache row)."""
    device = model.device
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    # The prompts are encoded in one forward, then one token per forward: sliding layers need a ring of only
    # W - 1 + max(lengths) slots (the whole capacity when that is no smaller).
    cache = KVCache(model.config, b, max(lengths) + max_new_tokens, model.dtype, device, max_write_tokens=max(lengths))
    rows = list(range(b))
    gen = torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    start = time.perf_counter()
    ids = torch.full((b, max(lengths)), model.config.pad_token_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    batch = AttentionBatch.for_encoder(rows, [0] * b, lengths, model.config.sliding_window, cache)
    hidden = model.encode(ids.to(device), batch, cache)  # [B, T, H]
    last = hidden[torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1]  # [B, H]
    next_token = _pick(model.logits(last), temperature, gen)  # [B]
    sync()
    prefill_ms = (time.perf_counter() - start) * 1e3

    graph = None
    if temperature == 0 and use_cuda_graphs(model):
        from dgemma.engine.cuda_graphs import GraphedEncoder

        graph = GraphedEncoder(model, cache, 1, [b], next_token=True)  # one launch per token, not ~1000
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    reasons = ["length"] * b
    host = _HostTokens(b, device)
    start = time.perf_counter()
    for step in range(max_new_tokens):
        host.start(next_token)  # token `step`
        # Queue the forward of token step + 1 before the host waits for token `step`: the GPU computes it while the
        # host checks EOS and prepares the forward after it. Its input is the device tensor: it needs no host value.
        # When every row turns out to have stopped, this one forward ran for nothing (it writes only slots past
        # each row's end); none is queued past max_new_tokens, so positions stay within the cache.
        if step + 1 < max_new_tokens:
            prefix = [n + step for n in lengths]
            if graph is not None:
                if step == 0:
                    graph.run(rows, next_token[:, None], prefix)
                else:  # the next position of every row, its input the last forward's out_token: no host values
                    graph.run_next(b)
                # A view, no copy: the next replay overwrites out_token only after `host.start` has queued its copy.
                next_token = graph.out_token[:b]
            else:
                batch = AttentionBatch.for_encoder(rows, prefix, [1] * b, model.config.sliding_window, cache)
                hidden = model.encode(next_token[:, None], batch, cache)  # [B, 1, H]
                next_token = _pick(model.logits(hidden[:, 0]), temperature, gen)  # [B]
        for i, t in enumerate(host.wait()):
            if done[i]:
                continue
            if not ignore_eos and t in eos_token_ids:
                done[i], reasons[i] = True, "stop"
            else:
                outputs[i].append(t)
        if all(done):
            break
    sync()
    decode_ms = (time.perf_counter() - start) * 1e3
    return [ARResult(outputs[i], reasons[i], prefill_ms, decode_ms) for i in range(b)]


class _HostTokens:
    """Copies [B] token ids to the host behind the work queued so far; `wait` waits for that copy alone, not for the
    forwards queued after it (a CPU runs every op before returning: there is nothing to wait for)."""

    def __init__(self, b: int, device: torch.device):
        cuda = device.type == "cuda"
        self.buffer = torch.empty(b, dtype=torch.long, pin_memory=cuda)  # [B] pinned: the copy can be asynchronous
        self.copied = torch.cuda.Event() if cuda else None

    def start(self, tokens: torch.Tensor) -> None:
        self.buffer.copy_(tokens, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def wait(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.buffer.tolist()


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] float32 -> next token [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen).squeeze(-1)
