"""Examples per second one process generates, renders and tokenizes for `dgemma train` (the shipped mixture),
with the packaged chat template in a plain Jinja environment (what dgemma does) and in the sandbox.

    python scripts/corpus_speed.py [--examples 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jinja2.sandbox

from dgemma.chat_format import default_chat_template
from dgemma.checkpoint.tokenizer_builder import build_tokenizer, write_tokenizer_files
from dgemma.tokenizer import Tokenizer
from dgemma.train.dataset import tokenize_examples, tokenizer_corpus
from dgemma.train.tasks import generate_examples

MIXTURE = {"mul": 3.0, "add": 1.5, "sub": 1.5, "sort": 2.0, "string_ops": 1.5, "reverse": 1.5, "tool_call": 1.5,
           "long": 1.5}  # scripts/train_shipped.sh's


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    directory = tempfile.mkdtemp()
    write_tokenizer_files(directory, build_tokenizer(tokenizer_corpus(7777, 5000), 1024), model_max_length=2048)
    tokenizer = Tokenizer.from_dir(directory)
    plain = tokenizer._template
    env = plain.environment
    sandbox = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=list(env.extensions))
    sandbox.filters["tojson"] = env.filters["tojson"]
    sandbox.globals.update(env.globals)
    variants = {"sandboxed": sandbox.from_string(default_chat_template()), "plain (dgemma)": plain}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, template in variants.items():
            tokenizer._template = template
            start = time.perf_counter()
            tokenize_examples(tokenizer, generate_examples(repeat, args.examples, None, MIXTURE), 512)
            rates[name].append(args.examples / (time.perf_counter() - start))
    for name, values in rates.items():
        print(f"{name:15s} {sum(values) / len(values):7.0f} examples/s (runs: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
