"""The fused sampler with the vocabulary split over several programs per position, against one program per
position, on the real vocabulary (docs/benchmarks.md, issue 4). Each variant timed inside a CUDA graph.

    python scripts/sampler_ab.py   # needs a CUDA GPU

Prints one line per number of positions (256 = one canvas, 2048 = eight): microseconds per call for each split and
block size, and the floor (reading the bf16 logits and writing the probabilities back, at 3.0 TB/s).
"""

import torch

from dgemma.bench.measure import graph_us
from dgemma.kernels.fused_sampler import fused_sample, vocab_splits


def main() -> None:
    print(torch.cuda.get_device_name(), flush=True)
    v = 262144
    for canvases in (1, 8):
        n = canvases * 256
        logits = (torch.randn(canvases, 256, v, device="cuda") * 8).to(torch.bfloat16)
        temp = torch.full((canvases,), 0.6, device="cuda")
        seeds = torch.arange(canvases, device="cuda")
        greedy = torch.zeros(canvases, dtype=torch.int32, device="cuda")
        floor = 2 * logits.numel() * 2 / 3.0e12 * 1e6
        line = [f"{n} positions: floor {floor:.0f} us, auto = {vocab_splits(n, v, 2048)} splits"]
        for block in (1024, 2048, 4096):
            for splits in (1, 2, 4, 8, 16):
                t = graph_us(lambda: fused_sample(logits, temp, seeds, greedy, 30.0, block=block, splits=splits))
                line.append(f"b{block}/s{splits} {t:.0f}")
        print(", ".join(line), flush=True)
        del logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
