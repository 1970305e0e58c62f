"""Serving benchmark: latency against load for `jpaged serve`, measured as a client sees it.

For each request rate, requests arrive as a Poisson process (exponential gaps, a fixed seed) and
stream their completions over HTTP (`/v1/completions` with `stream: true`). Per rate it reports
request throughput, output tokens per second, time to first token (TTFT), inter-token latency
(ITL: the gaps between streamed chunks), time per output token and end-to-end latency, as p50 /
p99, prints a table, and saves a JSON and a plot of latency against load. Prompts are random word
sequences from the seed; `ignore_eos` fixes every output at `--max-tokens`. A server the script
starts compiles all its step programs first (`--compile-warmup`), so no rate pays for compiling.

    python scripts/bench_serving.py --url http://127.0.0.1:8000        # a running server
    python scripts/bench_serving.py --model PATH [--serve-arg=--num-blocks=512 ...]  # starts one
    python scripts/bench_serving.py --model PATH --rates 2,8,inf --num-requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from bench_common import positive_int, positive_rates, pyplot, save_figure, save_json

WORDS = ("the cat dog sun tree house little big happy sad girl boy named ran jumped played saw found "
         "park ball red blue friend mom day night garden river box toy bird fish cake").split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = math.nan  # seconds from sending to the first streamed text
    e2e: float = math.nan  # seconds from sending to the end of the stream
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds between successive text chunks
    error: str = ""


def make_prompts(count: int, min_words: int, max_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize()
            for _ in range(count)]


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str, max_tokens: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    sent = last = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                    continue
                now = time.perf_counter()
                if math.isnan(result.ttft):
                    result.ttft = now - sent
                else:
                    result.gaps.append(now - last)
                last = now
        result.e2e, result.ok = time.perf_counter() - sent, True
    except httpx.HTTPError as err:
        result.error = repr(err)
    return result


async def run_rate(url: str, headers: dict, model: str | None, prompts: list[str], max_tokens: int,
                   rate: float, seed: int) -> tuple[list[RequestResult], float]:
    """Send `prompts` at Poisson arrivals of `rate` per second (all at once for inf); the results
    and the wall time from the first send to the last finish."""
    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(prompts)) if math.isinf(rate) else rng.exponential(1.0 / rate, len(prompts))
    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one_request(client, model, prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - started


def summarize(rate: float, results: list[RequestResult], wall: float) -> dict:
    done = [r for r in results if r.ok]
    ms = lambda values, q: float(np.percentile(values, q) * 1000) if len(values) else math.nan  # noqa: E731
    ttft = [r.ttft for r in done if not math.isnan(r.ttft)]
    gaps = [g for r in done for g in r.gaps]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1 and not math.isnan(r.ttft)]
    e2e = [r.e2e for r in done]
    tokens = sum(r.output_tokens for r in done)
    return {
        "rate": rate, "requests": len(results), "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:3], "wall_s": wall,
        "request_throughput": len(done) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(gaps, 50),
        "itl_p99_ms": ms(gaps, 99), "tpot_p50_ms": ms(tpot, 50), "e2e_p50_ms": ms(e2e, 50), "e2e_p99_ms": ms(e2e, 99),
    }


def print_table(rows: list[dict]) -> None:
    header = ("rate/s", "done", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50",
              "E2E p50", "E2E p99")
    print(("{:>9} " * len(header)).format(*header))
    for r in rows:
        print(("{:>9} {:>9} {:>9.2f}" + " {:>9.1f}" * 8).format(
            str(r["rate"]), f"{r['completed']}/{r['requests']}", r["request_throughput"], r["output_tokens_per_s"],
            r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"], r["tpot_p50_ms"],
            r["e2e_p50_ms"], r["e2e_p99_ms"]))
    print("(latencies in ms)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    load = [r["request_throughput"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("ttft", "itl", "e2e")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(load, [r[f"{metric}_{q}_ms"] for r in rows], style, label=q)
        ax.set_xlabel("achieved load (requests/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    save_figure(fig, title, path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def started_server(model: str | None, serve_args: list[str], api_key: str | None, timeout: float):
    """`jpaged serve` in a subprocess on a free loopback port; yields its URL, stops it after."""
    port = _free_port()
    command = [sys.executable, "-m", "jpaged", "serve", "--port", str(port), "--compile-warmup", *serve_args]
    if model:
        command += ["--model", model]
    env = {**os.environ, **({"JPAGED_API_KEY": api_key} if api_key else {})}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"`{' '.join(command)}` exited with status {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_all(url: str, args: argparse.Namespace) -> tuple[str, list[dict]]:
    """The served model's id, and a row of `summarize` per rate."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        models.raise_for_status()
    except httpx.HTTPError as error:
        sys.exit(f"cannot list the models of {url}/v1/models: {error}")
    model = models.json()["data"][0]["id"]
    warm = make_prompts(args.warmup, args.min_words, args.max_words, args.seed + 1)
    asyncio.run(run_rate(url, headers, model, warm, args.max_tokens, math.inf, args.seed))  # compile, fill caches
    rows = []
    for i, rate in enumerate(args.rates):
        prompts = make_prompts(args.num_requests, args.min_words, args.max_words, args.seed + 100 + i)
        results, wall = asyncio.run(run_rate(url, headers, model, prompts, args.max_tokens, rate, args.seed + i))
        rows.append(summarize(rate, results, wall))
        print(f"rate {rate}: {rows[-1]['completed']}/{len(prompts)} done in {wall:.1f} s", flush=True)
    return model, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start `jpaged serve`)")
    parser.add_argument("--model", default=None, help="model for the started server (default: the built-in one)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `jpaged serve` flag (repeatable)")
    parser.add_argument("--api-key", default=os.environ.get("JPAGED_API_KEY"))
    parser.add_argument("--rates", type=positive_rates, default="1,2,4,8,inf",
                        help="request rates per second, comma-separated (inf: all at once)")
    parser.add_argument("--num-requests", type=positive_int, default=64, help="requests per rate")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="output tokens per request")
    parser.add_argument("--min-words", type=positive_int, default=8)
    parser.add_argument("--max-words", type=positive_int, default=48)
    parser.add_argument("--warmup", type=positive_int, default=8, help="requests sent at once before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for a started server")
    parser.add_argument("--out", default="bench_results/serving.json", help="JSON path; the plot goes beside it")
    args = parser.parse_args()
    if args.min_words > args.max_words:
        parser.error(f"--min-words {args.min_words} is above --max-words {args.max_words}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops the server it started
    if args.url:
        url = args.url.rstrip("/")
        served, rows = run_all(url[:-3] if url.endswith("/v1") else url, args)
    else:
        with started_server(args.model, args.serve_arg, args.api_key, args.start_timeout) as url:
            served, rows = run_all(url, args)
    print_table(rows)
    out = Path(args.out)
    save_json({"model": args.model, "served_model": served, "url": args.url, "num_requests": args.num_requests, "max_tokens": args.max_tokens,
               "prompt_words": [args.min_words, args.max_words], "seed": args.seed, "machine": platform.platform(),
               "processor": platform.processor(), "cpus": os.cpu_count(), "rows": rows}, out)
    plot(rows, out.with_suffix(".png"), f"jpaged serve: latency against load ({args.model or args.url or 'default'})")


if __name__ == "__main__":
    main()
