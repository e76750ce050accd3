"""`dgemma serve`: the OpenAI-compatible HTTP server (flags named like vLLM's where vLLM has one)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from dgemma.cli.options import add_model_args, add_sampling_args, dtype_arg, sampling_overrides
from dgemma.errors import ConfigError

log = logging.getLogger("dgemma.server")

DEFAULT_MAX_MODEL_LEN = 8192  # when the model allows more: the KV cache holds max_num_seqs rows of this many positions


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (default: the model shipped with dgemma) over an OpenAI-compatible API: "
        "/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health, /version, "
        "/metrics. Requests are batched step by step: each denoising forward serves every running request. "
        "See docs/server.md.",
    )
    add_model_args(p, positional=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("DGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize, /detokenize "
                        "(default: $DGEMMA_API_KEY; /health, /metrics and /version stay open)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send in 'model' (default: MODEL as given); the first is reported")
    g.add_argument("--max-model-len", type=int, default=None,
                   help=f"prompt + generated tokens per request (default: the model's maximum, at most "
                        f"{DEFAULT_MAX_MODEL_LEN})")
    g.add_argument("--max-num-seqs", type=int, default=16,
                   help="requests denoised together (cache rows); more wait in the queue (default 16)")
    g.add_argument("--max-queue-len", type=int, default=256,
                   help="requests waiting for a row; beyond it the server answers 503 (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prompt/canvas tokens encoded per engine step; longer prompts are prefilled in chunks "
                        "between denoising steps (default 2048)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body; bigger ones get 413 (default 4 MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds to let requests in flight finish before they are cancelled "
                        "(default 10)")
    g.add_argument("--num-threads", type=int, default=None,
                   help="CPU threads of the engine's tensor operations (default: $OMP_NUM_THREADS if set, else on "
                        "a CPU device all cores but one, which is left to the HTTP front end; untouched on CUDA)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    g.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    add_sampling_args(p)
    p.set_defaults(run=run)


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dgemma.engine.engine import Engine
    from dgemma.engine.scheduler import SchedulerConfig
    from dgemma.llm import LLM
    from dgemma.server.app import DrainingServer, build_app
    from dgemma.server.async_engine import AsyncEngine
    from dgemma.server.metrics import ServerMetrics
    from dgemma.server.serving import OpenAIServing, ServingConfig

    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_body_bytes", "max_new_tokens",
                 "num_threads"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.max_queue_len < 0 or args.shutdown_timeout < 0:
        raise ConfigError("--max-queue-len and --shutdown-timeout must be >= 0")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65536), got {args.port}")

    llm = LLM(args.model, dtype=dtype_arg(args.dtype), device=args.device, generation_config=args.generation_config,
              quantization=args.quantization)
    tokenizer = llm.require_tokenizer()
    cfg = llm.config
    max_model_len = args.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if args.max_model_len is None and llm.model.device.type == "cuda":
        # Like vLLM, size the default to the memory the weights left: the full-size model on an 80 GB card has
        # room for fewer positions than 16 rows x 8192.
        from dgemma.engine.scheduler import max_write_tokens
        from dgemma.model.kv_cache import free_device_bytes, max_positions_that_fit

        free = free_device_bytes(llm.model.device)
        write = max_write_tokens(cfg.canvas_length, args.max_num_batched_tokens)  # sizes the sliding layers' rings
        fit = max_positions_that_fit(cfg, llm.model.dtype, args.max_num_seqs, free, write) // 256 * 256
        if fit < max_model_len:
            log.info("max_model_len lowered from %d to %d so that %d rows of KV cache fit in GPU memory",
                     max_model_len, fit, args.max_num_seqs)
            max_model_len = fit
    if max_model_len > cfg.max_position_embeddings:
        raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")
    if max_model_len <= cfg.canvas_length:
        raise ConfigError(f"--max-model-len {max_model_len} must exceed the canvas length ({cfg.canvas_length})")
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_queue_len=args.max_queue_len,
        max_prefill_tokens=args.max_num_batched_tokens, max_model_len=max_model_len, canvas_length=cfg.canvas_length,
    )
    overrides = sampling_overrides(args)
    max_tokens_default = overrides.pop("max_new_tokens", None)
    defaults = llm.params(**overrides)
    names = args.served_model_name or [args.model if args.model is not None else Path(llm.path).name]

    num_threads = args.num_threads
    if num_threads is None and llm.model.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        num_threads = max(1, (os.cpu_count() or 2) - 1)

    metrics = ServerMetrics(names[0])
    engine = Engine(llm.model, scheduler_config)
    async_engine = AsyncEngine(engine, metrics, num_threads=num_threads)
    serving = OpenAIServing(async_engine, tokenizer, ServingConfig(
        served_model_names=names, max_model_len=max_model_len, canvas_length=cfg.canvas_length,
        vocab_size=cfg.vocab_size, default_params=defaults, max_tokens_default=max_tokens_default,
        model_root=str(llm.path),
    ))
    app = build_app(serving, async_engine, metrics, api_key=args.api_key, max_body_bytes=args.max_body_bytes)

    experts = ", experts in fp8" if args.quantization == "fp8" else ""
    log.info("model %s (%s, %s%s on %s), served as %s", llm.path, type(llm.model).__name__, llm.model.dtype,
             experts, llm.model.device, ", ".join(names))
    log.info("max_model_len %d, canvas %d, max_num_seqs %d, max_queue_len %d, max_num_batched_tokens %d, "
             "KV cache %.1f MiB", max_model_len, cfg.canvas_length, args.max_num_seqs, args.max_queue_len,
             args.max_num_batched_tokens, engine.cache.nbytes / 2**20)
    log.info("defaults: %s; max_tokens default: %s", defaults,
             max_tokens_default or "as many as fit in max_model_len")
    log.info("API key %s, body limit %d bytes, shutdown timeout %.1f s, engine threads %s",
             "required" if args.api_key else "not required", args.max_body_bytes, args.shutdown_timeout,
             num_threads or "torch default")

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout + 5.0)
    server = DrainingServer(config, serving, args.shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down, with the handlers it found installed:
    # these no-op handlers make a graceful SIGINT/SIGTERM shutdown end with exit code 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if async_engine.error is not None:
        log.error("the engine had died: %s", async_engine.dead_message)
        return 1
    return 0 if server.started else 1
