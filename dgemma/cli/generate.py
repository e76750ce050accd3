"""`dgemma generate`: one answer, printed canvas by canvas as each is committed, then one statistics line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dgemma.cli.options import add_model_args, add_sampling_args, dtype_arg, sampling_overrides
from dgemma.errors import RequestError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an answer to a prompt or a conversation",
        description="Generate with block diffusion. PROMPT is sent as a user message through the checkpoint's "
        "chat template (use --raw to send it as plain text). The answer is printed as each canvas is committed, "
        "then one statistics line (to stderr); --json prints one JSON object instead.",
    )
    add_model_args(p)
    p.add_argument("prompt", nargs="?", default=None, help="the user message (or raw text with --raw)")
    p.add_argument("--messages", metavar="FILE.json", default=None,
                   help="a JSON list of chat messages {role, content} (or {messages, tools}) instead of PROMPT")
    p.add_argument("--system", default=None, help="a system prompt placed before PROMPT")
    p.add_argument("--think", action="store_true", help="thinking mode: the model reasons before answering")
    p.add_argument("--tools", metavar="FILE.json", default=None, help="a JSON list of OpenAI tool specs")
    p.add_argument("--raw", action="store_true", help="send PROMPT as plain text, without the chat template")
    p.add_argument("--keep-special-tokens", action="store_true", help="print special tokens in the output")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, statistics)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or statistics on stderr")
    add_sampling_args(p)
    p.set_defaults(run=run)


def _read_json(path: str, what: str):
    file = Path(path)
    if not file.is_file():
        raise RequestError(f"{what} file {path} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"{what} file {path} is not valid JSON: {exc}") from None


def conversation(args) -> tuple[list[dict] | None, list[dict] | None]:
    """(messages, tools) from the arguments; messages None means a raw prompt."""
    tools = _read_json(args.tools, "--tools") if args.tools else None
    if args.messages and args.prompt is not None:
        raise RequestError("give either PROMPT or --messages, not both")
    if args.messages:
        data = _read_json(args.messages, "--messages")
        if isinstance(data, dict):
            tools = data.get("tools", tools)
            data = data.get("messages")
        if not isinstance(data, list) or not data or not all(isinstance(m, dict) for m in data):
            raise RequestError(f"--messages file {args.messages} must hold a non-empty JSON list of message objects")
        messages = list(data)
    elif args.prompt is None:
        raise RequestError("nothing to do: give a PROMPT or --messages FILE.json")
    elif args.raw:
        if args.system or args.think or tools:
            raise RequestError("--raw sends plain text: --system, --think and --tools need the chat template")
        return None, None
    else:
        messages = [{"role": "user", "content": args.prompt}]
    if args.system:
        messages = [{"role": "system", "content": args.system}] + messages
    if tools is not None and not isinstance(tools, list):
        raise RequestError("--tools must hold a JSON list of tool specs")
    return messages, tools


def run(args: argparse.Namespace) -> int:
    from dgemma.llm import LLM

    messages, tools = conversation(args)
    llm = LLM(args.model, dtype=dtype_arg(args.dtype), device=args.device, generation_config=args.generation_config,
              quantization=args.quantization)
    params = llm.params(**sampling_overrides(args))
    skip = not args.keep_special_tokens
    if messages is None:
        prompt_ids = llm.encode_prompt(args.prompt)
    else:
        prompt_ids = llm.chat_prompt(messages, tools=tools, enable_thinking=args.think)
    streaming = not args.json
    printed = {"text": ""}
    canvases = {"n": 0}

    def on_output(_: int, out) -> None:
        if not (out.new_token_ids or out.finished):
            return
        canvases["n"] += 1
        if streaming and llm.tokenizer is not None:
            text = llm.decode(out.request.output_ids, skip)
            if params.stop:
                from dgemma.llm import _cut_at_stop

                text = _cut_at_stop(text, params.stop)
            # Print only what is new; a multi-byte character split across canvases is printed once complete.
            if text.startswith(printed["text"]) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed["text"]):])
                sys.stdout.flush()
                printed["text"] = text
        if not args.quiet and out.request.stats.forwards_per_canvas and params.max_new_tokens > 4 * llm.config.canvas_length:
            print(f"[canvas {canvases['n']}: {out.request.stats.forwards_per_canvas[-1]} steps, "
                  f"{len(out.request.output_ids)} tokens]", file=sys.stderr)

    result = llm.generate([prompt_ids], params, on_output=on_output, skip_special_tokens=skip)[0]
    s = result.stats
    if args.json:
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "canvases": s.canvases,
            "forwards_per_canvas": s.forwards_per_canvas, "tokens_per_forward": round(s.tokens_per_forward, 3),
            "prefill_ms": round(s.prefill_ms, 2), "denoise_ms": round(s.denoise_ms, 2),
            "total_ms": round(s.total_ms, 2), "seed": params.seed,
        }))
        return 0
    if llm.tokenizer is None:
        print(" ".join(map(str, result.token_ids)))
    elif result.text and result.text != printed["text"]:
        sys.stdout.write(result.text[len(printed["text"]):] if result.text.startswith(printed["text"]) else "\n" + result.text)
    print()
    if not args.quiet:
        print(
            f"[{s.completion_tokens} tokens, {s.canvases} canvases, steps per canvas {s.forwards_per_canvas}, "
            f"{s.tokens_per_forward:.2f} tokens/forward, prefill {s.prefill_ms:.1f} ms, denoising {s.denoise_ms:.1f} ms, "
            f"total {s.total_ms:.1f} ms, finish: {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0
