"""`dgemma init-random`: write a random-weight checkpoint in the released on-disk format."""

from __future__ import annotations

import argparse
import sys

from dgemma.checkpoint.random_init import PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "init-random",
        help="write a random-weight checkpoint (tests, benchmarks)",
        description="Write a checkpoint with random weights in exactly the Hugging Face layout of "
        "google/diffusiongemma-26B-A4B-it (config.json, generation_config.json, safetensors shards with an index, "
        "tokenizer.json, tokenizer_config.json, chat_template.jinja). The directory must not exist or be empty.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny: a 6-layer toy; 26b-a4b: the released shapes (51.6 GB in bfloat16)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="stored dtype (default: float32 for tiny, bfloat16 for 26b-a4b)")
    p.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is much faster for 26b-a4b)")
    p.add_argument("--embed-std", type=float, default=None,
                   help="std of the embedding (the LM head); larger gives more confident random models")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size in GB")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dgemma.checkpoint.random_init import InitScale, write_random_checkpoint

    dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
    scale = InitScale(embed_std=args.embed_std if args.embed_std is not None else (1.0 if args.preset == "tiny" else 0.02),
                      perturb=0.1 if args.preset == "tiny" else 0.0)
    out = write_random_checkpoint(args.out, args.preset, seed=args.seed, dtype=dtype, device=args.device, scale=scale,
                                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {args.preset} random checkpoint ({dtype}) to {out}", file=sys.stderr)
    return 0
