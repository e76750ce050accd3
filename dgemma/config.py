"""The model's architecture, read from (and written to) a Hugging Face `config.json`.

`ModelConfig` is the text model only: the vision tower of a checkpoint is recognised and skipped by the loader.
Every field is validated with an error that names it, because a wrong config otherwise surfaces much later as
a shape mismatch deep inside a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dgemma.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class AttentionSpec:
    """The attention shape of one layer type (sliding layers and full layers differ)."""

    head_dim: int
    num_kv_heads: int
    rope_theta: float
    # Fraction of the head's frequency pairs that rotate; the rest have frequency 0 ("proportional" RoPE).
    partial_rotary_factor: float = 1.0
    # Full layers have no v_proj: the values are the raw key projection.
    has_v_proj: bool = True


@dataclass
class ModelConfig:
    """Architecture of a DiffusionGemma text model (encoder and decoder share it)."""

    vocab_size: int
    hidden_size: int  # H
    intermediate_size: int  # F: dense MLP and self-conditioning MLP width
    moe_intermediate_size: int  # I: width of one expert
    num_experts: int  # E
    top_k_experts: int  # K
    num_attention_heads: int  # query heads, on every layer
    layer_types: list[str]  # SLIDING or FULL, one per layer
    sliding: AttentionSpec
    full: AttentionSpec
    sliding_window: int  # W: a sliding-layer query sees keys j with i - W < j <= i
    canvas_length: int = 256  # C: tokens denoised together
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    # Raw config.json (vision part included), kept so a checkpoint can be written back unchanged.
    raw: dict | None = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def attention(self, layer: int) -> AttentionSpec:
        return self.sliding if self.layer_types[layer] == SLIDING else self.full

    def validate(self) -> "ModelConfig":
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
            "top_k_experts", "num_attention_heads", "sliding_window", "canvas_length", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError(
                f"config field 'top_k_experts' ({self.top_k_experts}) exceeds 'num_experts' ({self.num_experts})"
            )
        if not self.layer_types:
            raise ConfigError("config field 'layer_types' is empty: the model needs at least one layer")
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise ConfigError(f"config field 'layer_types[{i}]' must be {SLIDING!r} or {FULL!r}, got {kind!r}")
        for kind, spec in (("sliding", self.sliding), ("full", self.full)):
            for name in ("head_dim", "num_kv_heads"):
                value = getattr(spec, name)
                if not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"{kind} layers: {name!r} must be a positive integer, got {value!r}")
            if spec.head_dim % 2:
                raise ConfigError(f"{kind} layers: 'head_dim' must be even for RoPE, got {spec.head_dim}")
            if self.num_attention_heads % spec.num_kv_heads:
                raise ConfigError(
                    f"{kind} layers: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                    f"num_key_value_heads ({spec.num_kv_heads})"
                )
            if not (spec.rope_theta > 0 and math.isfinite(spec.rope_theta)):
                raise ConfigError(f"{kind} layers: 'rope_theta' must be a positive number, got {spec.rope_theta!r}")
            if not 0.0 < spec.partial_rotary_factor <= 1.0:
                raise ConfigError(
                    f"{kind} layers: 'partial_rotary_factor' must be in (0, 1], got {spec.partial_rotary_factor!r}"
                )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ConfigError(
                f"config field 'final_logit_softcapping' must be > 0 or null, got {self.final_logit_softcapping!r}"
            )
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(
                f"config field 'hidden_activation' must be 'gelu_pytorch_tanh', got {self.hidden_activation!r}"
            )
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field {name!r} = {value} is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_id:
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field 'eos_token_id' has {value}, outside the vocabulary [0, {self.vocab_size})")
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Hugging Face config.json <-> ModelConfig

    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        """Read a DiffusionGemma `config.json` (the top level, with `text_config` nested)."""
        model_type = data.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(f"{source}: model_type is {model_type!r}; dgemma loads 'diffusion_gemma' checkpoints")
        architectures = data.get("architectures") or ["DiffusionGemmaForBlockDiffusion"]
        if "DiffusionGemmaForBlockDiffusion" not in architectures:
            raise ConfigError(
                f"{source}: architectures {architectures} do not include 'DiffusionGemmaForBlockDiffusion'"
            )
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: 'text_config' is missing or not an object")

        def need(key):
            if key not in text or text[key] is None:
                raise ConfigError(f"{source}: text_config.{key} is missing")
            return text[key]

        num_layers = need("num_hidden_layers")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ConfigError(f"{source}: text_config.num_hidden_layers must be a positive integer, got {num_layers!r}")
        layer_types = text.get("layer_types") or [
            FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)
        ]
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"{source}: text_config.layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                f"{source}: use_bidirectional_attention='all' (a non-causal encoder) is not supported; "
                "DiffusionGemma checkpoints use 'vision' or null"
            )
        if text.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (DiffusionGemma has no biases)")

        # Full layers override head_dim / num_key_value_heads through per_layer_config (keyed by layer index);
        # older dumps use global_head_dim / num_global_key_value_heads instead.
        per_layer = text.get("per_layer_config") or {}
        head_dim = need("head_dim")
        num_kv = need("num_key_value_heads")
        overrides_by_type: dict[str, dict] = {SLIDING: {}, FULL: {}}
        for key, override in per_layer.items():
            try:
                index = int(key)
            except ValueError as exc:
                raise ConfigError(f"{source}: per_layer_config key {key!r} is not a layer index") from exc
            if not 0 <= index < num_layers:
                raise ConfigError(f"{source}: per_layer_config key {key!r} is outside the {num_layers} layers")
            kind = layer_types[index]
            previous = overrides_by_type[kind]
            if previous and previous != override:
                raise ConfigError(
                    f"{source}: per_layer_config gives {kind} layers different shapes ({previous} vs {override}); "
                    "dgemma needs one shape per layer type"
                )
            overrides_by_type[kind] = dict(override)
        full_over = overrides_by_type[FULL]
        if not full_over and "global_head_dim" in text:
            full_over = {"head_dim": text["global_head_dim"]}
            if text.get("num_global_key_value_heads") is not None:
                full_over["num_key_value_heads"] = text["num_global_key_value_heads"]

        rope = text.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }

        def spec(kind: str, over: dict, has_v_proj: bool) -> AttentionSpec:
            params = rope.get(kind)
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: text_config.rope_parameters.{kind} is missing")
            rope_type = params.get("rope_type", "default")
            if rope_type not in ("default", "proportional"):
                raise ConfigError(
                    f"{source}: rope_parameters.{kind}.rope_type {rope_type!r} is not supported "
                    "(expected 'default' or 'proportional')"
                )
            if params.get("factor", 1.0) != 1.0:
                raise ConfigError(f"{source}: rope_parameters.{kind}.factor != 1 is not supported")
            partial = params.get("partial_rotary_factor", 1.0)
            if rope_type == "default" and partial != 1.0:
                raise ConfigError(f"{source}: default RoPE with partial_rotary_factor={partial} is not supported")
            return AttentionSpec(
                head_dim=over.get("head_dim", head_dim),
                num_kv_heads=over.get("num_key_value_heads", num_kv),
                rope_theta=float(need_rope(params, kind)),
                partial_rotary_factor=float(partial),
                has_v_proj=has_v_proj,
            )

        def need_rope(params, kind):
            if "rope_theta" not in params:
                raise ConfigError(f"{source}: rope_parameters.{kind}.rope_theta is missing")
            return params["rope_theta"]

        eos = text.get("eos_token_id", 1)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        config = cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_experts=need("num_experts"),
            top_k_experts=need("top_k_experts"),
            num_attention_heads=need("num_attention_heads"),
            layer_types=list(layer_types),
            sliding=spec(SLIDING, overrides_by_type[SLIDING], has_v_proj=True),
            full=spec(FULL, full_over, has_v_proj=False),
            sliding_window=need("sliding_window"),
            canvas_length=data.get("canvas_length") or 256,
            max_position_embeddings=text.get("max_position_embeddings", 262144),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
            pad_token_id=text.get("pad_token_id", 0) if text.get("pad_token_id") is not None else 0,
            bos_token_id=text.get("bos_token_id", 2) if text.get("bos_token_id") is not None else 2,
            eos_token_id=eos,
            raw=data,
        )
        try:
            return config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict:
        """The `config.json` that the Hugging Face reference (and dgemma) loads."""
        per_layer = {
            str(i): {"head_dim": self.full.head_dim, "num_key_value_heads": self.full.num_kv_heads}
            for i, kind in enumerate(self.layer_types)
            if kind == FULL
        }
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.sliding.num_kv_heads,
            "head_dim": self.sliding.head_dim,
            "per_layer_config": per_layer,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.sliding.rope_theta},
                FULL: {
                    "rope_type": "proportional",
                    "partial_rotary_factor": self.full.partial_rotary_factor,
                    "rope_theta": self.full.rope_theta,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "hidden_activation": self.hidden_activation,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": "vision",
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
        }
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "text_config": text,
            "vision_config": {
                "model_type": "gemma4_vision",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 8,
            },
            "boi_token_id": 255999,
            "eoi_token_id": 258882,
            "image_token_id": 258880,
            "tie_word_embeddings": True,
            "dtype": "bfloat16",
        }
