"""Engine switches (module constants) set variant by variant in one process on the same random weights, each
measured as `dgemma bench` measures: the graphed denoising step at each batch size, and AR tok/s (1024-token
prompt, 128 tokens or --ar-tokens, greedy). The first variant is the baseline; every variant starts from the defaults.

    python scripts/flags_ab.py [--preset 26b-a4b] [--rounds 2] [--batches 1,8] \\
        --variant "default:" \\
        --variant "no_pdl:dgemma.kernels.launch.PDL=False" \\
        --variant "no_gemv:dgemma.model.layers.GEMV_MAX_ROWS=0,dgemma.kernels.launch.PDL=False"   # needs a CUDA GPU

A variant is `NAME:MODULE.CONSTANT=VALUE,...` (VALUE a Python literal: a dict's keys are quoted, so its commas do not
split settings); graphs are captured afresh for each measurement, so every switch read at capture time takes effect.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re

import torch

from dgemma.bench.measure import ar_decode, decoder_step_ms
from dgemma.checkpoint.random_init import build_random_model


def parse_variant(text: str) -> tuple[str, list[tuple[object, str, object]]]:
    """'NAME:mod.CONST=1,mod.OTHER=True' -> (NAME, [(module, CONST, value), ...]); a clear error for anything else."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:MODULE.CONSTANT=VALUE,... (the body may be empty)")
    settings = []
    # Split at commas that start a new MODULE.CONSTANT=, so a value may be a dict or tuple literal with commas.
    for item in filter(None, re.split(r",(?=\s*[\w.]+\s*=)", body)):
        target, eq, value = item.partition("=")
        module_name, dot, const = target.strip().rpartition(".")
        if not (eq and dot):
            raise SystemExit(f"--variant {text!r}: {item!r} is not MODULE.CONSTANT=VALUE")
        module = importlib.import_module(module_name)
        if not hasattr(module, const):
            raise SystemExit(f"--variant {text!r}: {module_name} has no {const}")
        settings.append((module, const, ast.literal_eval(value.strip())))
    return name, settings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8", help="denoising step batch sizes ('': AR only)")
    p.add_argument("--ar-tokens", type=int, default=128, help="tokens of the AR request (1024-token prompt)")
    p.add_argument("--variant", action="append", required=True, help="NAME:MODULE.CONSTANT=VALUE,...")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    model = build_random_model(args.preset, "bfloat16", "cuda")
    model.prepare_inference()
    print(torch.cuda.get_device_name(), flush=True)
    defaults = {(m, c): getattr(m, c) for _, settings in variants for m, c, _ in settings}
    width = max(len(name) for name, _ in variants)
    for r in range(args.rounds):
        for name, settings in variants:
            for (module, const), value in defaults.items():
                setattr(module, const, value)
            for module, const, value in settings:
                setattr(module, const, value)
            try:
                steps = ", ".join(f"b{b} {decoder_step_ms(model, int(b), 1024):.2f}"
                                  for b in args.batches.split(",") if b)
                ar = ar_decode(model, 1024, args.ar_tokens)
            except Exception as exc:  # noqa: BLE001 - one variant's failure (a tile that does not compile, say)
                # must not cost the others' figures on a scarce machine; a broken CUDA context fails them all anyway
                print(f"round {r}, {name:{width}s}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch.cuda.empty_cache()
                continue
            print(f"round {r}, {name:{width}s}: step ms {steps} | AR "
                  f"{ar.tokens_per_s:.1f} tok/s ({ar.decode_ms / len(ar.token_ids):.2f} ms/token)", flush=True)
    for (module, const), value in defaults.items():
        setattr(module, const, value)


if __name__ == "__main__":
    main()
