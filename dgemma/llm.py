"""The Python API: `LLM(model).generate(prompts)` and `LLM(model).chat(messages)`.

An offline call sizes an engine for exactly its prompts (one cache row each, no more positions than they can
use), feeds them all in, and steps until every one is finished; rows stop on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgemma.checkpoint.loader import load_model, parse_dtype, read_json
from dgemma.engine.engine import Engine
from dgemma.engine.request import Request, RequestOutput
from dgemma.engine.scheduler import SchedulerConfig
from dgemma.errors import CheckpointError, RequestError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.sampling.params import SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    canvases: int
    forwards_per_canvas: list[int]
    tokens_per_forward: float  # generated tokens (an ending EOS included) per decoder forward
    prefill_ms: float
    denoise_ms: float
    total_ms: float
    time_to_first_canvas_ms: float | None

    @property
    def denoising_steps(self) -> int:
        return sum(self.forwards_per_canvas)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None  # None when the checkpoint has no tokenizer
    finish_reason: str  # "stop" (EOS or stop string), "length" or "abort"
    stats: GenerationStats
    drafts: list[list[int]] = field(default_factory=list)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def stats_of(request: Request) -> GenerationStats:
    s = request.stats
    generated = len(request.output_ids) + (1 if request.stop_token is not None else 0)
    forwards = s.forwards
    end = s.finish_s or time.perf_counter()
    return GenerationStats(
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=len(request.output_ids),
        canvases=len(s.forwards_per_canvas),
        forwards_per_canvas=list(s.forwards_per_canvas),
        tokens_per_forward=generated / forwards if forwards else 0.0,
        prefill_ms=s.prefill_ms,
        denoise_ms=s.denoise_ms,
        total_ms=(end - s.arrival_s) * 1e3,
        time_to_first_canvas_ms=None if s.first_canvas_s is None else (s.first_canvas_s - s.arrival_s) * 1e3,
    )


class LLM:
    """A loaded model with its tokenizer and default generation settings."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        generation_config: str | Path | None = None,
        quantization: str | None = None,  # "fp8": the experts' weights in float8 (dgemma.model.fp8)
    ):
        device = torch.device(device or default_device())
        dtype = parse_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        if model is None:
            from dgemma.default_model import default_model_path

            model = default_model_path()
        net, path, self.load_report = load_model(model, dtype, device, quantization)
        self.path = path
        gen_path = Path(generation_config) if generation_config else path / "generation_config.json"
        self._setup(net, _load_tokenizer(path), _read_generation_config(gen_path, required=bool(generation_config)))

    @classmethod
    def from_model(cls, model: DiffusionGemma, tokenizer=None, generation_config: dict | None = None) -> "LLM":
        """Wrap a model built in memory (e.g. random full-size weights built on a GPU)."""
        self = cls.__new__(cls)
        self.path = None
        self.load_report = None
        self._setup(model, tokenizer, generation_config)
        return self

    def _setup(self, model: DiffusionGemma, tokenizer, generation_config: dict | None) -> None:
        if not any(p.requires_grad for p in model.parameters()):
            # An inference model: one GEMM per packed group of projections, and on a GPU the dense MLPs beside the
            # experts. A model someone is training keeps its parameters (packing replaces them, and an optimizer
            # would hold the old ones).
            model.prepare_inference()
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        defaults = SamplingParams.from_generation_config(self.generation_config)
        if not defaults.eos_token_ids:
            defaults = defaults.with_overrides(eos_token_ids=tuple(self.config.eos_token_id))
        self.default_params = defaults

    # ------------------------------------------------------------------------------------------------------
    def params(self, params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """The checkpoint's defaults, then `params`, then keyword overrides."""
        base = params or self.default_params
        return base.with_overrides(**overrides) if overrides else base

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            tok = self.require_tokenizer()
            return [self.config.bos_token_id] + tok.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def require_tokenizer(self):
        if self.tokenizer is None:
            where = f"{self.path}/tokenizer.json" if self.path else "this model"
            raise CheckpointError(f"{where}: no tokenizer, so text prompts cannot be used (pass token ids)")
        return self.tokenizer

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = False,
                    **template_kwargs) -> list[int]:
        return self.require_tokenizer().apply_chat(
            messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
        *,
        on_output: Callable[[int, RequestOutput], None] | None = None,
        skip_special_tokens: bool = True,
        want_drafts: bool = False,
        **overrides,
    ) -> list[GenerationResult]:
        """Generate for one prompt or many (text or token ids). Each row stops on its own.

        With a `seed`, row i uses seed + i, so one call is reproducible and its rows differ.
        `on_output(i, output)` is called after every step that committed a canvas (or drew a draft) for row i.
        """
        batch = _as_batch(prompts)
        params = self.params(params, **overrides)
        return self._run([self.encode_prompt(p) for p in batch], params, on_output, skip_special_tokens, want_drafts)

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
        *,
        tools: list[dict] | None = None,
        enable_thinking: bool = False,
        on_output: Callable[[int, RequestOutput], None] | None = None,
        skip_special_tokens: bool = True,
        **overrides,
    ) -> list[GenerationResult]:
        """Generate replies to one conversation (a list of messages) or several, through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        params = self.params(params, **overrides)
        prompts = [self.chat_prompt(c, tools=tools, enable_thinking=enable_thinking) for c in conversations]
        return self._run(prompts, params, on_output, skip_special_tokens, False)

    def _run(self, prompts, params, on_output, skip_special_tokens, want_drafts) -> list[GenerationResult]:
        if not prompts:
            return []
        canvas = self.config.canvas_length
        canvases = -(-params.max_new_tokens // canvas)
        max_len = max(len(p) for p in prompts) + canvases * canvas
        if max_len > self.config.max_position_embeddings:
            raise RequestError(
                f"prompt + max_new_tokens needs {max_len} positions; the model has {self.config.max_position_embeddings}"
            )
        engine = self._engine_for(len(prompts), max_len, max(len(p) for p in prompts))
        requests = []
        for i, ids in enumerate(prompts):
            row_params = params if params.seed is None else params.with_overrides(seed=params.seed + i)
            request = Request(str(i), ids, row_params, want_drafts=want_drafts,
                              stop_fn=self._stop_fn(params, skip_special_tokens))
            engine.add_request(request)
            requests.append(request)
        drafts: dict[int, list[list[int]]] = {i: [] for i in range(len(prompts))}
        while engine.has_work:
            for out in engine.step():
                index = int(out.request_id)
                if out.draft_ids is not None:
                    drafts[index].append(out.draft_ids)
                if on_output is not None:
                    on_output(index, out)
        results = []
        for i, r in enumerate(requests):
            text = self.decode(r.output_ids, skip_special_tokens)
            if text is not None and params.stop:
                text = _cut_at_stop(text, params.stop)
            results.append(GenerationResult(r.prompt_ids, r.output_ids, text, r.finish_reason, stats_of(r), drafts[i]))
        return results

    def _engine_for(self, rows: int, max_len: int, longest_prompt: int) -> Engine:
        """An engine with room for this call, kept for the next ones: on a GPU an engine captures CUDA graphs and
        allocates its KV cache, which a call should not pay for again. Sizes grow in steps (rows to a power of two,
        lengths to whole 1024s) so that calls of similar size share one."""
        engine = getattr(self, "_engine", None)
        cfg = engine.config if engine is not None else None
        if cfg is None or cfg.max_num_seqs < rows or cfg.max_model_len < max_len or cfg.max_prefill_tokens < longest_prompt:
            self._engine = None  # free the old cache before allocating the new one
            rows = 1 << (rows - 1).bit_length()
            max_len = min(-(-max_len // 1024) * 1024, self.config.max_position_embeddings)
            self._engine = Engine(self.model, SchedulerConfig(
                max_num_seqs=rows, max_queue_len=0, max_prefill_tokens=max(4096, longest_prompt),
                max_model_len=max_len, canvas_length=self.config.canvas_length,
            ))
        return self._engine

    def _stop_fn(self, params: SamplingParams, skip_special_tokens: bool):
        if not params.stop or self.tokenizer is None:
            return None

        def stop_fn(ids: list[int]) -> bool:
            text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            return any(s in text for s in params.stop)

        return stop_fn


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _as_batch(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _load_tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        return None
    from dgemma.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _read_generation_config(path: Path, required: bool) -> dict | None:
    data = read_json(path, required=required)
    if data is None:
        return None
    try:
        SamplingParams.from_generation_config(data)
    except RequestError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return data
