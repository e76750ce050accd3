"""Specifications for the streamed training corpus (dgemma/train/dataset.py: CorpusStream, BatchSampler).

Training starts on the corpus's first chunk while worker processes make the rest: the first epoch takes the chunks
in the order they were generated, later epochs shuffle the whole corpus. Which batches come must not depend on how
many workers there are or how fast they are, and a resumed run must go on with exactly the batches it would have
had.
"""

from __future__ import annotations

import pytest
import torch

from dgemma.train.dataset import BatchSampler, CorpusStream, build_corpus, tokenizer_corpus

N, CHUNK, BATCH = 600, 128, 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from dgemma.checkpoint.tokenizer_builder import build_tokenizer, write_tokenizer_files

    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(directory, build_tokenizer(tokenizer_corpus(7, 400), 400), model_max_length=2048)
    return str(directory)


def stream(tokenizer_dir, workers=1):
    return CorpusStream(tokenizer_dir, seed=5, n=N, max_length=400, workers=workers, chunk_size=CHUNK)


def batches(sampler, count):
    """The next `count` batches as tuples of (token ids of each row)."""
    out = []
    for _ in range(count):
        batch = next(sampler)
        out.append(tuple(tuple(row[: int(n)].tolist()) for row, n in zip(batch.input_ids, batch.lengths)))
    return out


class CountingStream(CorpusStream):
    """Records which chunks the sampler asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []

    def part(self, i):
        self.asked.append(i)
        return super().part(i)


def test_the_stream_joins_to_the_corpus_built_at_once(tokenizer_dir):
    with stream(tokenizer_dir) as s:
        parts = [s.part(i) for i in range(s.num_parts)]
        joined = s.corpus()
    assert s.num_parts == 5 and sum(len(p) for p in parts) == len(joined)
    whole = build_corpus(tokenizer_dir, seed=5, n=N, max_length=400, chunk_size=CHUNK)
    assert torch.equal(joined.tokens, whole.tokens) and torch.equal(joined.lengths, whole.lengths)


def test_the_first_batch_needs_only_the_first_chunk(tokenizer_dir):
    with CountingStream(tokenizer_dir, seed=5, n=N, max_length=400, workers=1, chunk_size=CHUNK) as s:
        sampler = BatchSampler(s, BATCH, canvas_length=16, pad_id=0, seed=0, pool_batches=4)
        next(sampler)
        assert s.asked == [0] and sampler.streaming and sampler.epoch == 1
        for _ in range(len(s.part(0)) // BATCH - 1):  # the rest of chunk 0's whole batches
            next(sampler)
        assert set(s.asked) == {0}
        next(sampler)
        assert set(s.asked) == {0, 1}


def test_the_first_epoch_takes_each_chunk_in_order_then_the_corpus_is_shuffled(tokenizer_dir):
    with stream(tokenizer_dir) as s:
        chunks = [s.part(i) for i in range(s.num_parts)]
    expected = sum(len(c) // BATCH * BATCH for c in chunks)
    with stream(tokenizer_dir) as s:
        sampler = BatchSampler(s, BATCH, canvas_length=16, pad_id=0, seed=0, pool_batches=4)
        first_epoch = batches(sampler, expected // BATCH)
        assert sampler.epoch == 1
        second = batches(sampler, 3)
        assert sampler.epoch == 2 and not sampler.streaming
    start = 0
    for chunk in chunks:  # chunk by chunk, each chunk's whole batches' worth of examples once
        count = len(chunk) // BATCH
        rows = [row for batch in first_epoch[start : start + count] for row in batch]
        assert sorted(rows) == sorted(tuple(chunk.example(i)[0]) for i in range(count * BATCH))
        start += count
    assert all(len(batch) == BATCH for batch in first_epoch + second)


def test_batches_do_not_depend_on_the_number_of_workers(tokenizer_dir):
    got = {}
    for workers in (1, 2):
        with stream(tokenizer_dir, workers) as s:
            got[workers] = batches(BatchSampler(s, BATCH, canvas_length=16, pad_id=0, seed=0, pool_batches=4), 40)
    assert got[1] == got[2]


@pytest.mark.parametrize("stop", [5, 36], ids=["while_streaming", "after_the_stream"])
def test_a_resumed_sampler_goes_on_with_the_same_batches(tokenizer_dir, stop):
    with stream(tokenizer_dir) as s:
        sampler = BatchSampler(s, BATCH, canvas_length=16, pad_id=0, seed=0, pool_batches=4)
        batches(sampler, stop)
        state = sampler.state()
        want = batches(sampler, 12)
    with stream(tokenizer_dir) as s:
        resumed = BatchSampler(s, BATCH, canvas_length=16, pad_id=0, seed=0, pool_batches=4)
        resumed.load_state(state)
        assert batches(resumed, 12) == want


def test_examples_over_max_length_are_counted_by_family(tokenizer_dir):
    from dgemma.train.dataset import Corpus

    with stream(tokenizer_dir) as s:  # max_length 400: some tool prompts are longer, nothing else is
        parts = [s.part(i) for i in range(s.num_parts)]
        dropped = dict(s.dropped)
    assert set(dropped) == {"tool_call", "tool_answer"}
    assert sum(dropped.values()) + sum(len(p) for p in parts) == N
    assert Corpus.concat(parts).dropped_by_family() == dropped


def test_a_family_that_loses_every_example_to_max_length_is_refused(tokenizer_dir):
    from dgemma.errors import ConfigError

    with CorpusStream(tokenizer_dir, seed=5, n=64, families=["add", "tool_answer"], max_length=60,
                      chunk_size=CHUNK) as s:
        with pytest.raises(ConfigError, match=r"every generated example of tool_answer \(\d+\) is longer than "
                                              r"max_length=60 tokens: raise --max-length"):
            s.part(0)
