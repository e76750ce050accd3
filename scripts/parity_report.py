"""Print the largest differences between dgemma and the transformers reference for each tiny test
configuration (float32, CPU): encoder K/V, decoder logits with and without self-conditioning, and a padded
batch against single rows.

    python scripts/parity_report.py        # needs transformers==5.23.0 (the test extra)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_parity as tp  # noqa: E402
from reference import SPECS, build_reference  # noqa: E402

from dgemma.checkpoint.loader import load_model  # noqa: E402
from dgemma.model.attention import AttentionBatch  # noqa: E402
from dgemma.model.kv_cache import KVCache  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'config':8} {'enc K/V':>10} {'logits':>10} {'logits+sc':>10} {'padded':>10}")
    for spec in SPECS:
        ref = build_reference(spec)
        path = tempfile.mkdtemp()
        ref.save_pretrained(path)
        ours, _, _ = load_model(path, dtype="float32")
        with torch.no_grad():
            ids = tp.random_ids(spec, 3 * spec.window + 5, 1)
            ref_cache = tp.reference_prefix(ref, [ids])
            cache, n = tp.our_prefix(ours, [ids])
            kv = 0.0
            for layer in range(len(spec.layer_types)):
                k = ref_cache.layers[layer].keys[0]
                kept = k.shape[1]
                kv = max(kv, (cache.keys[layer][0, n - kept : n].transpose(0, 1) - k).abs().max().item(),
                         (cache.values[layer][0, n - kept : n].transpose(0, 1)
                          - ref_cache.layers[layer].values[0]).abs().max().item())
            chunks = [tp.random_ids(spec, 2 * spec.window + 3, 2), tp.random_ids(spec, spec.canvas, 3)]
            canvas = tp.random_ids(spec, spec.canvas, 4)
            sc = 4 * torch.randn(1, spec.canvas, spec.vocab, generator=torch.Generator().manual_seed(5))
            errs = []
            for use_sc in (False, True):
                r = ref(decoder_input_ids=canvas, past_key_values=tp.reference_prefix(ref, chunks),
                        self_conditioning_logits=sc if use_sc else None).logits
                c, n2 = tp.our_prefix(ours, chunks)
                o = ours.decode(canvas, AttentionBatch.for_decoder([0], [n2], spec.canvas, spec.window, c), c,
                                ours.soft_embedding(sc) if use_sc else None)
                errs.append((o - r).abs().max().item())
            lengths = [3, spec.window + 2, 3 * spec.window + 1]
            prompts = [tp.random_ids(spec, m, 10 + i) for i, m in enumerate(lengths)]
            padded = torch.zeros(3, max(lengths), dtype=torch.long)
            for i, p in enumerate(prompts):
                padded[i, : p.shape[1]] = p[0]
            cache3 = KVCache(ours.config, 3, 256, torch.float32, torch.device("cpu"))
            ours.encode(padded, AttentionBatch.for_encoder([0, 1, 2], [0, 0, 0], lengths, spec.window, cache3), cache3)
            canv = torch.cat([tp.random_ids(spec, spec.canvas, 20 + i) for i in range(3)])
            out = ours.decode(canv, AttentionBatch.for_decoder([0, 1, 2], lengths, spec.canvas, spec.window, cache3), cache3)
            pad_err = max((out[i : i + 1] - ref(decoder_input_ids=canv[i : i + 1],
                                                  past_key_values=tp.reference_prefix(ref, [p])).logits).abs().max().item()
                          for i, p in enumerate(prompts))
        print(f"{spec.name:8} {kv:10.2e} {errs[0]:10.2e} {errs[1]:10.2e} {pad_err:10.2e}")


if __name__ == "__main__":
    main()
