"""`dgemma eval`: score a checkpoint on freshly generated held-out problems, per task family."""

from __future__ import annotations

import argparse
import json
import sys

from dgemma.cli.options import add_model_args, add_sampling_args, dtype_arg, sampling_overrides
from dgemma.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on held-out generated problems (accuracy, tool calls, speed)",
        description="Generate answers to N held-out problems (never produced for training, for any seed) through "
        "the chat template, batched, and report per task family: exact-match accuracy, correct tool calls, "
        "tokens per decoder forward and denoising steps per canvas; then the latency of one 64-token answer and "
        "the issue's quality bar. --sweep instead compares sampler settings and, with --write, stores the best "
        "in the checkpoint's generation_config.json.",
    )
    add_model_args(p)
    p.add_argument("--n", type=int, default=500, help="number of problems")
    p.add_argument("--families", default=None, help="comma-separated families (default: the training mixture)")
    p.add_argument("--rephrase", action="store_true",
                   help="ask each problem in a wording the generator never trains on (arithmetic, sorting, reversing, "
                        "counting, string, list, unit and fact families; dgemma/train/rephrase.py): how answers "
                        "hold up when users phrase questions their own way")
    p.add_argument("--batch-size", type=int, default=64, help="requests generated together")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (e.g. 2 to time a 2-core laptop)")
    p.add_argument("--no-latency", action="store_true", help="skip the single-request 64-token timing")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--failures", type=int, default=0, metavar="K",
                   help="after the table, the first K wrong answers: prompt, expected and generated text "
                        "(the JSON always lists up to max(K, 5))")
    p.add_argument("--sweep", action="store_true", help="compare sampler settings (see dgemma.train.evaluate)")
    p.add_argument("--write", action="store_true", help="with --sweep: write the chosen settings to the checkpoint")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="with --sweep: accuracy a faster setting may lose against the most accurate one")
    add_sampling_args(p)  # its --seed also selects the held-out problems (default 0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dgemma.llm import LLM
    from dgemma.train import evaluate as ev

    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    if args.failures < 0:
        raise ConfigError(f"--failures must be >= 0, got {args.failures}")
    if args.write and not args.sweep:
        raise ConfigError("--write stores the result of --sweep: pass both")
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    llm = LLM(args.model, dtype=dtype_arg(args.dtype), device=args.device, generation_config=args.generation_config,
              quantization=args.quantization)
    seed = args.seed if args.seed is not None else 0
    examples = ev.heldout(seed, args.n, families, rephrase=args.rephrase)
    params = llm.params(**sampling_overrides(args))
    if args.sweep:
        results = ev.sweep(llm, examples, base=params, batch_size=args.batch_size, seed=seed,
                           log=None if args.json else lambda line: print(line, flush=True))
        choice, report = ev.choose_settings(results, args.tolerance)
        if args.write:
            if llm.path is None:
                raise ConfigError("--write needs a checkpoint directory")
            ev.write_generation_settings(llm.path, choice)
        if args.json:
            print(json.dumps({"results": [{"settings": o, **r.to_json()["total"]} for o, r in results],
                              "choice": choice, "written": bool(args.write)}))
        else:
            print(f"chosen: {json.dumps(choice, sort_keys=True)}" + (f" (written to {llm.path})" if args.write else ""))
        return 0
    report = ev.evaluate(llm, examples, params, batch_size=args.batch_size, seed=seed,
                         measure_latency=not args.no_latency, keep_failures=max(args.failures, 5))
    if args.json:
        print(json.dumps({"model": str(llm.path), "rephrase": args.rephrase, **report.to_json()}))
    else:
        print(f"model: {llm.path}" + ("  (questions in unseen wordings: --rephrase)" if args.rephrase else ""))
        print(report.table())
        for f in report.failures[: args.failures]:
            print(f"--- {f['family']}: {f['prompt']!r}\n    expected {f['expected']!r}\n    got      {f['output']!r}")
    sys.stdout.flush()
    return 0
