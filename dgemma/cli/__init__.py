"""`dgemma` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dgemma import __version__
from dgemma.errors import DgemmaError

# Subcommand name -> module under dgemma.cli (imported lazily so `dgemma --help` stays fast).
COMMANDS = {
    "generate": "generate",
    "init-random": "init_random",
    "serve": "serve",
    "bench": "bench",
    "train": "train",
    "eval": "eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgemma",
        description="Run DiffusionGemma block-diffusion language models: generate, serve (OpenAI API), "
        "benchmark, train and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"dgemma {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"dgemma.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dgemma.cli.{module_name}":
                continue  # subcommand not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except DgemmaError as exc:
        print(f"dgemma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dgemma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
