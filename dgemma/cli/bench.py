"""`dgemma bench`: the engine's own offline benchmark, printed as a table and saved as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import torch

from dgemma.cli.options import add_quantization_arg
from dgemma.errors import ConfigError
from dgemma.model.fp8 import check_quantization


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the engine (step latency, prefill, throughput under concurrency, AR mode)",
        description="Offline benchmark of dgemma itself. With --random-weights --preset 26b-a4b the full-size model is "
        "built with random weights straight on the GPU (no files). Concurrency runs follow vLLM's protocol: random "
        "prompts of --prompt-len tokens, --output-len tokens with EOS ignored, --steps denoising steps per canvas "
        "with adaptive stopping off.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", "-m", default=None, help="checkpoint directory or hub id")
    src.add_argument("--random-weights", action="store_true", help="random weights of --preset, built in memory")
    p.add_argument("--preset", default="26b-a4b", help="preset for --random-weights (tiny, 26b-a4b)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available")
    add_quantization_arg(p)
    p.add_argument("--mode", choices=["diffusion", "ar", "both"], default="both",
                   help="diffusion: block diffusion; ar: token-by-token decoding with the same weights")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="decoder step latency at these batch sizes")
    p.add_argument("--step-prefix", type=int, default=1024, help="cached prefix length for the step latency")
    p.add_argument("--prefill-lens", default="1024,8192,32768", help="encoder prefill latency for these prompt lengths")
    p.add_argument("--concurrency", default="1,4,8,16,32", help="concurrency levels for the throughput runs")
    p.add_argument("--requests-per-level", type=int, default=0,
                   help="requests per concurrency level (default: 2 x concurrency, at least 4)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--no-fuse-canvas-encode", dest="fuse_canvas_encode", action="store_false",
                   help="encode each committed canvas in a forward of its own, not in the next canvas's first "
                        "denoising forward (the engine's default; for an A/B)")
    p.add_argument("--ar-output-len", type=int, default=256, help="tokens decoded in AR mode")
    p.add_argument("--compare-reference", action="store_true",
                   help="also run the transformers reference on the same weights (shared tensors) and print ratios")
    p.add_argument("--reference-output-len", type=int, default=512, help="new tokens for the reference run")
    p.add_argument("--skip", default="", help="comma list of sections to skip: steps,prefill,concurrency,ar")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    from dgemma.bench import measure
    from dgemma.checkpoint.loader import load_model, parse_dtype
    from dgemma.checkpoint.random_init import build_random_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    skip = set(args.skip.split(",")) - {""}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    quantization = check_quantization(args.quantization, device)
    if quantization and args.compare_reference:
        raise ConfigError("--compare-reference runs the transformers reference on the same weight tensors, which "
                          "it cannot read in fp8: run it without --quantization")

    start = time.perf_counter()
    if args.model:
        model, _, _ = load_model(args.model, dtype, device, quantization)
        source = args.model
    else:
        model = build_random_model(args.preset, dtype, device, seed=args.seed, quantization=quantization)
        source = f"random weights, preset {args.preset}"
    model.prepare_inference()  # as dgemma.llm.LLM runs it
    log(f"model ready in {time.perf_counter() - start:.1f} s ({source})")
    cfg = model.config
    res: dict = {
        "date": date.today().isoformat(), "command": "dgemma " + " ".join(sys.argv[1:]),
        "model": source, "dtype": str(dtype).replace("torch.", ""), "quantization": quantization or "none",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "fuse_canvas_encode": args.fuse_canvas_encode,
    }
    bw = measure.copy_bandwidth_gbps(device)
    wbytes = measure.weight_bytes(model)
    res.update(copy_bandwidth_gbps=bw, weight_gb=wbytes / 1e9, step_floor_ms=wbytes / (bw * 1e9) * 1e3)
    log(f"copy bandwidth {bw:.0f} GB/s, weights {wbytes / 1e9:.2f} GB, per-step floor {res['step_floor_ms']:.2f} ms")

    if args.mode in ("diffusion", "both") and "steps" not in skip:
        res["decoder_step_ms"] = {}
        for b in ints(args.batch_sizes):
            res["decoder_step_ms"][b] = measure.decoder_step_ms(model, b, args.step_prefix)
            log(f"decoder step, batch {b}: {res['decoder_step_ms'][b]:.2f} ms")
            if measure.use_cuda_graphs(model):  # fixed steps, as the engine queues them (16: the protocol's canvas)
                res.setdefault("decoder_step_queued_ms", {})[b] = measure.decoder_step_ms(
                    model, b, args.step_prefix, queued=16)
                log(f"decoder step, batch {b}, 16 queued: {res['decoder_step_queued_ms'][b]:.2f} ms each")
        res["decoder_forward_ms_b1"] = measure.decoder_step_ms(model, 1, args.step_prefix, forward_only=True)
    if "prefill" not in skip:
        res["prefill_ms"] = {}
        for n in ints(args.prefill_lens):
            if n + cfg.canvas_length > cfg.max_position_embeddings:
                continue
            res["prefill_ms"][n] = measure.prefill_ms(model, n)
            log(f"prefill {n} tokens: {res['prefill_ms'][n]:.1f} ms")
    if args.mode in ("diffusion", "both") and "concurrency" not in skip:
        res["concurrency"] = []
        for c in ints(args.concurrency):
            n = args.requests_per_level or max(4, 2 * c)
            r = measure.run_concurrency(model, c, n, args.prompt_len, args.output_len, args.steps, seed=args.seed,
                                        fuse_canvas_encode=args.fuse_canvas_encode)
            res["concurrency"].append(vars(r))
            log(f"concurrency {c}: {r.output_tok_s:.1f} tok/s, decode {r.decode_tok_s:.1f} tok/s, "
                f"TTFC p50 {r.ttfc_ms_p50:.0f} ms, latency p50 {r.latency_ms_p50:.0f} / p99 {r.latency_ms_p99:.0f} ms")
    if args.mode in ("ar", "both") and "ar" not in skip:
        ar = measure.ar_decode(model, args.prompt_len, args.ar_output_len, args.seed)
        res["ar"] = {"prompt_len": args.prompt_len, "output_tokens": len(ar.token_ids), "tok_s": ar.tokens_per_s,
                     "ms_per_token": ar.decode_ms / max(1, len(ar.token_ids)), "prefill_ms": ar.prefill_ms}
        log(f"AR batch 1: {ar.tokens_per_s:.1f} tok/s ({res['ar']['ms_per_token']:.2f} ms/token)")
    if args.compare_reference:
        from dgemma.bench.reference import reference_sharing_weights

        reference = reference_sharing_weights(model)
        ref = {"decoder_forward_ms_b1": measure.reference_decoder_step_ms(reference, args.step_prefix, cfg.vocab_size)}
        ref.update(measure.reference_generate_tok_s(reference, args.prompt_len, args.reference_output_len, args.steps,
                                                    cfg.vocab_size, args.seed))
        ours = measure.run_concurrency(model, 1, 1, args.prompt_len, args.reference_output_len, args.steps, args.seed,
                                       fuse_canvas_encode=args.fuse_canvas_encode)
        ref["dgemma_output_tok_s_same_protocol"] = ours.output_tok_s
        ref["speedup_end_to_end"] = ours.output_tok_s / ref["output_tok_s"]
        if "decoder_forward_ms_b1" in res:
            ref["speedup_decoder_forward"] = ref["decoder_forward_ms_b1"] / res["decoder_forward_ms_b1"]
        res["reference"] = ref
        del reference
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print_table(res)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
    return 0


def print_table(res: dict) -> None:
    out = sys.stdout
    experts = f" | experts {res['quantization']}" if res.get("quantization", "none") != "none" else ""
    out.write(f"\ndgemma bench | {res['device']} | {res['model']} | {res['dtype']}{experts} | torch {res['torch']}\n")
    out.write(f"copy bandwidth {res['copy_bandwidth_gbps']:.0f} GB/s | weights {res['weight_gb']:.2f} GB | "
              f"step floor {res['step_floor_ms']:.2f} ms\n")
    if "decoder_step_ms" in res:
        out.write("decoder step (ms):   " + "  ".join(f"b{b}={v:.2f}" for b, v in res["decoder_step_ms"].items())
                  + f"  | forward only b1={res['decoder_forward_ms_b1']:.2f}"
                  + f"  | b1 / floor = {res['decoder_step_ms'].get(1, float('nan')) / res['step_floor_ms']:.2f}x\n")
    if "decoder_step_queued_ms" in res:
        queued = res["decoder_step_queued_ms"]
        out.write("  16 queued (ms):    " + "  ".join(f"b{b}={v:.2f}" for b, v in queued.items())
                  + f"  | b1 / floor = {queued.get(1, float('nan')) / res['step_floor_ms']:.2f}x\n")
    if res.get("prefill_ms"):
        out.write("prefill (ms):        " + "  ".join(f"{n}={v:.1f}" for n, v in res["prefill_ms"].items()) + "\n")
    if res.get("concurrency"):
        out.write(f"{'conc':>5} {'reqs':>5} {'out tok/s':>10} {'decode tok/s':>13} {'TTFC p50':>9} {'TTFC p99':>9} "
                  f"{'lat p50':>9} {'lat p99':>9} {'batch':>6}\n")
        for r in res["concurrency"]:
            out.write(f"{r['concurrency']:>5} {r['requests']:>5} {r['output_tok_s']:>10.1f} {r['decode_tok_s']:>13.1f} "
                      f"{r['ttfc_ms_p50']:>9.0f} {r['ttfc_ms_p99']:>9.0f} {r['latency_ms_p50']:>9.0f} "
                      f"{r['latency_ms_p99']:>9.0f} {r['mean_decode_batch']:>6.1f}\n")
    if "ar" in res:
        out.write(f"AR mode, batch 1:    {res['ar']['tok_s']:.1f} tok/s ({res['ar']['ms_per_token']:.2f} ms/token)\n")
    if "reference" in res:
        ref = res["reference"]
        out.write(f"reference (transformers, same weights): {ref['output_tok_s']:.1f} tok/s end to end, decoder forward "
                  f"{ref['decoder_forward_ms_b1']:.1f} ms | dgemma {ref['dgemma_output_tok_s_same_protocol']:.1f} tok/s "
                  f"= {ref['speedup_end_to_end']:.2f}x\n")
    if "peak_memory_gb" in res:
        out.write(f"peak GPU memory {res['peak_memory_gb']:.1f} GB\n")
    out.flush()
