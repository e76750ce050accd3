"""`dgemma train`: block-diffusion supervised training of DiffusionGemma-architecture checkpoints, CPU or CUDA.

    tokenizer  (a new byte-level BPE trained on rendered conversations, or the one of --init-from)
    corpus     (tasks.generate_examples, rendered and tokenized by worker processes in chunks, streamed into the
               first epoch while the step trains)
    model      (a preset architecture with random weights, or --init-from)
    loop:      batch -> objective (CUDA: bfloat16 model under autocast) -> backward -> clip -> AdamW, or Muon with
               AdamW (optim.py), on float32 master weights
               warmup, then cosine decay over the run's progress (steps or wall-clock budget, whichever is further)
               progress bar on stderr, held-out validation loss, resumable state every few minutes
    export     (the Hugging Face layout dgemma and transformers load; bfloat16 shards, tokenizer, generation config)
    evaluate   (held-out problems through the exported checkpoint; optionally a sampler sweep that writes the
               chosen settings into generation_config.json)

The resumable state is one file next to the output, `<out>.train.pt`: model, optimizer, step, data-stream position,
random states and the tokenizer. Ctrl-C saves it too. Running the same command again resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dgemma.checkpoint.layout import checkpoint_tensors
from dgemma.checkpoint.random_init import InitScale, build_random_model, write_checkpoint_files
from dgemma.checkpoint.tokenizer_builder import TOKENIZER_KINDS
from dgemma.config import FULL, SLIDING, AttentionSpec, ModelConfig
from dgemma.errors import ConfigError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.moe import Experts
from dgemma.train.dataset import (BatchSampler, CorpusStream, TrainBatch, collate, pad_batch, padded_width,
                                  static_shape, tokenize_examples, tokenizer_corpus)
from dgemma.train.objective import LossParts, ObjectiveConfig, block_diffusion_loss
from dgemma.train.optim import OPTIMIZERS, build_optimizer
from dgemma.train.step_graphs import GraphedLossStep
from dgemma.train.tasks import FAMILIES, heldout_examples

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GRAPH_WIDTH_MULTIPLE = 32  # batch widths with CUDA graphs: at most 16 shapes up to 512 tokens, ~16 tokens of padding


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------


def _layers(pattern: str) -> list[str]:
    return [FULL if c == "F" else SLIDING for c in pattern]


def model_preset(name: str, vocab_size: int, eos_token_ids: list[int], architecture: dict | None = None) -> ModelConfig:
    """A training architecture; the vocabulary comes from the tokenizer, `architecture` changes the preset's fields
    (`with_architecture`).

    mini (the shipped dgemma-mini): 8 layers of hidden 256, full attention on layers 2, 5 and 7 (every third and
    the last) and a 32-token sliding window on the others, 4 query heads (sliding: 2 KV heads of 64; full: 1 KV
    head of 128, k-as-v, proportional RoPE), a dense MLP of 512 beside 8 experts of width 128 (top 2), and a
    32-token canvas. With a 1024-token vocabulary: 11,995,088 parameters (tied embedding counted once), 24.0 MB
    in bfloat16.
    micro: a 3-layer toy of hidden 64 for tests and CPU smoke runs (same features, 16-token canvas).
    """
    common = dict(vocab_size=vocab_size, eos_token_id=list(eos_token_ids), pad_token_id=0, bos_token_id=2)
    if name == "mini":
        config = ModelConfig(
            hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8, top_k_experts=2,
            num_attention_heads=4, layer_types=_layers("SSFSSFSF"),
            sliding=AttentionSpec(head_dim=64, num_kv_heads=2, rope_theta=10_000.0),
            full=AttentionSpec(head_dim=128, num_kv_heads=1, rope_theta=1_000_000.0, partial_rotary_factor=0.25,
                               has_v_proj=False),
            sliding_window=32, canvas_length=32, max_position_embeddings=2048, **common,
        )
    elif name == "micro":
        config = ModelConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, top_k_experts=2,
            num_attention_heads=2, layer_types=_layers("SSF"),
            sliding=AttentionSpec(head_dim=32, num_kv_heads=1, rope_theta=10_000.0),
            full=AttentionSpec(head_dim=64, num_kv_heads=1, rope_theta=1_000_000.0, partial_rotary_factor=0.25,
                               has_v_proj=False),
            sliding_window=16, canvas_length=16, max_position_embeddings=2048, **common,
        )
    else:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return with_architecture(config, architecture or {})


MODEL_PRESETS = ("mini", "micro")
# ModelConfig fields an architecture may change (the vocabulary and special tokens come from the tokenizer).
ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "top_k_experts",
                       "num_attention_heads", "layer_types", "sliding_window", "canvas_length",
                       "max_position_embeddings", "sliding", "full")


def with_architecture(config: ModelConfig, changes: dict) -> ModelConfig:
    """`config` with some fields changed, validated: e.g. {"layer_types": "SSFSSFSSFSSF", "hidden_size": 224,
    "sliding_window": 64, "sliding": {"head_dim": 56}}. layer_types is a string of S (sliding) and F (full), one
    letter per layer; "sliding" and "full" change fields of that layer type's AttentionSpec."""
    if not isinstance(changes, dict):
        raise ConfigError(f"architecture must be a JSON object {{field: value}}, got {changes!r}")
    unknown = sorted(set(changes) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise ConfigError(f"architecture: unknown fields {unknown}; known: {list(ARCHITECTURE_FIELDS)}")
    fields = dict(changes)
    if "layer_types" in fields:
        pattern = fields["layer_types"]
        if not isinstance(pattern, str) or not pattern or set(pattern) - {"S", "F"}:
            raise ConfigError("architecture: layer_types must be a string of S (sliding) and F (full), one letter "
                              f"per layer, e.g. 'SSFSSF'; got {pattern!r}")
        fields["layer_types"] = _layers(pattern)
    spec_fields = [f.name for f in dataclasses.fields(AttentionSpec)]
    for kind in ("sliding", "full"):
        if kind in fields:
            spec = fields[kind]
            if not isinstance(spec, dict) or set(spec) - set(spec_fields):
                raise ConfigError(f"architecture: {kind} must be an object with fields among {spec_fields}, got "
                                  f"{spec!r}")
            fields[kind] = dataclasses.replace(getattr(config, kind), **spec)
    return dataclasses.replace(config, **fields).validate()

# Sampler defaults written with a new checkpoint (a sweep after training replaces the tuned ones).
GENERATION_CONFIG = {
    "max_new_tokens": 256,
    "max_denoising_steps": 16,
    "sampler_config": {"entropy_bound": 1.0, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.02,
}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


COMPILE_SCOPES = ("off", "objective", "layers")  # TrainConfig.compile


@dataclass
class TrainConfig:
    """Everything a training run depends on. Fields that change the model or the data stream must match on resume."""

    out_dir: str  # the exported checkpoint; the resumable state is <out_dir>.train.pt
    preset: str = "mini"  # architecture of a new model (see model_preset); ignored with init_from
    architecture: dict | None = None  # changes to the preset's fields (with_architecture); not with init_from
    init_from: str | None = None  # fine-tune this checkpoint (keeps its architecture and tokenizer)
    vocab_size: int = 1024  # BPE vocabulary of a new tokenizer
    # "letters": every ASCII letter is its own token in a new tokenizer (tokenizer_builder.build_tokenizer), so the
    # spelling tasks (reverse a word, change its case, count its letters) copy tokens; sequences get about 2x longer.
    tokenizer: str = "bpe"
    tokenizer_examples: int = 20_000  # rendered conversations the tokenizer is trained on
    train_examples: int = 200_000  # examples generated and tokenized up front (epochs repeat them)
    families: list[str] | None = None  # task families to train on (default: all)
    family_weights: dict[str, float] | None = None  # mixture weights (default: each family's own)
    max_length: int = 1024  # longer examples are dropped
    batch_size: int = 64  # examples per step ...
    max_batch_tokens: int | None = None  # ... fewer where rows x longest row would exceed this (memory bound)
    max_steps: int | None = None  # stop after this many steps ...
    time_budget_min: float | None = None  # ... or after this much training time (whichever comes first)
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (norm weights and scalars are multipliers around 1)
    # "adamw", or "muon": orthogonalised momentum for the hidden matrices, AdamW for the embedding, norms and
    # scalars (optim.py); both take the same lr, schedule and weight decay.
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    init_std: float = 0.02  # std of new linear weights ...
    embed_std: float = 0.05  # ... and of the (tied) embedding
    # Gemma 4 attention has no 1/sqrt(d) scale: q and k are RMS-normalised, so with norm weights of 1 the logits of
    # a new model have standard deviation sqrt(head_dim) (8 to 11 here) and every softmax starts saturated, nearly
    # one-hot on a random key, which starves attention of gradient. "unit" starts the q and k norm weights at
    # head_dim^-1/4, so the logits start with unit variance as in standard attention; "ones" keeps 1.
    qk_norm_init: str = "unit"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    device: str | None = None  # default: cuda if available
    precision: str = "auto"  # "bf16": bfloat16 model under autocast, float32 master weights; "fp32"; auto: bf16 on CUDA
    # torch.compile in training (Inductor, dynamic shapes), forward and backward: Inductor fuses the norms, casts,
    # residual adds and expert products that are most of a small model's step. "objective": the whole objective
    # (1.6x a step on an H100 at batch 256; one graph since the seventh session, but its first compile took over 6
    # minutes on a 16-core GPU host, docs/benchmarks.md). "layers": each layer's feed-forward half (norms, MLP,
    # routing, experts), one compile shared by every layer (~20 s on a 2-core CPU); attention stays eager.
    compile: str = "off"  # "off", "objective" or "layers"
    # CUDA: forward and backward replayed as one captured graph per batch shape (step_graphs.py), compiled or not;
    # batches are padded to widths that are multiples of GRAPH_WIDTH_MULTIPLE.
    cuda_graphs: bool = True
    # "dense" (all experts, weighted: no host sync) or "model"; auto = dense on CUDA and under torch.compile (its
    # fake tensors refuse torch._grouped_mm in float32, which eager CPU training runs)
    moe_impl: str = "auto"
    seed: int = 0
    workers: int = 0  # processes generating the corpus (0 = one per CPU but one, at most 16)
    eval_every: int = 500  # steps between held-out validation losses (0 = only at the end)
    val_examples: int = 256
    checkpoint_every_min: float = 2.0  # minutes between saves of the resumable state (0 = only at the end)
    resume: bool = True  # continue from <out_dir>.train.pt when it exists
    keep_state: bool = False  # keep <out_dir>.train.pt after a finished run (it is always kept when interrupted)
    overwrite: bool = False  # replace an existing out_dir at export
    log_every_s: float = 30.0  # seconds between progress lines when stderr is not a terminal
    profile_at: int | None = None  # profile PROFILE_STEPS steps of the real loop from this step (tables in the log)
    final_eval: int = 200  # held-out problems scored after export (0 = skip)
    sweep: bool = False  # after export, sweep sampler settings and write the best into generation_config.json
    max_shard_mb: float = 15.0  # exported safetensors shard size (MiB)
    generation_config: dict = field(default_factory=lambda: json.loads(json.dumps(GENERATION_CONFIG)))

    # Fields that may differ between a run and its resumption.
    RESUMABLE_CHANGES = ("max_steps", "time_budget_min", "resume", "keep_state", "overwrite", "log_every_s",
                         "final_eval", "sweep", "checkpoint_every_min", "eval_every", "workers", "compile", "cuda_graphs",
                         "max_shard_mb", "generation_config", "profile_at")

    def validate(self) -> "TrainConfig":
        if not self.out_dir:
            raise ConfigError("out_dir is required: the directory the trained checkpoint is written to")
        if self.init_from is None and self.preset not in MODEL_PRESETS:
            raise ConfigError(f"preset must be one of {list(MODEL_PRESETS)}, got {self.preset!r}")
        if self.architecture is not None:
            if self.init_from is not None:
                raise ConfigError("architecture changes a new model's preset; a model from init_from keeps its own")
            model_preset(self.preset, self.vocab_size, [1], self.architecture)  # bad fields fail before any work
        positive_ints = ("vocab_size", "tokenizer_examples", "train_examples", "max_length", "batch_size",
                         "val_examples")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.profile_at is not None and (not isinstance(self.profile_at, int) or self.profile_at < 0):
            raise ConfigError(f"profile_at must be a step number >= 0, got {self.profile_at!r}")
        for name in ("warmup_steps", "eval_every", "workers", "final_eval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_batch_tokens is not None and (not isinstance(self.max_batch_tokens, int)
                                                  or self.max_batch_tokens < self.max_length):
            raise ConfigError(f"max_batch_tokens must be an integer >= max_length ({self.max_length}) so every example "
                              f"fits a batch, got {self.max_batch_tokens!r}")
        if self.max_steps is None and self.time_budget_min is None:
            raise ConfigError("give max_steps or time_budget_min (or both): training needs an end")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError(f"time_budget_min must be > 0, got {self.time_budget_min!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "checkpoint_every_min", "log_every_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("init_std", "embed_std", "max_shard_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer must be one of {list(TOKENIZER_KINDS)}, got {self.tokenizer!r}")
        if self.qk_norm_init not in ("unit", "ones"):
            raise ConfigError(f"qk_norm_init must be 'unit' or 'ones', got {self.qk_norm_init!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.compile not in COMPILE_SCOPES:
            raise ConfigError(f"compile must be one of {list(COMPILE_SCOPES)}, got {self.compile!r}")
        if self.moe_impl not in ("auto", "dense", "model"):
            raise ConfigError(f"moe_impl must be 'auto', 'dense' or 'model', got {self.moe_impl!r}")
        if self.compile != "off" and self.moe_impl == "model":
            raise ConfigError("moe_impl 'model' cannot be compiled (torch._grouped_mm does not trace in float32): "
                              "use moe_impl 'auto' or 'dense' with compile")
        unknown = [f for f in (self.families or []) + list(self.family_weights or {}) if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
        if self.families is not None and not self.families:
            raise ConfigError("families is empty: name at least one task family (or leave it unset for all)")
        self.objective.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["objective"] = ObjectiveConfig(**data.get("objective", {}))
        if isinstance(data.get("compile"), bool):  # states saved before the layers scope: a flag for the objective
            data["compile"] = "objective" if data["compile"] else "off"
        return cls(**data)

    @property
    def state_path(self) -> Path:
        out = Path(self.out_dir)
        return out.with_name(out.name + ".train.pt")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    examples_seen: int
    encoder_tokens: int
    canvas_tokens: int
    train_seconds: float
    final_loss: float
    final_diffusion_loss: float
    final_ar_loss: float
    val_loss: float | None
    parameters: int
    checkpoint_bytes: int
    timings_s: dict = field(default_factory=dict)
    peak_memory_bytes: int | None = None  # CUDA: the most memory the training loop's tensors held
    eval_report: object | None = None  # evaluate.EvalReport of the exported checkpoint
    sweep_choice: dict | None = None


# --------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------


def experts_dense(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    """Routed experts computed densely: every expert on every token, weighted by the router (0 if not chosen).

    x: [N, H]; weights, experts: [N, K]; gate_up: [E, 2I, H]; down: [E, H, I] -> [N, H]. Same function as
    `moe.experts_loop`; E/K times its expert FLOPs, but as two plain GEMMs over all experts side by side (no host
    synchronisation, no alignment rules, no per-expert launches), which on a GPU is fast for a small model and
    differentiates like any matmul. The router weight scales each expert's hidden activations before the down
    projection, so the sum over experts is part of that GEMM.
    """
    e, two_i, h = gate_up.shape
    i = two_i // 2
    mix = torch.zeros(x.shape[0], e, dtype=weights.dtype, device=x.device)
    mix = mix.scatter(1, experts, weights)  # [N, E]
    gate, up = (x @ gate_up.reshape(e * two_i, h).t()).view(-1, e, two_i).split(i, dim=-1)  # [N, E, I] each
    act = F.gelu(gate, approximate="tanh") * up * mix.to(up.dtype)[:, :, None]  # [N, E, I]
    return (act.reshape(-1, e * i) @ down.transpose(1, 2).reshape(e * i, h)).to(x.dtype)  # [N, H]


class DenseExperts(Experts):
    """The experts of a layer in training: `experts_dense` on the same parameters (names unchanged)."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return experts_dense(x, weights, experts, self.gate_up_proj, self.down_proj)


def use_dense_experts(model: DiffusionGemma) -> None:
    """Swap every layer's experts for `DenseExperts` sharing its parameters (the state_dict is unchanged)."""
    for layer in model.layers:
        old = layer.experts
        with torch.device("meta"):
            new = DenseExperts(1, 1, 1)
        new.gate_up_proj, new.down_proj = old.gate_up_proj, old.down_proj
        layer.experts = new


def compile_feed_forward(model: DiffusionGemma, backend: str) -> None:
    """Every layer's `feed_forward` through one torch.compile of `Layer.feed_forward`: it reads no layer index or
    cache, so the trace made for one layer serves all of them (recompiles come only from the grad mode, the layer
    scalar's type and the first new width), where a whole-objective trace covers every layer of three passes."""
    compiled = torch.compile(type(model.layers[0]).feed_forward, backend=backend, dynamic=True)
    for layer in model.layers:
        layer.feed_forward = types.MethodType(compiled, layer)  # this model's layers only


def training_objective(model: DiffusionGemma, config: ObjectiveConfig, compile_backend: str | None = None,
                       scope: str = "objective") -> Callable[[TrainBatch, torch.Generator | None], LossParts]:
    """`(batch, generator) -> LossParts`: the block-diffusion loss of a batch, through torch.compile when a backend
    is named ("inductor" for training; tests trace with "aot_eager") and the scope (`COMPILE_SCOPES`) is not "off":
    the whole objective or, with "layers", each layer's feed-forward half (`compile_feed_forward`, which changes the
    model's layers)."""

    def loss(batch: TrainBatch, generator: torch.Generator | None) -> LossParts:
        return block_diffusion_loss(model, batch, config, generator)

    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile scope must be one of {list(COMPILE_SCOPES)}, got {scope!r}")
    if compile_backend is None or scope == "off":
        return loss
    if scope == "layers":
        compile_feed_forward(model, compile_backend)
        return loss
    # dynamic: batch shapes differ in rows and width, and one compile serves them all. fallback_random keeps
    # torch.rand an ordinary op: the eager path's numbers, drawn on the device inside a CUDA graph.
    options = {"fallback_random": True} if compile_backend == "inductor" else None
    return torch.compile(loss, backend=compile_backend, dynamic=True, options=options)


PROFILE_STEPS = 5


class StepProfiler:
    """torch.profiler over PROFILE_STEPS steps of the real training loop (data, validation and saves included), then
    two tables in the log: kernels by device time and operators by host time. Where an isolated step
    (scripts/train_step_ab.py) and the loop disagree, these say which side waits."""

    def __init__(self, device: torch.device):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.device = device
        self.steps = 0
        self.start = time.perf_counter()
        self.profile = profile(activities=activities)
        self.profile.start()

    def step_done(self) -> bool:
        self.steps += 1
        if self.steps < PROFILE_STEPS:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - self.start) * 1e3 / self.steps
        self.profile.stop()
        events = self.profile.key_averages()
        if self.device.type == "cuda":
            device_ms = sum(e.self_device_time_total for e in events) / 1e3 / self.steps
            kernels = sum(e.count for e in events if e.self_device_time_total > 0) / self.steps
            log.info("profile of %d steps: %.0f ms wall a step, %.0f ms of device time, %.0f kernels a step",
                     self.steps, wall_ms, device_ms, kernels)
            log.info("by device time:\n%s", events.table(sort_by="self_device_time_total", row_limit=15))
        else:
            log.info("profile of %d steps: %.0f ms wall a step", self.steps, wall_ms)
        log.info("by host time:\n%s", events.table(sort_by="self_cpu_time_total", row_limit=15))
        return True


def lr_at(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio over the run's progress [0, 1]."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class MasterWeights:
    """The float32 weights the optimizer updates.

    In float32 training they are the model's own parameters. In bf16 training the model holds bfloat16 copies, so
    its forward and backward run in bfloat16 end to end, exactly the dtype path of bfloat16 inference (the KV cache
    included); each step moves the gradients to float32, the optimizer updates the float32 weights, and the model's
    copies are rounded from them.
    """

    def __init__(self, model: torch.nn.Module, low_precision: torch.dtype | None):
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.model_params = [p for _, p in named]
        self.separate = low_precision is not None
        if self.separate:
            self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
            for p in self.model_params:
                p.data = p.data.to(low_precision)
        else:
            self.params = self.model_params

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, float32 parameter) pairs: what build_optimizer splits between its optimizers."""
        return list(zip(self.names, self.params))

    def gradients_to_master(self) -> None:
        if self.separate:
            for master, p in zip(self.params, self.model_params):
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        if self.separate:
            torch._foreach_copy_(self.model_params, self.params)  # rounds to the model's dtype

    def state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu() for name, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ConfigError(f"the saved training state lacks parameters {missing[:3]}")
        for name, p in zip(self.names, self.params):
            p.copy_(state[name])
        self.master_to_model()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # the tied embedding is one parameter: counted once


def export_tensors(model: DiffusionGemma, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) in the Hugging Face layout, as `loader.load_weights` reads it back."""
    for name, (param_name, _) in checkpoint_tensors(model).items():
        if param_name.startswith("encoder_layer_scalars["):
            layer = int(param_name[len("encoder_layer_scalars[") : -1])
            tensor = model.encoder_layer_scalars[layer : layer + 1]
        else:
            tensor = model.get_parameter(param_name)
        yield name, tensor.detach().to(device="cpu", dtype=dtype).contiguous()


class Progress:
    """One status line on stderr: redrawn in place on a terminal, else printed every `every_s` seconds."""

    def __init__(self, every_s: float, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.last = 0.0

    def due(self) -> bool:
        """Whether a line would be shown now (terminals redraw twice a second)."""
        return time.monotonic() - self.last >= (0.5 if self.tty else self.every_s)

    def update(self, text: str, force: bool = False) -> None:
        if not (force or self.due()):
            return
        self.stream.write(("\r\033[K" + text) if self.tty else (text + "\n"))
        self.stream.flush()
        self.last = time.monotonic()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig, callback: Callable[[int, dict], None] | None = None):
        self.config = config.validate()
        self.callback = callback
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was requested but CUDA is not available on this machine")
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.use_graphs = self.device.type == "cuda" and config.cuda_graphs
        out = Path(config.out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
            raise ConfigError(f"{out}: already exists and is not empty; choose a new directory or pass overwrite")
        self.timings: dict[str, float] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="dgemma-train-")
        self.tokenizer_dir = Path(self.tmp.name) / "tokenizer"

    # ------------------------------------------------------------------------------------------------
    def _stage(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _prepare_tokenizer(self, saved: dict | None) -> dict[str, str]:
        """Tokenizer files (name -> text) from the resumable state, the init checkpoint, or a new BPE."""
        cfg = self.config
        if saved is not None:
            files = saved
        elif cfg.init_from is not None:
            from dgemma.checkpoint.loader import resolve_model_path

            source = resolve_model_path(cfg.init_from)
            files = {name: (source / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                     if (source / name).is_file()}
        else:
            from dgemma.checkpoint.tokenizer_builder import build_tokenizer, write_tokenizer_files

            texts = tokenizer_corpus(cfg.seed + 7_777, cfg.tokenizer_examples, cfg.families, cfg.family_weights)
            write_tokenizer_files(self.tokenizer_dir,
                                  build_tokenizer(texts, cfg.vocab_size, letters=cfg.tokenizer == "letters"),
                                  model_max_length=2048)
            files = {name: (self.tokenizer_dir / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}
        self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (self.tokenizer_dir / name).write_text(text, encoding="utf-8")
        return files

    def _build_model(self, tokenizer) -> DiffusionGemma:
        cfg = self.config
        if cfg.init_from is not None:
            from dgemma.checkpoint.loader import load_model

            model, _, _ = load_model(cfg.init_from, torch.float32, self.device)
        else:
            eos = [tokenizer.eos_id] + [tokenizer.token_to_id(t) for t in ("<turn|>", "<|tool_response>")]
            if any(t is None for t in eos):
                raise ConfigError("the tokenizer lacks the chat markers <turn|> / <|tool_response>")
            model_config = model_preset(cfg.preset, tokenizer.vocab_size, eos, cfg.architecture)
            model = build_random_model(model_config, torch.float32, self.device, seed=cfg.seed,
                                       scale=InitScale(linear_std=cfg.init_std, embed_std=cfg.embed_std))
            if cfg.qk_norm_init == "unit":
                with torch.no_grad():
                    for layer in model.layers:
                        attention = layer.self_attn
                        for norm in (attention.q_norm, attention.k_norm):
                            norm.weight.fill_(attention.spec.head_dim ** -0.25)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                              f"{model.config.vocab_size}")
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        dense_auto = self.device.type == "cuda" or cfg.compile != "off"
        if cfg.moe_impl == "dense" or (cfg.moe_impl == "auto" and dense_auto):
            use_dense_experts(model)
        # Eager ops in every pass: the fused inference kernels have no backward, and the gradient-free
        # self-conditioning pass should compute exactly the function the graded pass differentiates.
        model.set_kernel_devices(())
        return model

    def _capture_all_shapes(self, graphs: GraphedLossStep, vocab_size: int, canvas_length: int) -> None:
        """Compile, warm up and capture the step for every batch shape the sampler can produce, on stand-in batches,
        before the first step (with --compile objective: the trace is made on the widest shape, see below).
        Otherwise each shape is captured when its first batch comes: capturing ahead would only delay the first
        step, and shapes a run never meets would cost time for nothing."""
        cfg = self.config
        t0 = time.perf_counter()
        rng = random.Random(0)
        # Widest first: a compile traced on a 32-token width would tie the width's size to the 32-token canvas's
        # (torch's duck sizing) and compile again for every other width.
        widths = range(padded_width(cfg.max_length, GRAPH_WIDTH_MULTIPLE), 0, -GRAPH_WIDTH_MULTIPLE)
        for width in widths:
            rows, _ = static_shape(width, cfg.batch_size, cfg.max_batch_tokens, GRAPH_WIDTH_MULTIPLE)
            prompt = max(1, width - canvas_length)  # one block of response
            examples = [([rng.randrange(vocab_size) for _ in range(width)], prompt) for _ in range(rows)]
            graphs.prepare(collate(examples, canvas_length, 0, rng), self.device)
        torch.cuda.synchronize(self.device)
        self._stage("capture_s", t0)
        log.info("captured the compiled training step for %d batch shapes in %.1f s", len(widths),
                 time.perf_counter() - t0)

    def _val_batches(self, tokenizer, canvas_length: int, pad_id: int) -> list[TrainBatch]:
        cfg = self.config
        examples = heldout_examples(cfg.seed + 31, cfg.val_examples, cfg.families, cfg.family_weights)
        corpus = tokenize_examples(tokenizer, examples, cfg.max_length)
        rng = random.Random(cfg.seed + 32)  # the same corrupted blocks at every evaluation
        size = min(cfg.batch_size, len(corpus))
        batches = []
        for start in range(0, len(corpus) - size + 1, size):
            rows = [corpus.example(i) for i in range(start, start + size)]
            batches.append(collate(rows, canvas_length, pad_id, rng).to(self.device))
        return batches

    @torch.no_grad()
    def validation_loss(self, model: DiffusionGemma, batches: list[TrainBatch]) -> float:
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + 33)  # the same noise every time
        total = 0.0
        for batch in batches:
            with self._autocast():
                total += float(block_diffusion_loss(model, batch, self.config.objective, gen).loss)
        return total / max(1, len(batches))

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        # No cache of cast weights: a captured graph must not keep tensors cast in an earlier step. The model's
        # weights are already bfloat16 under bf16 training, so there is nothing to cache.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # ------------------------------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        cfg = self.config
        path = cfg.state_path
        if not (cfg.resume and path.is_file()):
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        changed = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]
        if changed:
            raise ConfigError(
                f"{path}: saved by a run with different {', '.join(changed)}; resume with the same settings, "
                "or delete the file (or pass no-resume) to start over"
            )
        return state

    def _save_state(self, master, optimizer, sampler, gen, counters: dict, tokenizer_files: dict) -> None:
        path = self.config.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config.to_dict(),
            "model": master.state(),  # float32
            "optimizer": optimizer.state_dict(),
            "counters": dict(counters),
            "sampler": sampler.state(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "tokenizer": tokenizer_files,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        from dgemma.tokenizer import Tokenizer

        widest = padded_width(cfg.max_length, GRAPH_WIDTH_MULTIPLE)
        if self.use_graphs and cfg.max_batch_tokens is not None and cfg.max_batch_tokens < widest:
            # Checked before minutes of data generation, not when the sampler meets the corpus.
            raise ConfigError(f"max_batch_tokens={cfg.max_batch_tokens} cannot hold one example of max_length="
                              f"{cfg.max_length} padded to {widest} tokens for CUDA graphs; raise max_batch_tokens "
                              f"to {widest} or turn the graphs off (--no-cuda-graphs)")
        t0 = time.perf_counter()
        state = self._load_state()
        tokenizer_files = self._prepare_tokenizer(state["tokenizer"] if state else None)
        tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self._stage("tokenizer_s", t0)

        t0 = time.perf_counter()
        model = self._build_model(tokenizer)
        master = MasterWeights(model, self.autocast_dtype)
        if state is not None:
            master.load_state(state["model"])
        mc = model.config
        self._stage("model_s", t0)

        objective = training_objective(model, cfg.objective, "inductor", cfg.compile)
        graphs = None
        if self.use_graphs:
            graphs = GraphedLossStep(master.model_params, lambda b: objective(b, None),  # the default generator
                                     self._autocast, capture=self.device.type == "cuda")
        # The whole objective's compile is long: done, with every shape's capture, before the first step.
        capture_ahead = graphs is not None and graphs.capture and cfg.compile == "objective"

        # The corpus streams: workers make it chunk by chunk while the step is captured and then while it trains
        # (the first epoch takes the chunks in the order they are made).
        t0 = time.perf_counter()
        # One CPU stays free for the training loop itself, which now runs while the workers do.
        workers = cfg.workers or max(1, min(16, (os.cpu_count() or 2) - 1))
        stream = CorpusStream(str(self.tokenizer_dir), cfg.seed, cfg.train_examples, cfg.families,
                              cfg.family_weights, cfg.max_length, workers=workers)
        try:
            if capture_ahead:
                self._capture_all_shapes(graphs, mc.vocab_size, mc.canvas_length)
            val_batches = self._val_batches(tokenizer, mc.canvas_length, mc.pad_token_id)
            sampler = BatchSampler(stream, cfg.batch_size, mc.canvas_length, mc.pad_token_id, cfg.seed,
                                   max_batch_tokens=cfg.max_batch_tokens,
                                   width_multiple=GRAPH_WIDTH_MULTIPLE if self.use_graphs else 1)
            self._stage("data_s", t0)  # until the first step can start
            losses, counters, params = self._train(model, master, sampler, state, tokenizer_files, objective,
                                                   graphs, val_batches)
        finally:
            stream.close()
        if stream.seconds is not None:
            log.info("corpus: %d chunks of up to %d examples made by %d workers in %.1f s, while the step "
                     "trained", stream.num_parts, stream.chunk_size, workers, stream.seconds)
        if stream.dropped:
            log.info("examples longer than max_length=%d left out: %s", cfg.max_length,
                     ", ".join(f"{name} {n}" for name, n in sorted(stream.dropped.items(), key=lambda kv: -kv[1])))

        t0 = time.perf_counter()
        out = self.export(model)
        self._stage("export_s", t0)
        result = TrainResult(
            out_dir=out, steps=counters["step"], examples_seen=counters["examples"],
            encoder_tokens=counters["encoder_tokens"], canvas_tokens=counters["canvas_tokens"],
            train_seconds=counters["train_seconds"], final_loss=losses["loss"],
            final_diffusion_loss=losses["diffusion"], final_ar_loss=losses["ar"], val_loss=losses.get("val"),
            parameters=params,
            checkpoint_bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")), timings_s=self.timings,
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
        )
        del model, master
        if cfg.final_eval or cfg.sweep:
            self._evaluate(result)
        if not cfg.keep_state:
            cfg.state_path.unlink(missing_ok=True)  # the run is complete: the checkpoint is what remains
        return result

    def _train(self, model, master, sampler, state, tokenizer_files, objective, graphs, val_batches):
        """Optimizer, resume, and the loop: (losses, counters, parameter count)."""
        cfg, mc = self.config, model.config
        optimizer = build_optimizer(cfg.optimizer, master.named(), cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        if self.use_graphs and self.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + 1)  # graphs draw from the default generator (saved as cuda_rng)
        counters = {"step": 0, "train_seconds": 0.0, "examples": 0, "encoder_tokens": 0, "canvas_tokens": 0}
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            sampler.load_state(state["sampler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            counters.update(state["counters"])
            log.info("resumed %s at step %d (%.1f min trained)", cfg.state_path, counters["step"],
                     counters["train_seconds"] / 60)
        params = count_parameters(model)
        log.info("model: %s parameters (%s), canvas %d, device %s, precision %s, moe %s, optimizer %s",
                 f"{params:,}", cfg.init_from or cfg.preset, mc.canvas_length, self.device,
                 "bf16 under autocast, fp32 master weights" if self.autocast_dtype else "fp32",
                 "dense" if isinstance(model.layers[0].experts, DenseExperts) else "model's own", cfg.optimizer)
        log.info("training starts %.1f s after the corpus workers did (the corpus keeps coming)",
                 self.timings["data_s"])
        losses = self._loop(model, master, optimizer, sampler, gen, counters, val_batches, tokenizer_files,
                            objective, graphs)
        return losses, counters, params

    def _loop(self, model, master, optimizer, sampler, gen, counters, val_batches, tokenizer_files, objective,
              graphs: GraphedLossStep | None) -> dict:
        cfg = self.config
        budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else None
        progress_bar = Progress(cfg.log_every_s)
        window = {"loss": [], "diffusion": [], "ar": [], "accuracy": [], "skipped": []}  # device scalars since the last read
        shown = {"loss": float("nan"), "diffusion": float("nan"), "ar": float("nan"), "accuracy": float("nan")}
        last_save = time.monotonic()
        rate_start, rate_tokens = time.perf_counter(), 0
        val = None

        def progress() -> float:
            done = counters["step"] / cfg.max_steps if cfg.max_steps else 0.0
            if budget_s:
                done = max(done, counters["train_seconds"] / budget_s)
            return done

        def read_window() -> None:
            skipped = int(torch.stack(window["skipped"]).sum()) if window["skipped"] else 0
            window["skipped"].clear()  # a count, not a mean: the loop below then passes over it
            if skipped:
                counters["skipped_steps"] = counters.get("skipped_steps", 0) + skipped
                log.warning("%d of the last steps had non-finite gradients and were skipped (%d in all); "
                            "a lower lr may be needed", skipped, counters["skipped_steps"])
            for key, values in window.items():
                if values:
                    shown[key] = float(torch.stack(values).mean())  # one host sync per read, not per step
                    values.clear()

        try:
            profiler = None
            while progress() < 1.0:
                if counters["step"] == cfg.profile_at and profiler is None:
                    profiler = StepProfiler(self.device)
                step_start = time.perf_counter()
                batch = next(sampler)
                if graphs is not None:
                    batch = pad_batch(batch, *sampler.static_shape(int(batch.lengths.max())), model.config.pad_token_id)
                examples, encoder_tokens, canvas_tokens = batch.examples, batch.encoder_tokens, batch.canvas_tokens
                if self.device.type == "cuda":
                    batch = batch.pin_memory()  # the host goes on to the next batch while this one is copied
                lr = lr_at(cfg, counters["step"], progress())
                for group in optimizer.param_groups:
                    group["lr"] = lr
                try:
                    if graphs is not None:
                        parts = graphs.step(batch, self.device)
                    else:
                        batch = batch.to(self.device)
                        with self._autocast():
                            parts = objective(batch, gen)
                        parts.loss.backward()
                except torch.OutOfMemoryError:
                    parts = None  # handled below, outside the except block, whose frame still holds the tensors
                if parts is None:
                    if graphs is not None:
                        log.warning("out of GPU memory with CUDA graphs: the rest of the run is eager")
                        graphs = None
                    self._recover_from_oom(model, sampler, batch)
                    counters["train_seconds"] += time.perf_counter() - step_start
                    continue
                master.gradients_to_master()
                norm = torch.nn.utils.clip_grad_norm_(master.params, cfg.grad_clip or math.inf)  # [] on the device
                # A step whose gradients are not finite is skipped inside the fused optimizer (its step count too),
                # decided on the device: no host sync per step. One bad batch then costs one step, not the run.
                bad = ~torch.isfinite(norm)
                optimizer.found_inf = bad.float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                master.master_to_model()
                for key, value in (("loss", parts.loss), ("diffusion", parts.diffusion), ("ar", parts.ar),
                                   ("accuracy", parts.canvas_accuracy), ("skipped", bad)):
                    window[key].append(value.detach().float())
                counters["step"] += 1
                counters["examples"] += examples
                counters["encoder_tokens"] += encoder_tokens
                canvas_tokens *= cfg.objective.noise_samples  # every noisy copy is denoised
                counters["canvas_tokens"] += canvas_tokens
                rate_tokens += encoder_tokens + canvas_tokens
                if counters["step"] % 10 == 0:
                    read_window()  # a 10-step mean; the host sync also bounds how far the host runs ahead

                step = counters["step"]
                if cfg.eval_every and step % cfg.eval_every == 0:
                    t = time.perf_counter()
                    val = self.validation_loss(model, val_batches)
                    self._stage("validation_s", t)
                    log.info("step %d: validation loss %.4f", step, val)
                if cfg.checkpoint_every_min and time.monotonic() - last_save >= cfg.checkpoint_every_min * 60:
                    t = time.perf_counter()
                    self._save_state(master, optimizer, sampler, gen, counters, tokenizer_files)
                    self._stage("checkpoint_s", t)
                    last_save = time.monotonic()
                # The budget is wall-clock: validation and saves inside the loop count too.
                counters["train_seconds"] += time.perf_counter() - step_start
                if profiler is not None and profiler.step_done():
                    profiler = None  # its tables are logged (the step counter has moved past profile_at)
                elapsed = time.perf_counter() - rate_start
                tok_s = rate_tokens / elapsed if elapsed > 0 else 0.0
                if elapsed > 30:  # a recent rate: restart the window
                    rate_start, rate_tokens = time.perf_counter(), 0
                if self.callback is not None:  # this step's values (a host sync: callbacks are for tests, tools)
                    self.callback(step, {"loss": float(parts.loss), "diffusion": float(parts.diffusion),
                                         "ar": float(parts.ar), "canvas_accuracy": float(parts.canvas_accuracy),
                                         "lr": lr})
                if not progress_bar.due():
                    continue
                read_window()
                eta = ""
                if budget_s:
                    eta = f" | {counters['train_seconds'] / 60:.1f}/{budget_s / 60:.1f} min"
                elif cfg.max_steps:
                    eta = f"/{cfg.max_steps}"
                progress_bar.update(
                    f"step {step}{eta} | loss {shown['loss']:.4f} (diff {shown['diffusion']:.4f}, "
                    f"ar {shown['ar']:.4f}) | canvas acc {shown['accuracy']:.3f} | lr {lr:.2e} | "
                    f"{_fmt_count(tok_s)} tok/s | {_fmt_count(counters['examples'])} ex, epoch {sampler.epoch}"
                    + ("" if val is None else f" | val {val:.4f}")
                )
        except KeyboardInterrupt:
            progress_bar.close()
            self._save_state(master, optimizer, sampler, gen, counters, tokenizer_files)
            log.warning("interrupted at step %d: state saved to %s; run the same command to resume",
                        counters["step"], self.config.state_path)
            raise
        read_window()
        progress_bar.update(
            f"step {counters['step']} | loss {shown['loss']:.4f} (diff {shown['diffusion']:.4f}, ar {shown['ar']:.4f})"
            f" | canvas acc {shown['accuracy']:.3f}", force=True)
        progress_bar.close()
        t = time.perf_counter()
        val = self.validation_loss(model, val_batches)
        self._stage("validation_s", t)
        t = time.perf_counter()
        self._save_state(master, optimizer, sampler, gen, counters, tokenizer_files)
        self._stage("checkpoint_s", t)
        return dict(shown, val=val)

    def _recover_from_oom(self, model: DiffusionGemma, sampler: BatchSampler, batch: TrainBatch) -> None:
        """Skip a batch that ran out of GPU memory and cap later batches below its size.

        A long run should not die at step 3,000 because one batch of long tool prompts was bigger than the card.
        The cap is rows x longest row (what activation memory grows with); it never goes below the longest example.
        """
        model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rows, width = batch.input_ids.shape
        longest = sampler.longest  # of the examples met so far (while the corpus streams, a longer one goes alone)
        cap = max(longest, int(0.75 * rows * width))
        if sampler.max_batch_tokens is not None and sampler.max_batch_tokens <= longest:
            raise ConfigError(f"out of GPU memory on a batch of {rows} x {width} tokens with max_batch_tokens already "
                              f"at the longest example ({longest}); use a smaller model or max_length")
        sampler.max_batch_tokens = min(cap, sampler.max_batch_tokens or cap)
        sampler.drop_pending()
        log.warning("out of GPU memory on a batch of %d x %d tokens: skipped it; max_batch_tokens is now %d",
                    rows, width, sampler.max_batch_tokens)

    # ------------------------------------------------------------------------------------------------
    def export(self, model: DiffusionGemma) -> Path:
        """Write the checkpoint (bfloat16, tokenizer, generation config); replaces out_dir only with overwrite."""
        cfg = self.config
        out = Path(cfg.out_dir)
        target = out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not cfg.overwrite:
                raise ConfigError(f"{out}: already exists and is not empty; choose a new directory or pass overwrite")
            target = out.with_name(out.name + ".new")
            shutil.rmtree(target, ignore_errors=True)
        generation = dict(cfg.generation_config)
        # A response ends with <turn|> (an answer) or <|tool_response> (a tool call); training fills the rest of its
        # last canvas with <pad>, so <pad> also means "the answer is over": a canvas that lost its end marker but
        # went on to padding stops there instead of denoising canvases of padding up to max_new_tokens.
        generation.setdefault("eos_token_id", list(dict.fromkeys([*model.config.eos_token_id,
                                                                   model.config.pad_token_id])))
        write_checkpoint_files(target, model.config, export_tensors(model, torch.bfloat16), generation,
                               self.tokenizer_dir, "bfloat16", max_shard_bytes=int(cfg.max_shard_mb * (1 << 20)))
        if target != out:
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            target.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        return out

    def _evaluate(self, result: TrainResult) -> None:
        from dgemma.llm import LLM
        from dgemma.train import evaluate as ev

        cfg = self.config
        llm = LLM(result.out_dir, dtype="float32", device=self.device)
        batch = 512 if self.device.type == "cuda" else 64  # on a GPU the whole sweep set is one batch
        if cfg.sweep:
            t = time.perf_counter()
            examples = ev.heldout(cfg.seed + 101, max(cfg.final_eval, 300), cfg.families)
            results = ev.sweep(llm, examples, batch_size=batch, seed=cfg.seed,
                               log=lambda line: print(f"sweep: {line}", file=sys.stderr, flush=True))
            choice, _ = ev.choose_settings(results)
            ev.write_generation_settings(result.out_dir, choice)
            result.sweep_choice = choice
            llm = LLM(result.out_dir, dtype="float32", device=self.device)
            self._stage("sweep_s", t)
        if cfg.final_eval:
            t = time.perf_counter()
            examples = ev.heldout(cfg.seed + 202, cfg.final_eval, cfg.families)
            result.eval_report = ev.evaluate(llm, examples, batch_size=batch, seed=cfg.seed)
            self._stage("eval_s", t)


def train(config: TrainConfig, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train, export and (optionally) evaluate; see the module docstring."""
    trainer = Trainer(config, callback)
    try:
        return trainer.run()
    finally:
        trainer.tmp.cleanup()


def summary(result: TrainResult) -> str:
    """The closing report: what was trained, how well, and where it went."""
    minutes = result.train_seconds / 60
    tokens = result.encoder_tokens + result.canvas_tokens
    lines = [
        "== dgemma train: done ==",
        f"steps {result.steps}, examples {_fmt_count(result.examples_seen)}, tokens {_fmt_count(tokens)} "
        f"(encoder {_fmt_count(result.encoder_tokens)} + canvas {_fmt_count(result.canvas_tokens)}) in "
        f"{minutes:.2f} min of training ({_fmt_count(tokens / max(result.train_seconds, 1e-9))} tok/s, "
        f"{result.steps / max(result.train_seconds, 1e-9):.2f} steps/s"
        + ("" if result.peak_memory_bytes is None else f", peak GPU memory {result.peak_memory_bytes / 2**30:.1f} GiB")
        + ")",
        f"final loss {result.final_loss:.4f} (diffusion {result.final_diffusion_loss:.4f}, "
        f"ar {result.final_ar_loss:.4f}); held-out validation loss "
        + ("n/a" if result.val_loss is None else f"{result.val_loss:.4f}"),
        f"checkpoint {result.out_dir}: {result.parameters:,} parameters, {result.checkpoint_bytes / 1e6:.1f} MB "
        f"of bfloat16 safetensors",
        "timings: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_s.items()),
    ]
    if result.sweep_choice is not None:
        lines.append(f"sampler sweep chose {json.dumps(result.sweep_choice, sort_keys=True)} "
                     "(written to generation_config.json)")
    if result.eval_report is not None:
        lines.append("held-out evaluation:")
        lines.append(result.eval_report.table())
    return "\n".join(lines)
