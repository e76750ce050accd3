"""cache_attention on sliding rings, off then on, in one process on the same weights (docs/benchmarks.md).

    python scripts/cache_attention_ab.py [preset]      # default 26b-a4b (a GPU); "tiny" runs on a CPU

Prints, for each setting: the denoising step at batch 1 and 8 over a 1024-token prefix (full layout) and over a
4 x sliding-window prefix (sliding layers keep a ring of W - 1 + 2048 slots), the 1024-token prefill and AR tok/s.
"""

import sys
import time

import torch

import dgemma.model.attention as attention
from dgemma.bench.measure import decoder_step_ms, prefill_ms, random_prompts
from dgemma.checkpoint.random_init import build_random_model
from dgemma.engine.autoregressive import generate_ar


def main() -> None:
    t0 = time.time()
    cuda = torch.cuda.is_available()
    model = build_random_model(sys.argv[1] if len(sys.argv) > 1 else "26b-a4b", "bfloat16" if cuda else "float32",
                               "cuda" if cuda else "cpu")
    model.pack_projections()
    long_prefix = 4 * model.config.sliding_window
    print(torch.cuda.get_device_name() if cuda else "cpu", f"built in {time.time() - t0:.0f} s", flush=True)
    prompt = random_prompts(1, 1024, model.config.vocab_size, 0)
    default = attention.CACHE_ATTENTION_MIN_TOKENS
    for on in (False, True):
        attention.CACHE_ATTENTION_MIN_TOKENS = default if on else 1 << 30
        row = {"cache_attention on rings": on,
               "b1": decoder_step_ms(model, 1, 1024), "b8": decoder_step_ms(model, 8, 1024),
               f"b1 ring {long_prefix}": decoder_step_ms(model, 1, long_prefix, chunk=2048),
               f"b8 ring {long_prefix}": decoder_step_ms(model, 8, long_prefix, chunk=2048),
               "prefill1024": prefill_ms(model, 1024)}
        generate_ar(model, prompt, 8, ignore_eos=True)
        row["ar_tok_s"] = generate_ar(model, prompt, 128, ignore_eos=True)[0].tokens_per_s
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    attention.CACHE_ATTENTION_MIN_TOKENS = default


if __name__ == "__main__":
    main()
