"""Per-request generation knobs, with defaults from the checkpoint's generation_config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from dgemma.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    max_denoising_steps: int = 48  # N: steps per canvas at most
    entropy_bound: float = 0.1  # accept the lowest-entropy positions while sum(H) - max(H) <= bound
    t_min: float = 0.4  # temperature at the last step
    t_max: float = 0.8  # temperature at the first step
    stability_threshold: int = 1  # argmax unchanged for this many steps ...
    confidence_threshold: float = 0.005  # ... and mean entropy below this: the canvas stops early
    adaptive_stopping: bool = True  # False: always run max_denoising_steps (benchmarks on random weights)
    # Multiplies the temperature schedule. 0 means greedy: the argmax is accepted instead of a sample (the
    # entropies that decide acceptance still use the unscaled schedule, else every position would be accepted).
    temperature: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default=())  # stop strings, applied to the text of committed canvases

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def integer(name, low):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RequestError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name, low, inclusive=True):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
            if value < low or (not inclusive and value == low):
                raise RequestError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")

        integer("max_new_tokens", 1)
        integer("max_denoising_steps", 1)
        integer("stability_threshold", 0)
        number("entropy_bound", 0.0, inclusive=False)
        number("t_min", 0.0, inclusive=False)
        number("t_max", 0.0, inclusive=False)
        number("confidence_threshold", 0.0, inclusive=False)
        number("temperature", 0.0)
        if self.t_max < self.t_min:
            raise RequestError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    def temperature_at(self, remaining: int) -> float:
        """Linear schedule over the steps remaining (N at the first step, 1 at the last)."""
        return self.t_min + (self.t_max - self.t_min) * remaining / self.max_denoising_steps

    def with_overrides(self, **overrides) -> "SamplingParams":
        """A copy with the given knobs replaced; None values keep the current setting."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise RequestError(f"unknown generation parameter(s): {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_generation_config(cls, data: dict | None) -> "SamplingParams":
        """Defaults from a checkpoint's generation_config.json (missing or null entries keep ours)."""
        data = data or {}
        values = {}
        for key in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                    "confidence_threshold"):
            if data.get(key) is not None:
                values[key] = data[key]
        sampler = data.get("sampler_config") or {}
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler["entropy_bound"]
        eos = data.get("eos_token_id")
        if eos is not None:
            values["eos_token_ids"] = tuple([eos] if isinstance(eos, int) else eos)
        try:
            return cls(**values)
        except RequestError as exc:
            raise RequestError(f"generation_config.json: {exc}") from None
