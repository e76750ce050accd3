"""Write the full-size random checkpoint to disk, then load it on the GPU and report time and memory.

    python scripts/load_full_size.py DIR        # needs ~51 GB of disk and a GPU with ~55 GB free
"""

from __future__ import annotations

import sys
import time

import torch

from dgemma.checkpoint.loader import load_model
from dgemma.checkpoint.random_init import write_random_checkpoint


def main() -> None:
    out = sys.argv[1]
    start = time.perf_counter()
    write_random_checkpoint(out, "26b-a4b", dtype="bfloat16", device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    model, _, report = load_model(out, dtype="bfloat16", device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"loaded {report.tensors_loaded} tensors ({report.weight_bytes / 1e9:.2f} GB of weights) in {seconds:.1f} s; "
          f"GPU memory allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB, peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
