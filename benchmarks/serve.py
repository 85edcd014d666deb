"""Serving benchmark: Poisson arrivals at given request rates against a running gemforge server.

Each rate sends `--num-requests` streaming requests (code completions, and infill through `suffix`
for `--infill-fraction` of them) with exponential inter-arrival times, and measures per request:
TTFT (send -> first text), TPOT ((last - first text) / (tokens - 1)) and ITL (gaps between
chunks). Reports throughput and latency percentiles per rate as JSON, and plots latency vs load.
Bounded: at most `--max-seconds` per rate (unfinished requests are cancelled and counted), a
per-request timeout, and loopback servers only.

    gemforge serve models/nano-codegemma --port 8000 &
    python benchmarks/serve.py --url http://127.0.0.1:8000 --rates 1 2 4 8 --num-requests 64 \
        --max-tokens 64 --out benchmarks/results/serve
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx2 as httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COMPLETION_PROMPTS = [
    "def fibonacci(n):\n", "import json\n\ndef load_config(path):\n", "class Stack:\n    def __init__(self):\n",
    "def quicksort(items):\n    if len(items) <= 1:\n", "async def fetch_all(urls):\n",
    "def parse_args():\n    parser = argparse.ArgumentParser(", "for i, line in enumerate(lines):\n",
    "def is_prime(n: int) -> bool:\n",
]
INFILL_PROMPTS = [
    ("def add(a, b):\n    ", "\n    return result\n"), ("def mean(xs):\n    total = ", "\n    return total / len(xs)\n"),
    ("with open(path) as f:\n    ", "\nprint(len(data))\n"), ("class Point:\n    def __init__(self, x, y):\n", "\n"),
]


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    tpot: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    res, t0, last = Result(), time.perf_counter(), None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if any(c["text"] for c in chunk["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        if res.ttft is not None and res.tokens > 1:
            res.tpot = (last - t0 - res.ttft) / (res.tokens - 1)
        res.ok = True
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def make_bodies(args, rng: random.Random) -> list[dict]:
    bodies = []
    for _ in range(args.num_requests):
        body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        if rng.random() < args.infill_fraction:
            body["prompt"], body["suffix"] = rng.choice(INFILL_PROMPTS)
        else:
            body["prompt"] = rng.choice(COMPLETION_PROMPTS)
        bodies.append(body)
    return bodies


async def run_rate(args, rate: float) -> dict:
    rng = random.Random(args.seed)
    bodies = make_bodies(args, rng)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.request_timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(one_request(client, body)))
            await asyncio.sleep(rng.expovariate(rate))
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, args.max_seconds - (time.perf_counter() - start)))
        for t in pending:
            t.cancel()
        elapsed = time.perf_counter() - start
    results = [t.result() for t in tasks if t in done]
    return summarize(rate, results, len(pending), elapsed)


def pcts(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1e3
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99))}


def summarize(rate: float, results: list[Result], timed_out: int, elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    return {"rate": rate, "completed": len(ok), "failed": len(results) - len(ok), "timed_out": timed_out,
            "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": elapsed,
            "request_throughput": len(ok) / elapsed, "output_token_throughput": tokens / elapsed,
            "ttft": pcts([r.ttft for r in ok if r.ttft is not None]),
            "tpot": pcts([r.tpot for r in ok if r.tpot is not None]),
            "itl": pcts([x for r in ok for x in r.itl])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rates = [r["rate"] for r in rows]
    for ax, key in zip(axes, ("ttft", "tpot", "itl")):
        for p, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(rates, [r[key].get(p, float("nan")) for r in rows], style, label=p.replace("_ms", ""))
        ax.set(xlabel="offered load (requests/s)", ylabel=f"{key.upper()} (ms)", title=key.upper())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("gemforge serving latency vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="requests per second")
    p.add_argument("--num-requests", type=int, default=64, help="per rate (at most 2000)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--infill-fraction", type=float, default=0.3)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (gemforge extension)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per rate; then unfinished requests are cancelled")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve", help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {args.url}")
    if not 1 <= args.num_requests <= 2000 or any(r <= 0 for r in args.rates) or args.max_seconds <= 0:
        p.error("need 1 <= --num-requests <= 2000, positive --rates and --max-seconds")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.model is None:
        args.model = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    rows = []
    for rate in args.rates:
        rows.append(asyncio.run(run_rate(args, rate)))
        r = rows[-1]
        print(f"rate {rate:g}/s: {r['completed']} ok, {r['failed']} failed, {r['timed_out']} timed out; "
              f"{r['output_token_throughput']:.1f} tok/s; TTFT p50 {r['ttft'].get('p50_ms', float('nan')):.1f} ms, "
              f"TPOT p50 {r['tpot'].get('p50_ms', float('nan')):.2f} ms", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"url": args.url, "model": args.model, "max_tokens": args.max_tokens, "num_requests": args.num_requests,
              "infill_fraction": args.infill_fraction, "results": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
