"""Load test for `dgemma serve` (or any OpenAI-compatible server): N concurrent clients, M requests each.

Each client sends streaming chat completions one after another and times them: latency (request to last
byte) and TTFC (time to the first committed canvas: the first chunk with text). Prints requests/s, generated
tokens/s (from the usage chunk) and p50/p99 of both times, for each client count given.

    dgemma serve MODEL --port 8000 &
    python scripts/load_test.py --clients 1 4 16 --requests 8 --max-tokens 128 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def one_request(http: httpx.AsyncClient, args, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                     or c.get("finish_reason") for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"latency_s": end - start, "ttfc_s": (first or end) - start, "tokens": tokens}


async def client_loop(http: httpx.AsyncClient, args, client_id: int, results: list) -> None:
    for i in range(args.requests):
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": f"{args.prompt} (client {client_id}, request {i})"}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.ignore_eos:
            body["ignore_eos"] = True
        if args.max_denoising_steps is not None:
            body["max_denoising_steps"] = args.max_denoising_steps
        if args.seed is not None:
            body["seed"] = args.seed + client_id * 1000 + i
        try:
            results.append(await one_request(http, args, body))
        except httpx.HTTPError as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"})


async def run_level(args, clients: int) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as http:
        if args.model is None:
            args.model = (await http.get("/v1/models")).json()["data"][0]["id"]
        results: list[dict] = []
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(http, args, c, results) for c in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    latencies = [r["latency_s"] for r in ok]
    ttfcs = [r["ttfc_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "tokens_per_request": tokens / len(ok) if ok else 0,
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "ttfc_p50_s": percentile(ttfcs, 50), "ttfc_p99_s": percentile(ttfcs, 99),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels to run in turn")
    p.add_argument("--requests", type=int, default=8, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max-tokens per request")
    p.add_argument("--max-denoising-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="base seed (each request gets its own)")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before measuring")
    p.add_argument("--json", action="store_true", help="print one JSON object per level instead of a table")
    args = p.parse_args(argv)

    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "requests": args.warmup})
        asyncio.run(run_level(warm, 1))
    rows = []
    for clients in args.clients:
        row = asyncio.run(run_level(args, clients))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'clients':>7} {'reqs':>5} {'err':>4} {'tok/s':>8} {'req/s':>7} {'p50 lat s':>9} {'p99 lat s':>9} "
              f"{'p50 TTFC s':>10} {'p99 TTFC s':>10}")
        for r in rows:
            print(f"{r['clients']:>7} {r['requests']:>5} {r['errors']:>4} {r['tokens_per_s']:>8.1f} "
                  f"{r['requests_per_s']:>7.2f} {r['latency_p50_s']:>9.3f} {r['latency_p99_s']:>9.3f} "
                  f"{r['ttfc_p50_s']:>10.3f} {r['ttfc_p99_s']:>10.3f}")
        for r in rows:
            if r["first_error"]:
                print(f"clients={r['clients']}: first error: {r['first_error']}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
