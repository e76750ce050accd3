"""Training data as token ids: render `tasks.Example`s through the chat template, then batch them for the objective.

One example becomes `prompt_ids` (exactly what `LLM.chat` feeds the model: the template's generation prompt) and
`response_ids` (what the model must write, ending with its stop token). The response is the target assistant turn
rendered by the same template, so thinking, tool calls and tool answers are written in the released format:

    text answer      ...<|turn>model\\n | 134<turn|>
    thinking         ...<|turn>model\\n | <|channel>thought\\nreasoning\\n<channel|>134<turn|>
    tool call        ...<|turn>model\\n | <|tool_call>call:get_time{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>
    after a tool     ...<tool_response|> | It is 12:30 in Oslo.<turn|>

The template drops earlier thoughts from history, so a thinking target is written here with the template's own
channel markup rather than cut out of a rendering.

Canvas alignment: generation starts its first canvas right after the prompt and commits whole canvases, so block k
of a response covers response tokens [k*C, (k+1)*C) and is denoised after the prompt plus k full canvases. A block
that runs past the stop token is filled with <pad>, which the model learns to predict (its canvases then become
confident and stop early instead of leaving noise after the answer).

A pre-tokenized corpus is one flat int32 tensor plus offsets, so millions of examples cost a few hundred MB and
batches are cut from it without Python objects per token.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from dgemma.chat_format import CHANNEL_END, CHANNEL_START, THOUGHT_HEADER, TURN_END
from dgemma.errors import ConfigError
from dgemma.tokenizer import Tokenizer
from dgemma.train.tasks import FAMILIES, Example, generate_examples

IGNORE = -100  # target id that cross-entropy skips


# --------------------------------------------------------------------------------------------------
# One example -> (prompt ids, response ids)
# --------------------------------------------------------------------------------------------------


def response_text(tokenizer: Tokenizer, example: Example) -> tuple[str, str]:
    """(prompt text, response text) of an example, both rendered by the tokenizer's chat template."""
    prompt = tokenizer.render_chat(
        example.prompt_messages, example.tools, add_generation_prompt=True, enable_thinking=example.enable_thinking
    )
    target = example.target
    reasoning = target.get("reasoning_content")
    if reasoning is not None and example.enable_thinking and not target.get("tool_calls"):
        # The template keeps no thought of a final answer in history: write the channel the way it renders one.
        thought = f"{CHANNEL_START}{THOUGHT_HEADER}{reasoning}\n{CHANNEL_END}"
        return prompt, f"{thought}{target.get('content') or ''}{TURN_END}"
    full = tokenizer.render_chat(
        example.messages, example.tools, add_generation_prompt=False, enable_thinking=example.enable_thinking
    )
    if not full.startswith(prompt):
        raise ConfigError(
            f"{example.family} example: the rendered conversation does not extend its rendered prompt; "
            "the chat template must render history the way it renders the generation prompt"
        )
    response = full[len(prompt):]
    if response.endswith(TURN_END + "\n"):
        response = response[:-1]  # the newline after <turn|> is never generated: <turn|> stops the row
    return prompt, response


def encode_example(tokenizer: Tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids). Encoded separately, exactly as generation sees them."""
    prompt, response = response_text(tokenizer, example)
    return tokenizer.encode(prompt), tokenizer.encode(response)


# --------------------------------------------------------------------------------------------------
# A pre-tokenized corpus
# --------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Tokenized examples: example i is tokens[starts[i] : starts[i] + lengths[i]], its prompt the first
    prompt_lens[i] of them and its response the rest."""

    tokens: torch.Tensor  # [total] int32
    starts: torch.Tensor  # [N] int64
    lengths: torch.Tensor  # [N] int64 prompt + response
    prompt_lens: torch.Tensor  # [N] int64
    families: torch.Tensor  # [N] int64 index into `family_names`
    family_names: list[str]
    # [F] int64: examples of each family left out for being longer than max_length (None: not counted)
    dropped: torch.Tensor | None = None

    def dropped_by_family(self) -> dict[str, int]:
        """{family: examples left out for length}, families with none left out omitted."""
        if self.dropped is None:
            return {}
        return {name: int(n) for name, n in zip(self.family_names, self.dropped.tolist()) if n}

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def example(self, i: int) -> tuple[list[int], int]:
        """(all ids, prompt length) of example i."""
        start, length = int(self.starts[i]), int(self.lengths[i])
        return self.tokens[start : start + length].tolist(), int(self.prompt_lens[i])

    @staticmethod
    def concat(parts: Sequence["Corpus"]) -> "Corpus":
        names = parts[0].family_names
        offsets, total = [], 0
        for part in parts:
            if part.family_names != names:
                raise ValueError("corpora with different family tables cannot be joined")
            offsets.append(total)
            total += int(part.tokens.shape[0])
        return Corpus(
            tokens=torch.cat([p.tokens for p in parts]),
            starts=torch.cat([p.starts + off for p, off in zip(parts, offsets)]),
            lengths=torch.cat([p.lengths for p in parts]),
            prompt_lens=torch.cat([p.prompt_lens for p in parts]),
            families=torch.cat([p.families for p in parts]),
            family_names=list(names),
            dropped=torch.stack([p.dropped if p.dropped is not None else torch.zeros(len(names), dtype=torch.int64)
                                 for p in parts]).sum(0),
        )


def tokenize_examples(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int | None = None) -> Corpus:
    """Encode examples into a Corpus; examples longer than `max_length` tokens are dropped."""
    names = list(FAMILIES)
    flat: list[int] = []
    starts, lengths, prompt_lens, families = [], [], [], []
    dropped = torch.zeros(len(names), dtype=torch.int64)
    for example in examples:
        prompt, response = encode_example(tokenizer, example)
        if max_length is not None and len(prompt) + len(response) > max_length:
            dropped[names.index(example.family)] += 1
            continue
        starts.append(len(flat))
        flat.extend(prompt)
        flat.extend(response)
        lengths.append(len(prompt) + len(response))
        prompt_lens.append(len(prompt))
        families.append(names.index(example.family))
    return Corpus(
        tokens=torch.tensor(flat, dtype=torch.int32),
        starts=torch.tensor(starts, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.int64),
        families=torch.tensor(families, dtype=torch.int64),
        family_names=names,
        dropped=dropped,
    )


def check_lengths(chunk: Corpus, max_length: int | None) -> None:
    """Refuse a corpus in which some family lost every example to max_length: training would silently go without
    it (e.g. tool prompts under a letter-level tokenizer and the default 512). Partial losses are only logged."""
    kept = torch.bincount(chunk.families, minlength=len(chunk.family_names))
    dropped = chunk.dropped_by_family()
    lost = [name for name in dropped if kept[chunk.family_names.index(name)] == 0]
    if lost:
        counts = ", ".join(f"{name} ({dropped[name]})" for name in lost)
        raise ConfigError(f"every generated example of {counts} is longer than max_length={max_length} tokens: "
                          "raise --max-length or leave those families out")


# Worker state for `build_corpus`: the tokenizer is built once per process, not once per chunk.
_WORKER: dict = {}


def _init_worker(tokenizer_dir: str) -> None:
    torch.set_num_threads(1)  # workers only render and tokenize; many workers with many threads each would thrash
    _WORKER["tokenizer"] = Tokenizer.from_dir(tokenizer_dir)


def _make_chunk(tokenizer: Tokenizer, job: tuple) -> Corpus:
    seed, n, families, weights, max_length = job
    return tokenize_examples(tokenizer, generate_examples(seed, n, families, weights), max_length)


def _chunk(job: tuple) -> Corpus:
    return _make_chunk(_WORKER["tokenizer"], job)


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk `index`: chunks are independent streams, so any worker may make any chunk."""
    return seed * 1_000_003 + index


class CorpusStream:
    """The training corpus, `n` examples generated and tokenized in chunks by worker processes (deterministic for
    `seed`, whatever the number of workers), handed over chunk by chunk in order as the workers finish them: the
    trainer starts on chunk 0 while the rest are made. `part(i)` waits for chunk i; `corpus()` waits for all and
    joins them. With one worker, chunks are made in this process when asked for. Close it (or use `with`) to stop
    the workers."""

    def __init__(self, tokenizer_dir: str, seed: int, n: int, families: list[str] | None = None,
                 weights: dict[str, float] | None = None, max_length: int | None = None, workers: int = 1,
                 chunk_size: int = 4096):
        if n <= 0:
            raise ConfigError(f"the number of training examples must be positive, got {n}")
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.workers = max(1, workers)
        self._jobs = [
            (chunk_seed(seed, i), min(chunk_size, n - i * chunk_size), families, weights, max_length)
            for i in range(math.ceil(n / chunk_size))
        ]
        self._parts: dict[int, Corpus] = {}
        self._joined: Corpus | None = None
        self._start = time.perf_counter()
        self.seconds: float | None = None  # from the start to the last chunk made, once known
        self._pool = None
        if self.workers == 1 or len(self._jobs) == 1:
            self._tokenizer = Tokenizer.from_dir(tokenizer_dir)
            self._futures = None
        else:
            # spawn: forking after CUDA or OpenMP started is unsafe. An executor (unlike multiprocessing.Pool) raises
            # when a worker dies instead of replacing it forever.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(tokenizer_dir,))
            self._futures = [self._pool.submit(_chunk, job) for job in self._jobs]

    @property
    def num_parts(self) -> int:
        return len(self._jobs)

    @property
    def dropped(self) -> dict[str, int]:
        """Examples left out for length, by family, in the chunks made so far."""
        if self._joined is not None:
            return self._joined.dropped_by_family()
        totals: dict[str, int] = {}
        for part in self._parts.values():
            for name, n in part.dropped_by_family().items():
                totals[name] = totals.get(name, 0) + n
        return totals

    def part(self, i: int) -> Corpus:
        """Chunk i (waits for it)."""
        if self._joined is not None:
            raise RuntimeError("the chunks were joined by corpus(): index the joined corpus instead")
        if i not in self._parts:
            if self._futures is None:
                self._parts[i] = _make_chunk(self._tokenizer, self._jobs[i])
            else:
                self._parts[i] = self._futures[i].result()
            if i == 0:
                check_lengths(self._parts[0], self.max_length)
            if len(self._parts) == self.num_parts:
                self.seconds = time.perf_counter() - self._start
        return self._parts[i]

    def corpus(self) -> Corpus:
        """Every chunk, joined in order (waits for all; the chunks are released)."""
        if self._joined is None:
            parts = [self.part(i) for i in range(self.num_parts)]
            self._joined = Corpus.concat(parts)
            self._parts.clear()
            self.close()
            if len(self._joined) == 0:
                raise ConfigError(f"every generated example is longer than max_length={self.max_length} tokens")
        return self._joined

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CorpusStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_corpus(
    tokenizer_dir: str,
    seed: int,
    n: int,
    families: list[str] | None = None,
    weights: dict[str, float] | None = None,
    max_length: int | None = None,
    workers: int = 1,
    chunk_size: int = 4096,
) -> Corpus:
    """Generate and tokenize `n` training examples at once (deterministic for `seed`, whatever `workers` is)."""
    with CorpusStream(tokenizer_dir, seed, n, families, weights, max_length, workers, chunk_size) as stream:
        return stream.corpus()


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """What the objective needs for one step; every row is one example, or padding (`pad_batch`)."""

    input_ids: torch.Tensor  # [B, T] clean prompt + response, right-padded with <pad>
    lengths: torch.Tensor  # [B] int64 real tokens per row
    ar_targets: torch.Tensor  # [B, T] next token where it is a response token, IGNORE elsewhere
    prefix_lens: torch.Tensor  # [B] int64 P: the prompt plus the canvases before the corrupted block
    canvas: torch.Tensor  # [B, C] the clean block: response tokens [P - prompt, P - prompt + C), then <pad>
    canvas_real: torch.Tensor  # [B, C] bool: a response token (not <pad> filler)
    families: torch.Tensor  # [B] family index
    rows_real: torch.Tensor  # [B] bool: an example (False: a padding row, which no loss sees)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # not astuple: that deep-copies

    def pin_memory(self) -> "TrainBatch":
        """Page-locked host copies: copies from them to a GPU run in the background (a copy from ordinary memory
        makes the host wait for the GPU to reach it)."""
        return TrainBatch(*(t.pin_memory() for t in self.tensors()))

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(*(t.to(device=device, non_blocking=True) for t in self.tensors()))

    @property
    def examples(self) -> int:
        return int(self.rows_real.sum())  # a host sync on a device batch: count before moving it

    @property
    def encoder_tokens(self) -> int:
        return int(self.lengths[self.rows_real].sum())

    @property
    def canvas_tokens(self) -> int:
        return self.examples * self.canvas.shape[1]


def padded_width(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple`: the width of a static batch shape."""
    return -(-tokens // multiple) * multiple


def static_shape(longest: int, batch_size: int, max_batch_tokens: int | None, width_multiple: int) -> tuple[int, int]:
    """(rows, width) of the static batch shape a batch whose longest row has `longest` tokens is padded to: the
    width rounded up to `width_multiple`, and as many rows as fit `max_batch_tokens` (at most batch_size)."""
    width = padded_width(longest, width_multiple)
    rows = batch_size if not max_batch_tokens else min(batch_size, max_batch_tokens // width)
    return rows, width


def pad_batch(batch: TrainBatch, rows: int, width: int, pad_id: int) -> TrainBatch:
    """The batch at a fixed shape [rows, width] (what one captured CUDA graph takes): extra columns are <pad> with
    no target, extra rows repeat row 0 with no targets (`rows_real` False), so no loss and no gradient changes."""
    b, t = batch.input_ids.shape
    if b > rows or t > width:
        raise ValueError(f"a batch of {b} rows x {t} tokens does not fit the static shape {rows} x {width}")
    extra = [0] * (rows - b)  # copies of row 0: real lengths and positions keep every attention row well defined

    def more_rows(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [rows, ...]
        return torch.cat([x, x[extra]]) if extra else x

    def wider(x: torch.Tensor, value: int) -> torch.Tensor:  # [rows, T] -> [rows, width]
        return torch.cat([x, x.new_full((rows, width - t), value)], dim=1) if width > t else x

    ar_targets, canvas_real = more_rows(batch.ar_targets), more_rows(batch.canvas_real)
    rows_real = more_rows(batch.rows_real)
    ar_targets[b:], canvas_real[b:], rows_real[b:] = IGNORE, False, False
    return TrainBatch(wider(more_rows(batch.input_ids), pad_id), more_rows(batch.lengths), wider(ar_targets, IGNORE),
                      more_rows(batch.prefix_lens), more_rows(batch.canvas), canvas_real, more_rows(batch.families),
                      rows_real)


def canvas_block(prompt_len: int, length: int, canvas_length: int, block: int) -> tuple[int, int]:
    """(prefix length P, real tokens in the block) of response block `block`."""
    response = length - prompt_len
    blocks = math.ceil(response / canvas_length)
    if not 0 <= block < blocks:
        raise ValueError(f"block {block} outside the {blocks} blocks of a {response}-token response")
    start = block * canvas_length
    return prompt_len + start, min(canvas_length, response - start)


def collate(
    rows: Sequence[tuple[list[int], int]], canvas_length: int, pad_id: int, rng: random.Random,
    families: Sequence[int] | None = None,
) -> TrainBatch:
    """Batch (ids, prompt length) rows; each row's corrupted block is drawn uniformly from its response's blocks."""
    b, width = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    ar_targets = torch.full((b, width), IGNORE, dtype=torch.long)
    canvas = torch.full((b, canvas_length), pad_id, dtype=torch.long)
    canvas_real = torch.zeros((b, canvas_length), dtype=torch.bool)
    prefix_lens = []
    for i, (ids, prompt_len) in enumerate(rows):
        if not 0 < prompt_len < len(ids):
            raise ValueError(f"row {i}: prompt of {prompt_len} tokens in a {len(ids)}-token example (empty response?)")
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        ar_targets[i, prompt_len - 1 : len(ids) - 1] = row[prompt_len:]  # position p predicts token p + 1
        blocks = math.ceil((len(ids) - prompt_len) / canvas_length)
        prefix, real = canvas_block(prompt_len, len(ids), canvas_length, rng.randrange(blocks))
        canvas[i, :real] = row[prefix : prefix + real]
        canvas_real[i, :real] = True
        prefix_lens.append(prefix)
    family_t = torch.tensor(list(families) if families is not None else [0] * b, dtype=torch.long)
    return TrainBatch(input_ids, torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long), ar_targets,
                      torch.tensor(prefix_lens, dtype=torch.long), canvas, canvas_real, family_t,
                      torch.ones(b, dtype=torch.bool))


def collate_from_corpus(corpus: Corpus, indices: Sequence[int], canvas_length: int, pad_id: int,
                        rng: random.Random) -> TrainBatch:
    """`collate` of corpus examples, with tensor ops instead of per-row Python (same result, same rng draws)."""
    idx = torch.tensor(list(indices), dtype=torch.long)
    starts, lengths, prompts = corpus.starts[idx], corpus.lengths[idx], corpus.prompt_lens[idx]  # [B] each
    last = corpus.tokens.shape[0] - 1
    offsets = torch.arange(int(lengths.max()))[None, :]  # [1, T]
    valid = offsets < lengths[:, None]  # [B, T]
    tokens = corpus.tokens[(starts[:, None] + offsets).clamp(max=last)].long()
    input_ids = torch.where(valid, tokens, pad_id)
    following = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], pad_id)], dim=1)  # token p + 1
    scored = (offsets >= prompts[:, None] - 1) & (offsets < lengths[:, None] - 1)
    ar_targets = torch.where(scored, following, IGNORE)
    response = lengths - prompts
    blocks = [rng.randrange(math.ceil(n / canvas_length)) for n in response.tolist()]
    block_start = torch.tensor(blocks, dtype=torch.long) * canvas_length  # [B] first response token of the block
    prefix = prompts + block_start
    real = (response - block_start).clamp(max=canvas_length)  # [B]
    columns = torch.arange(canvas_length)[None, :]
    canvas_real = columns < real[:, None]  # [B, C]
    canvas_tokens = corpus.tokens[(starts[:, None] + prefix[:, None] + columns).clamp(max=last)].long()
    canvas = torch.where(canvas_real, canvas_tokens, pad_id)
    return TrainBatch(input_ids, lengths, ar_targets, prefix, canvas, canvas_real, corpus.families[idx],
                      torch.ones(len(idx), dtype=torch.bool))


class BatchSampler:
    """Endless batches from a corpus: grouped by length to keep padding low, the corpus shuffled every epoch.

    Each pool of `pool_batches` batches is sorted by length and cut into batches, whose order is then shuffled: rows
    of a batch have similar lengths, batches of a pool arrive in random order. A batch holds `batch_size` rows, fewer
    where that many rows of its length would exceed `max_batch_tokens` (long tool prompts). With `width_multiple` m,
    a batch's width counts as its longest row rounded up to a multiple of m, so that `static_shape` can pad every
    batch to one of few shapes (one captured CUDA graph each).
    From a `CorpusStream`, the first epoch streams: pools are cut from each chunk in turn, in the order its examples
    were drawn (they are independent draws, already in random order), so training starts on chunk 0 while the
    workers make the rest; from the second epoch on, pools are drawn from the whole corpus, shuffled.
    All randomness comes from one `random.Random`, so `state()` / `load_state()` resume the exact stream.
    """

    def __init__(self, source: Corpus | CorpusStream, batch_size: int, canvas_length: int, pad_id: int, seed: int,
                 pool_batches: int = 16, max_batch_tokens: int | None = None, width_multiple: int = 1):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if width_multiple <= 0:
            raise ConfigError(f"width_multiple must be positive, got {width_multiple}")
        self.width_multiple = width_multiple
        self.batch_size = batch_size
        self.canvas_length = canvas_length
        self.pad_id = pad_id
        self.pool_batches = pool_batches
        self.max_batch_tokens = max_batch_tokens  # rows x longest row: bounds activation memory
        self.rng = random.Random(seed)
        self.stream = source if isinstance(source, CorpusStream) else None
        self.epoch = 0
        self._part = 0  # streaming: the next chunk to become a pool
        self._order: list[int] = []
        self._pending: list[list[int]] = []  # batches (lists of example indices into self.corpus) of the current pool
        self._cursor = 0  # next position in _order
        self.longest = 0
        if self.stream is None:
            self._use(source)

    def _use(self, corpus: Corpus) -> None:
        """The corpus that pending batches index: a chunk while the first epoch streams, then the whole corpus."""
        longest = self.width(int(corpus.lengths.max())) if len(corpus) else 0
        if self.max_batch_tokens is not None and self.max_batch_tokens < longest:
            raise ConfigError(f"max_batch_tokens={self.max_batch_tokens} cannot hold the corpus's longest example "
                              f"({longest} tokens{' padded' if self.width_multiple > 1 else ''})")
        self.corpus = corpus
        self._lengths = corpus.lengths.tolist()  # read at every refill: a list once, not per pool
        self.longest = max(self.longest, max(self._lengths, default=0))  # of the examples met so far

    @property
    def streaming(self) -> bool:
        """Whether pending batches index a chunk of the stream (the first epoch) rather than the whole corpus."""
        return self.stream is not None and self.epoch <= 1

    def width(self, longest: int) -> int:
        """The width a batch whose longest row has `longest` tokens counts as."""
        return padded_width(longest, self.width_multiple)

    def static_shape(self, longest: int) -> tuple[int, int]:
        """(rows, width) that every batch of this width fits: the shape `pad_batch` gives it."""
        return static_shape(longest, self.batch_size, self.max_batch_tokens, self.width_multiple)

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "epoch": self.epoch, "order": list(self._order),
                "pending": [list(b) for b in self._pending], "cursor": self._cursor, "part": self._part,
                "streaming": self.streaming}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.epoch, self._cursor = state["epoch"], state["cursor"]
        self._order = list(state["order"])
        self._pending = [list(b) for b in state["pending"]]
        if self.stream is not None:
            if state.get("streaming"):  # the pending batches index the last chunk taken
                self._part = state["part"]
                if self._part:
                    self._use(self.stream.part(self._part - 1))
            else:  # a state from a shuffled epoch (or from before streaming): the whole corpus
                self._part = self.stream.num_parts
                self.epoch = max(self.epoch, 2)
                self._use(self.stream.corpus())

    def _next_pool(self) -> list[int]:
        """The example indices (into self.corpus) of the next pool: up to pool_batches whole batches of the order."""
        while self._cursor + self.batch_size > len(self._order):  # the current order is used up
            if self.streaming and self._part < self.stream.num_parts:
                # The streaming epoch: the next chunk, in the order its examples were drawn (the tail short of a
                # batch, and a chunk max_length emptied, wait for the second epoch).
                self.epoch = 1
                self._use(self.stream.part(self._part))
                self._part += 1
                self._order = list(range(len(self.corpus)))
            else:
                if self.streaming:
                    self._use(self.stream.corpus())  # the stream is over: the whole corpus from now on
                    self.epoch = 1
                if len(self.corpus) < self.batch_size:
                    raise ConfigError(f"the corpus has {len(self.corpus)} examples, fewer than one batch of "
                                      f"{self.batch_size}")
                self._order = list(range(len(self.corpus)))
                self.rng.shuffle(self._order)
                self.epoch += 1
            self._cursor = 0
        take = min(self.pool_batches * self.batch_size, (len(self._order) - self._cursor) // self.batch_size
                   * self.batch_size)
        pool = self._order[self._cursor : self._cursor + take]
        self._cursor += take
        return pool

    def _refill(self) -> None:
        pool = self._next_pool()
        lengths = self._lengths
        pool.sort(key=lambda i: lengths[i])
        batches: list[list[int]] = [[]]
        for i in pool:  # ascending lengths: a row's length is its batch's padded width
            rows = len(batches[-1]) + 1
            if batches[-1] and (rows > self.batch_size or (self.max_batch_tokens and rows * self.width(lengths[i])
                                                            > self.max_batch_tokens)):
                batches.append([])  # (a row wider than the cap, met after the cap was lowered, goes alone)
            batches[-1].append(i)
        self.rng.shuffle(batches)
        self._pending = batches

    def drop_pending(self) -> None:
        """Forget the batches cut from the current pool (after max_batch_tokens changed): the next pool is cut
        with the new limit. Their examples are skipped for this epoch."""
        self._pending = []

    def next_indices(self) -> list[int]:
        if not self._pending:
            self._refill()
        return self._pending.pop()

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        indices = self.next_indices()  # first: it may move on to the next chunk
        return collate_from_corpus(self.corpus, indices, self.canvas_length, self.pad_id, self.rng)


# --------------------------------------------------------------------------------------------------
# The tokenizer of a new model
# --------------------------------------------------------------------------------------------------


def chat_renderer() -> Tokenizer:
    """A Tokenizer used only to render chats with the packaged template (its byte-level vocabulary is a stub)."""
    from dgemma.chat_format import default_chat_template
    from dgemma.checkpoint.tokenizer_builder import (BOS_TOKEN, EOS_TOKEN, MIN_VOCAB_SIZE, PAD_TOKEN, UNK_TOKEN,
                                                     build_tokenizer)

    return Tokenizer(build_tokenizer([], MIN_VOCAB_SIZE), BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN,
                     default_chat_template())


def tokenizer_corpus(seed: int, n: int, families: list[str] | None = None,
                     weights: dict[str, float] | None = None) -> list[str]:
    """Rendered training conversations (prompt and target turn, as `response_text` writes them) for the BPE."""
    renderer = chat_renderer()
    return ["".join(response_text(renderer, example)) for example in generate_examples(seed, n, families, weights)]
