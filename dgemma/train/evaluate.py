"""Score a checkpoint on freshly generated held-out problems: accuracy, tool calls, speed; and tune its sampler.

`evaluate` generates answers for held-out `tasks.Example`s (prompts no training seed ever produces) through the
public `LLM` API, exactly as a user's request would run, many rows per batch. An output is read the way the server
reads it: the thinking channel is split off, tool calls are parsed, and what remains is the answer, compared with
the independent `checker` after its normalisation. Speed is reported as the engine counts it: generated tokens
(the stop token included) per decoder forward, and denoising steps per committed canvas.

`sweep` runs the same evaluation over a grid of sampler settings and `choose_settings` picks the fastest one whose
accuracy, overall and on the quality bar's families, is within a tolerance of the best: that choice becomes the
checkpoint's generation_config.json.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dgemma.chat_format import parse_tool_calls, split_reasoning
from dgemma.errors import ConfigError
from dgemma.sampling.params import SamplingParams
from dgemma.train import checker
from dgemma.train import rephrase as rephrasing
from dgemma.train.tasks import FAMILIES, Example, heldout_examples

# The quality bar: exact match on the arithmetic, sorting and string families, correct tool calls, speed.
BAR_FAMILIES = ("add", "sub", "mul", "sort", "string_ops")
BAR_ACCURACY = 0.95
BAR_TOOL_CALLS = 0.95
BAR_TOKENS_PER_FORWARD = 4.0
BAR_LATENCY_64_MS = 1000.0
LATENCY_PROMPT = "Count from 1 to 40."  # its answer is over 100 tokens: the first 64 fill two 32-token canvases


@dataclass
class Score:
    """Counts for one family (or all of them)."""

    n: int = 0
    correct: int = 0
    tool_calls_expected: int = 0  # examples whose correct response is a tool call
    tool_calls_correct: int = 0  # ... answered with exactly that call
    generated_tokens: int = 0  # committed tokens plus the stop token, as the engine counts them
    forwards: int = 0  # decoder forward passes
    canvases: int = 0

    def add(self, other: "Score") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def tool_call_accuracy(self) -> float | None:
        return self.tool_calls_correct / self.tool_calls_expected if self.tool_calls_expected else None

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    @property
    def steps_per_canvas(self) -> float:
        return self.forwards / self.canvases if self.canvases else 0.0

    def summary(self) -> dict:
        return {"n": self.n, "exact_match": round(self.accuracy, 4),
                "tool_call_accuracy": None if self.tool_call_accuracy is None else round(self.tool_call_accuracy, 4),
                "tokens_per_forward": round(self.tokens_per_forward, 3),
                "steps_per_canvas": round(self.steps_per_canvas, 3)}


@dataclass
class EvalReport:
    families: dict[str, Score]
    total: Score
    settings: dict  # the sampler settings used
    seconds: float  # wall time of the batched generation
    batch_size: int
    device: str
    latency_64_ms: float | None = None  # one request, 64 new tokens, median of a few runs
    threads: int = field(default_factory=torch.get_num_threads)
    failures: list[dict] = field(default_factory=list)  # a few wrong answers, for reading

    def bar_score(self) -> Score:
        """The families the quality bar names (and tool calls), pooled."""
        pooled = Score()
        for family in (*BAR_FAMILIES, "tool_call"):
            if family in self.families:
                pooled.add(self.families[family])
        return pooled

    def bar(self) -> list[tuple[str, float, bool, str]]:
        """(criterion, measured value, passed, value as shown) for the issue's quality bar."""
        rows = []
        for family in BAR_FAMILIES:
            if family in self.families:
                value = self.families[family].accuracy
                rows.append((f"{family} exact match >= {BAR_ACCURACY:.0%}", value, value >= BAR_ACCURACY,
                             f"{value:.1%}"))
        tool = self.total.tool_call_accuracy
        if tool is not None:
            rows.append((f"correct tool calls >= {BAR_TOOL_CALLS:.0%}", tool, tool >= BAR_TOOL_CALLS, f"{tool:.1%}"))
        tpf = self.total.tokens_per_forward
        rows.append((f"tokens per forward >= {BAR_TOKENS_PER_FORWARD:g}", tpf, tpf >= BAR_TOKENS_PER_FORWARD,
                     f"{tpf:.2f}"))
        if self.latency_64_ms is not None:
            ms = self.latency_64_ms
            rows.append((f"64-token answer < {BAR_LATENCY_64_MS:.0f} ms ({self.threads} threads)", ms,
                         ms < BAR_LATENCY_64_MS, f"{ms:.0f} ms"))
        return rows

    def to_json(self) -> dict:
        return {
            "total": self.total.summary(),
            "families": {name: score.summary() for name, score in self.families.items()},
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "problems_per_s": round(self.total.n / self.seconds, 2) if self.seconds else None,
            "batch_size": self.batch_size,
            "device": self.device,
            "threads": self.threads,
            "latency_64_ms": None if self.latency_64_ms is None else round(self.latency_64_ms, 1),
            "bar": [{"criterion": c, "value": round(v, 4), "passed": ok} for c, v, ok, _ in self.bar()],
            "failures": self.failures,
        }

    def table(self) -> str:
        lines = [f"{'family':<14} {'n':>4} {'exact':>7} {'tools':>7} {'tok/fwd':>8} {'steps/canvas':>13}"]
        rows = list(self.families.items()) + [("TOTAL", self.total)]
        for name, s in rows:
            tool = "" if s.tool_call_accuracy is None else f"{s.tool_call_accuracy:.1%}"
            lines.append(f"{name:<14} {s.n:>4} {s.accuracy:>7.1%} {tool:>7} {s.tokens_per_forward:>8.2f} "
                         f"{s.steps_per_canvas:>13.2f}")
        lines.append(f"{self.total.n} problems in {self.seconds:.1f} s on {self.device} "
                     f"(batches of {self.batch_size}); sampler {json.dumps(self.settings, sort_keys=True)}")
        if self.latency_64_ms is not None:
            lines.append(f"64-token answer, one request: {self.latency_64_ms:.0f} ms ({self.threads} threads)")
        for criterion, _, ok, shown in self.bar():
            lines.append(f"[{'PASS' if ok else 'FAIL'}] {criterion}: {shown}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Scoring one output
# --------------------------------------------------------------------------------------------------


def read_output(text: str, tools: list[dict] | None, special_tokens: list[str]) -> tuple[str | None, str, list]:
    """(reasoning, answer, tool calls) of an output decoded with its special tokens, as the server reads it."""
    reasoning, content = split_reasoning(text)
    answer, calls = parse_tool_calls(content, tools)
    for token in special_tokens:  # leftovers a client would not see (generate skips special tokens)
        answer = answer.replace(token, "")
    return reasoning, answer, calls


def score_output(example: Example, answer: str, calls: list) -> bool:
    """Whether the response is right: the exact call when one is expected, else no call and the exact answer."""
    found = [(call.name, call.arguments) for call in calls]
    if checker.expects_tool_call(example):
        return checker.check_tool_call(example, found)
    return not found and checker.check(example, answer)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(
    llm,
    examples: list[Example],
    params: SamplingParams | None = None,
    batch_size: int = 64,
    seed: int = 0,
    measure_latency: bool = False,
    keep_failures: int = 5,
) -> EvalReport:
    """Generate an answer for every example (batched, rows stop independently) and score it."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    params = llm.params(params)
    tokenizer = llm.require_tokenizer()
    special = sorted((tokenizer.id_to_token(i) for i in tokenizer.special_ids), key=len, reverse=True)
    families: dict[str, Score] = {name: Score() for name in FAMILIES if any(e.family == name for e in examples)}
    failures: list[dict] = []
    start = time.perf_counter()
    for offset in range(0, len(examples), batch_size):
        chunk = examples[offset : offset + batch_size]
        prompts = [llm.chat_prompt(e.prompt_messages, tools=e.tools, enable_thinking=e.enable_thinking) for e in chunk]
        results = llm.generate(prompts, params.with_overrides(seed=seed + offset), skip_special_tokens=False)
        for example, result in zip(chunk, results):
            _, answer, calls = read_output(result.text or "", example.tools, special)
            ok = score_output(example, answer, calls)
            s = Score(n=1, correct=int(ok), forwards=result.stats.denoising_steps, canvases=result.stats.canvases)
            s.generated_tokens = round(result.stats.tokens_per_forward * s.forwards)
            if checker.expects_tool_call(example):
                s.tool_calls_expected, s.tool_calls_correct = 1, int(ok)
            families[example.family].add(s)
            if not ok and len(failures) < keep_failures:
                failures.append({"family": example.family, "prompt": example.prompt_messages[-1].get("content"),
                                 "expected": checker.expected_answer(example), "output": result.text})
    seconds = time.perf_counter() - start
    total = Score()
    for score in families.values():
        total.add(score)
    settings = {k: v for k, v in asdict(params).items() if k not in ("seed", "eos_token_ids", "stop")}
    report = EvalReport(families, total, settings, seconds, batch_size, str(llm.model.device), failures=failures)
    if measure_latency:
        report.latency_64_ms = latency_64(llm, params)
    return report


def latency_64(llm, params: SamplingParams | None = None, repeats: int = 3) -> float:
    """Milliseconds for one request to produce a 64-token answer, median of `repeats`.

    The prompt's real answer is longer than 64 tokens, and end tokens are ignored, so every run commits exactly 64
    tokens (two 32-token canvases) whatever the model writes; the sampler and its stopping rule are the defaults.
    """
    params = llm.params(params).with_overrides(max_new_tokens=64, ignore_eos=True)
    messages = [{"role": "user", "content": LATENCY_PROMPT}]
    llm.chat(messages, params.with_overrides(seed=0))  # warm-up: first-call allocations are not the steady state
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        llm.chat(messages, params.with_overrides(seed=i + 1))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def heldout(seed: int, n: int, families: list[str] | None = None, rephrase: bool = False) -> list[Example]:
    """The evaluation set: `n` held-out problems from the default mixture, or evenly from `families`. With
    `rephrase`, problems of the families `dgemma.train.rephrase` covers (all of them by default), each asked in a
    wording the generator never uses."""
    if rephrase:
        families = families or list(rephrasing.FAMILIES)
        uncovered = [name for name in families if name not in rephrasing.UNSEEN]
        if uncovered:
            raise ConfigError(f"rephrase covers the families {', '.join(rephrasing.FAMILIES)}; not {uncovered}")
    if families:
        per = max(1, n // len(families))
        examples = [e for name in families for e in heldout_examples(seed, per, families=[name])][:n]
    else:
        examples = heldout_examples(seed, n)
    if rephrase:
        rng = random.Random(f"rephrase:{seed}")  # a str seed hashes the same in every process
        examples = [rephrasing.rephrase(e, rng) for e in examples]
    return examples


# --------------------------------------------------------------------------------------------------
# Sampler tuning
# --------------------------------------------------------------------------------------------------

# Knobs that trade accuracy for forwards: stopping rule, acceptance bound and stopping confidence. The temperature
# schedule stays the checkpoint's: a cooler one (t 0.1-0.4) and confidence 0.1 were never chosen in issue 5's recorded
# sweeps, and in the thirteenth run's they cost 1-4 and 4-6 points. The small bounds matter for lists: a model that
# sorts 97% right token by token lost 6 points of it at bound 0.1 (neighbouring words committed in one step mix their
# letters) and regained 3-4 at 0.001.
SWEEP_GRID: list[dict] = [
    dict(stability_threshold=stability, confidence_threshold=confidence, entropy_bound=bound)
    for stability in (0, 1)
    for confidence in (0.001, 0.005, 0.02)
    for bound in (0.001, 0.01, 0.1, 1.0)
]


def sweep(llm, examples: list[Example], grid: list[dict] | None = None, base: SamplingParams | None = None,
          batch_size: int = 64, seed: int = 0, log=None) -> list[tuple[dict, EvalReport]]:
    """Evaluate every setting of the grid on the same examples and seeds."""
    results = []
    base = llm.params(base)
    for overrides in grid or SWEEP_GRID:
        report = evaluate(llm, examples, base.with_overrides(**overrides), batch_size=batch_size, seed=seed,
                          keep_failures=0)
        results.append((overrides, report))
        if log is not None:
            log(sweep_line(overrides, report))
    return results


def sweep_line(overrides: dict, report: EvalReport) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in overrides.items())
    return (f"{knobs}: exact {report.total.accuracy:.1%} (bar families {report.bar_score().accuracy:.1%}), "
            f"tok/fwd {report.total.tokens_per_forward:.2f}, steps/canvas {report.total.steps_per_canvas:.2f}, "
            f"{report.seconds:.1f} s")


def choose_settings(results: list[tuple[dict, EvalReport]], tolerance: float = 0.01) -> tuple[dict, EvalReport]:
    """The setting with the most tokens per forward among those within `tolerance` of the best accuracy, both
    overall and on the quality bar's families (so speed is never bought with, say, multiplication alone). When no
    setting is near the best on both, the fastest near the best on the bar's families."""
    if not results:
        raise ConfigError("the sweep produced no results")
    best_total = max(report.total.accuracy for _, report in results)
    best_bar = max(report.bar_score().accuracy for _, report in results)
    near_bar = [(o, r) for o, r in results if r.bar_score().accuracy >= best_bar - tolerance]
    # The best overall and the best on the bar can be different settings, far apart: then the bar decides.
    eligible = [(o, r) for o, r in near_bar if r.total.accuracy >= best_total - tolerance] or near_bar
    return max(eligible, key=lambda item: (item[1].total.tokens_per_forward, item[1].total.accuracy))


def write_generation_settings(model_dir: str | Path, overrides: dict) -> Path:
    """Merge sampler settings into a checkpoint's generation_config.json (the entropy bound in sampler_config)."""
    path = Path(model_dir) / "generation_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key, value in overrides.items():
        if key == "entropy_bound":
            data.setdefault("sampler_config", {"_cls_name": "EntropyBoundSamplerConfig"})["entropy_bound"] = value
        else:
            data[key] = value
    SamplingParams.from_generation_config(data)  # refuse to write settings the loader would reject
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
