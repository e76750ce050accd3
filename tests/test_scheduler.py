"""Specification of the step-level scheduler: requests in, step plans out (no model, no tensors).

`apply(plan)` plays the engine's part: it moves encoded tokens into the "cache", starts the planned canvases
and, when asked, commits a canvas (whose tokens must then be encoded before the next canvas starts).
"""

import pytest

from dgemma.engine.request import Phase, Request
from dgemma.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, StepPlan
from dgemma.errors import RequestError
from dgemma.sampling.params import SamplingParams

C = 8  # canvas length of these tests


def make(max_num_seqs=2, max_queue_len=4, max_prefill_tokens=64, max_model_len=128) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_queue_len=max_queue_len,
                                     max_prefill_tokens=max_prefill_tokens, max_model_len=max_model_len,
                                     canvas_length=C))


def req(rid: str, prompt_len: int = 5, max_new_tokens: int = C) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_new_tokens=max_new_tokens))


def apply(plan: StepPlan) -> None:
    """What the engine does with a plan before the denoising forward."""
    for work in plan.encode:
        work.request.cached_len += work.num_tokens
        del work.request.pending_ids[: work.num_tokens]
    for request in plan.start_canvas:
        request.phase = Phase.DENOISING


def commit(request: Request, tokens: list[int]) -> None:
    """A canvas committed without finishing: its tokens are queued for encoding."""
    request.stats.forwards_per_canvas.append(3)
    request.output_ids.extend(tokens)
    request.phase = Phase.ENCODING
    request.pending_ids = list(tokens)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# ---------------------------------------------------------------------------------------------- admission


def test_admits_up_to_max_num_seqs_and_keeps_the_rest_waiting():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}"))
    plan = s.schedule()
    assert ids(s.running) == ["r0", "r1"]
    assert ids(s.waiting) == ["r2"]
    assert ids(w.request for w in plan.encode) == ["r0", "r1"]
    assert sorted(r.row for r in s.running) == [0, 1]


def test_admission_is_first_in_first_out():
    s = make(max_num_seqs=1, max_queue_len=8)
    for i in range(4):
        s.add(req(f"r{i}"))
    order = []
    for _ in range(4):
        s.schedule()
        order.append(s.running[0].request_id)
        s.finish(s.running[0], "stop")
    assert order == ["r0", "r1", "r2", "r3"]


def test_queue_limit_raises_queue_full_naming_the_limits():
    s = make(max_num_seqs=1, max_queue_len=1)
    s.add(req("a"))
    s.schedule()  # a takes the only row
    s.add(req("b"))  # the one queue slot
    with pytest.raises(QueueFull, match=r"max_num_seqs=1, max_queue_len=1"):
        s.add(req("c"))


def test_queue_limit_counts_free_rows_not_yet_assigned():
    # Requests added between two steps take free rows at the next schedule(); beyond those the queue limit holds.
    s = make(max_num_seqs=2, max_queue_len=1)
    for name in ("a", "b", "c"):
        s.add(req(name))
    with pytest.raises(QueueFull):
        s.add(req("d"))
    s.schedule()
    assert ids(s.running) == ["a", "b"] and ids(s.waiting) == ["c"]


def test_zero_queue_length_accepts_only_what_fits_in_free_rows():
    s = make(max_num_seqs=2, max_queue_len=0)
    s.add(req("a"))
    s.add(req("b"))
    with pytest.raises(QueueFull):
        s.add(req("c"))


def test_duplicate_request_id_is_rejected():
    s = make()
    s.add(req("a"))
    with pytest.raises(RequestError, match="already in use"):
        s.add(req("a"))


# ---------------------------------------------------------------------------------------------- length limits


def test_prompt_longer_than_max_model_len_is_rejected_with_both_numbers():
    s = make(max_model_len=64)
    with pytest.raises(RequestError, match=r"60 tokens.*canvas of 8.*max_model_len \(64\)"):
        s.add(req("long", prompt_len=60))


def test_prompt_plus_max_new_tokens_beyond_max_model_len_is_rejected_with_a_usable_limit():
    s = make(max_model_len=64)
    with pytest.raises(RequestError, match=r"prompt \(10 tokens\).*max_new_tokens \(100.*max_model_len \(64\).*at most 48"):
        s.add(req("big", prompt_len=10, max_new_tokens=100))


def test_max_new_tokens_is_rounded_up_to_whole_canvases():
    s = make(max_model_len=64)
    assert s.tokens_needed(10, 1) == 10 + C
    assert s.tokens_needed(10, C + 1) == 10 + 2 * C
    s.add(req("fits", prompt_len=10, max_new_tokens=6 * C))  # 10 + 48 <= 64


def test_empty_prompt_is_rejected():
    with pytest.raises(RequestError, match="empty"):
        make().add(req("e", prompt_len=0))


def test_config_rejects_nonsense_values():
    with pytest.raises(RequestError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(RequestError, match="max_model_len"):
        SchedulerConfig(max_model_len=8, canvas_length=8)


# ---------------------------------------------------------------------------------------------- prefill


def test_prompt_that_fits_the_budget_is_encoded_and_its_canvas_started_in_the_same_step():
    s = make()
    s.add(req("a", prompt_len=5))
    plan = s.schedule()
    assert [(w.request.request_id, w.num_tokens, w.is_prompt) for w in plan.encode] == [("a", 5, True)]
    assert ids(plan.start_canvas) == ["a"]
    assert ids(plan.decode) == ["a"]


def test_long_prompt_is_encoded_in_chunks_of_the_token_budget():
    s = make(max_prefill_tokens=16, max_model_len=256)
    s.add(req("long", prompt_len=40))
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        chunks.append([w.num_tokens for w in plan.encode])
        started = ids(plan.start_canvas)
        apply(plan)
    assert chunks == [[16], [16], [8]]
    assert started == ["long"]  # only once the last chunk is in the cache


def test_one_request_gets_at_most_max_chunk_tokens_per_step_and_the_budget_goes_on_to_others():
    """A chunk is what one forward writes into the request's cache row; sliding layers' rings are sized for it."""
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_prefill_tokens=32, max_chunk_tokens=12, max_model_len=256,
                                  canvas_length=C))
    s.add(req("long", prompt_len=30))
    s.add(req("short", prompt_len=5))
    plan = s.schedule()
    assert [(w.request.request_id, w.num_tokens) for w in plan.encode] == [("long", 12), ("short", 5)]
    assert s.config.max_write_tokens == 12  # max(canvas, min(budget, chunk))
    apply(plan)
    assert [w.num_tokens for w in s.schedule().encode] == [12]


def test_prefill_budget_is_shared_across_prompts_in_arrival_order():
    s = make(max_num_seqs=3, max_prefill_tokens=16)
    s.add(req("a", prompt_len=10))
    s.add(req("b", prompt_len=10))
    s.add(req("c", prompt_len=10))
    plan = s.schedule()
    assert [(w.request.request_id, w.num_tokens) for w in plan.encode] == [("a", 10), ("b", 6)]
    assert ids(plan.start_canvas) == ["a"]


def test_running_requests_keep_denoising_while_a_long_prompt_is_prefilled():
    s = make(max_num_seqs=2, max_prefill_tokens=16, max_model_len=256)
    s.add(req("a", prompt_len=4))
    apply(s.schedule())  # a is denoising
    s.add(req("long", prompt_len=100))
    for _ in range(3):
        plan = s.schedule()
        assert "a" in ids(plan.decode)
        assert [w.request.request_id for w in plan.encode] == ["long"]
        apply(plan)


def test_committed_canvases_are_encoded_before_prompts():
    s = make(max_num_seqs=2, max_prefill_tokens=C + 2, max_model_len=256)
    s.add(req("a", prompt_len=4))
    apply(s.schedule())
    a = s.running[0]
    commit(a, list(range(C)))
    s.add(req("b", prompt_len=20))
    plan = s.schedule()
    assert [(w.request.request_id, w.num_tokens, w.is_prompt) for w in plan.encode] == [("a", C, False), ("b", 2, True)]
    assert ids(plan.start_canvas) == ["a"]
    assert ids(plan.decode) == ["a"]


def test_decode_set_holds_every_denoising_request_and_the_new_canvases():
    s = make(max_num_seqs=3)
    s.add(req("a"))
    apply(s.schedule())
    s.add(req("b"))
    plan = s.schedule()
    assert ids(plan.start_canvas) == ["b"]
    assert sorted(ids(plan.decode)) == ["a", "b"]
    apply(plan)
    plan = s.schedule()
    assert plan.encode == [] and plan.start_canvas == []
    assert sorted(ids(plan.decode)) == ["a", "b"]


def test_nothing_to_do_gives_an_empty_plan():
    s = make()
    assert s.schedule().empty
    assert not s.has_work


# ---------------------------------------------------------------------------------------------- leaving


def test_finish_frees_the_row_for_the_next_waiting_request():
    s = make(max_num_seqs=1)
    s.add(req("a"))
    s.add(req("b"))
    apply(s.schedule())
    a = s.running[0]
    s.finish(a, "stop")
    assert a.phase is Phase.FINISHED and a.finish_reason == "stop" and a.row is None
    plan = s.schedule()
    assert ids(s.running) == ["b"] and s.running[0].row == 0
    assert ids(plan.decode) == ["b"]


def test_finish_leaves_the_other_requests_untouched():
    s = make(max_num_seqs=3)
    for name in ("a", "b", "c"):
        s.add(req(name))
    apply(s.schedule())
    rows = {r.request_id: r.row for r in s.running}
    s.finish(s.running[1], "length")
    plan = s.schedule()
    assert ids(plan.decode) == ["a", "c"]
    assert {r.request_id: r.row for r in s.running} == {"a": rows["a"], "c": rows["c"]}


def test_abort_of_a_running_request_frees_its_row_and_id():
    s = make(max_num_seqs=1)
    s.add(req("a"))
    apply(s.schedule())
    aborted = s.abort("a")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert s.running == [] and s.free_rows == [0]
    s.add(req("a"))  # the id can be used again


def test_abort_of_a_waiting_request_removes_it_from_the_queue():
    s = make(max_num_seqs=1)
    s.add(req("a"))
    s.add(req("b"))
    s.schedule()
    assert s.abort("b").finish_reason == "abort"
    assert ids(s.waiting) == []
    assert ids(s.running) == ["a"]


def test_abort_of_an_unknown_or_finished_request_is_a_no_op():
    s = make()
    s.add(req("a"))
    s.schedule()
    s.finish(s.running[0], "stop")
    assert s.abort("a") is None
    assert s.abort("nope") is None
    assert s.free_rows.count(0) == 1  # the row was freed once
