"""Command-line options shared by several subcommands (model loading, diffusion knobs)."""

from __future__ import annotations

import argparse




def add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = ("checkpoint directory or Hugging Face hub id (default: the small model shipped with dgemma)")
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--model", "-m", default=None, help=help_text)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weight and activation dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--generation-config", default=None, metavar="FILE",
                        help="generation_config.json to use for defaults instead of the checkpoint's")
    add_quantization_arg(parser)


def add_quantization_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none",
                        help="fp8: store the routed experts' weights in float8 (e4m3, a scale per row) as they load: "
                             "about half the weight bytes of a full-size model; attention, dense MLP and LM head "
                             "keep --dtype (default: none)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diffusion sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    g.add_argument("--max-denoising-steps", type=int, default=None, help="denoising steps per canvas at most (N)")
    g.add_argument("--entropy-bound", type=float, default=None,
                   help="Entropy Bound sampler: accept lowest-entropy positions while sum(H)-max(H) <= bound")
    g.add_argument("--t-min", type=float, default=None, help="temperature at the last denoising step")
    g.add_argument("--t-max", type=float, default=None, help="temperature at the first denoising step")
    g.add_argument("--stability-threshold", type=int, default=None,
                   help="adaptive stop: argmax unchanged for this many steps ...")
    g.add_argument("--confidence-threshold", type=float, default=None,
                   help="... and mean entropy below this")
    g.add_argument("--no-adaptive-stopping", action="store_true",
                   help="always run max-denoising-steps per canvas (fixed-step benchmarks)")
    g.add_argument("--temperature", type=float, default=None,
                   help="multiplies the temperature schedule; 0 = greedy (argmax instead of sampling)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    overrides = {
        name: getattr(args, name, None)
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold", "temperature", "seed")
    }
    if getattr(args, "no_adaptive_stopping", False):
        overrides["adaptive_stopping"] = False
    if getattr(args, "ignore_eos", False):
        overrides["ignore_eos"] = True
    if getattr(args, "stop", None):
        overrides["stop"] = tuple(args.stop)
    return {k: v for k, v in overrides.items() if v is not None}


def dtype_arg(value: str) -> str | None:
    return None if value == "auto" else value


