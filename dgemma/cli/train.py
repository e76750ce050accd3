"""`dgemma train`: train a DiffusionGemma-architecture checkpoint with the block-diffusion objective."""

from __future__ import annotations

import argparse
import json
import sys

from dgemma.errors import ConfigError
from dgemma.train.optim import OPTIMIZERS

CUDA_HOST_THREADS = 4  # torch's CPU threads when training on a GPU (unless --threads says otherwise)


def add_parser(sub) -> None:
    from dgemma.checkpoint.tokenizer_builder import TOKENIZER_KINDS
    from dgemma.train.trainer import COMPILE_SCOPES, MODEL_PRESETS, TrainConfig

    d = TrainConfig(out_dir="")
    p = sub.add_parser(
        "train",
        help="train a DiffusionGemma model on generated tasks (block diffusion), CPU or CUDA",
        description="Block-diffusion supervised training: an autoregressive loss on the causal encoder plus a "
        "denoising loss on one uniformly corrupted, canvas-aligned block of each response, with two-pass "
        "self-conditioning. Data comes from dgemma's task generators (arithmetic, lists, text, tools, thinking, "
        "long answers). Stops after --max-steps or --time-budget-min, saves a resumable state every few minutes "
        "(OUT.train.pt; rerun the same command to resume), and exports OUT in the Hugging Face layout (bfloat16).",
    )
    p.add_argument("--out", required=True, help="output checkpoint directory (must be new or empty, see --overwrite)")
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=MODEL_PRESETS, default=d.preset,
                   help="architecture of a new model: mini (the shipped ~12M model), micro (a toy for smoke tests)")
    g.add_argument("--architecture", default=None, metavar="JSON",
                   help='change fields of the preset, e.g. \'{"layer_types": "SSFSSFSSFSSF", "hidden_size": 224, '
                        '"sliding_window": 64, "sliding": {"head_dim": 56}}\' (layer_types: S sliding, F full)')
    g.add_argument("--init-from", default=None, metavar="DIR", help="fine-tune this checkpoint instead")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary of a new tokenizer")
    g.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default=d.tokenizer,
                   help="a new tokenizer's pieces: bpe (merged words) or letters (every ASCII letter its own token, "
                        "so spelling tasks copy tokens; sequences about 2x longer)")
    g.add_argument("--train-examples", type=int, default=d.train_examples,
                   help="examples generated up front (repeated in epochs if training outlasts them)")
    g.add_argument("--families", default=None, help="comma-separated task families (default: all)")
    g.add_argument("--family-weights", default=None, metavar="JSON",
                   help='mixture weights, e.g. \'{"mul": 3, "long": 2}\' (others keep their default)')
    g.add_argument("--max-length", type=int, default=d.max_length, help="drop longer examples (tokens)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="data generation processes (0: one per CPU but one, <= 16)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    g.add_argument("--max-batch-tokens", type=int, default=None,
                   help="fewer examples in a step where rows x longest row would exceed this (bounds memory)")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--time-budget-min", type=float, default=None,
                   help="wall-clock minutes of training (the schedule decays over it); export and eval come after")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=d.optimizer,
                   help="muon: orthogonalised momentum for the hidden matrices, AdamW for the rest (same lr)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--ar-loss-weight", type=float, default=d.objective.ar_loss_weight,
                   help="weight of the encoder's autoregressive loss")
    g.add_argument("--self-cond-prob", type=float, default=d.objective.self_cond_prob)
    g.add_argument("--filler-weight", type=float, default=d.objective.filler_weight,
                   help="weight of the <pad> filler after an answer in the denoising loss (answer tokens: 1)")
    g.add_argument("--noise-samples", type=int, default=d.objective.noise_samples,
                   help="noisy copies of each example's block the decoder denoises (one encoder pass for all)")
    g.add_argument("--weight-by-t", action="store_true", help="weight the denoising loss by 1/t (ELBO)")
    g.add_argument("--qk-norm-init", choices=["unit", "ones"], default=d.qk_norm_init,
                   help="start q/k norm weights at head_dim^-1/4 (unit-variance attention logits) or at 1")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; at most 4 when training on a GPU)")
    g.add_argument("--compile", nargs="?", const="objective", default="off", choices=COMPILE_SCOPES,
                   help="torch.compile in training, forward and backward: 'objective' (the default of a bare "
                        "--compile: ~1.6x faster steps on an H100, but its first compile took over 6 min on a GPU "
                        "host) or 'layers' (each layer's feed-forward half, one short compile for all layers); "
                        "see docs/benchmarks.md")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the CUDA training step eagerly instead of replaying one captured graph per batch shape")
    g.add_argument("--profile-at", type=int, default=None, metavar="STEP",
                   help="profile 5 steps of the real loop from STEP (torch.profiler tables in the log)")
    g.add_argument("--moe-impl", choices=["auto", "dense", "model"], default=d.moe_impl,
                   help="dense: all experts in batched matmuls (no host sync; default on CUDA and with --compile)")
    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation losses (0: end)")
    g.add_argument("--checkpoint-every-min", type=float, default=d.checkpoint_every_min)
    g.add_argument("--no-resume", action="store_true", help="ignore OUT.train.pt and start over")
    g.add_argument("--keep-state", action="store_true",
                   help="keep OUT.train.pt after a finished run (by default only interrupted runs keep it)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    g.add_argument("--max-shard-mb", type=float, default=d.max_shard_mb, help="safetensors shard size (MiB)")
    g.add_argument("--final-eval", type=int, default=d.final_eval,
                   help="held-out problems scored after export (0: skip)")
    g.add_argument("--sweep", action="store_true",
                   help="after export, sweep sampler settings and write the best into generation_config.json")
    g.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip the sweep (undoes an earlier --sweep, e.g. the one scripts/train_shipped.sh passes)")
    p.set_defaults(run=run)


def _json_object(text: str | None, option: str, shape: str) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object {shape}")
    return value


def config_from_args(args: argparse.Namespace):
    from dgemma.train.objective import ObjectiveConfig
    from dgemma.train.trainer import TrainConfig

    weights = _json_object(args.family_weights, "--family-weights", "{family: weight}")
    architecture = _json_object(args.architecture, "--architecture", "{field: value}")
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    return TrainConfig(
        out_dir=args.out, preset=args.preset, architecture=architecture, init_from=args.init_from,
        vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        train_examples=args.train_examples, families=families, family_weights=weights, max_length=args.max_length,
        workers=args.workers, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        max_steps=args.max_steps,
        time_budget_min=args.time_budget_min, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, optimizer=args.optimizer,
        grad_clip=args.grad_clip,
        objective=ObjectiveConfig(ar_loss_weight=args.ar_loss_weight, self_cond_prob=args.self_cond_prob,
                                  weight_by_t=args.weight_by_t, filler_weight=args.filler_weight,
                                  noise_samples=args.noise_samples),
        qk_norm_init=args.qk_norm_init, seed=args.seed, device=args.device, precision=args.precision,
        compile=args.compile, cuda_graphs=args.cuda_graphs, moe_impl=args.moe_impl, eval_every=args.eval_every,
        checkpoint_every_min=args.checkpoint_every_min, resume=not args.no_resume, keep_state=args.keep_state,
        overwrite=args.overwrite, profile_at=args.profile_at, max_shard_mb=args.max_shard_mb,
        final_eval=args.final_eval, sweep=args.sweep,
    ).validate()


def run(args: argparse.Namespace) -> int:
    from dgemma.train.trainer import summary, train

    import torch

    config = config_from_args(args)
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        # The host only cuts and copies batches: a few threads do it, while a thread per core in each of several runs
        # sharing one host makes tiny CPU ops wait for cores (3.7 ms per batch gather in a profiled run).
        torch.set_num_threads(min(CUDA_HOST_THREADS, torch.get_num_threads()))
    result = train(config)
    print(summary(result))
    sys.stdout.flush()
    return 0
