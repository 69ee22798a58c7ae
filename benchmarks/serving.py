"""Serving throughput and latency: `gpt2 serve` against llama.cpp's `llama-server --parallel 16`,
same weights (our GGUF export of the same checkpoint), same load, in one run.

Each server runs in its own process, with as many rows / slots as the most streams measured; the
load is C concurrent clients (C = 1, 4, 16 by default), each starting after a random delay in the
first half second and then sending streamed, greedy completions back to back: random token-id
prompts of 16-64 tokens (or --prompt-tokens each), 64 new tokens each (ignore_eos). Reported:
aggregate generated tokens/s, time to first token p50/p95/p99, inter-token latency p50 (per
request: time between its first and last token over the tokens between them), and the ratios.

Run: .venv/bin/python benchmarks/serving.py [--dtype float32|bfloat16] [--requests-per-client R]
     [--streams 1,4,16] [--prompt-tokens N]
llama-server: benchmarks/build_llama_server.sh builds it (about 10 minutes), or put it on PATH;
without it, its rows say "missing".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import CACHE, gpt2_124m_checkpoint

ROOT = Path(__file__).resolve().parent
NEW_TOKENS = 64
CONCURRENCY = (1, 4, 16)
THREADS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server() -> str | None:
    built = ROOT / ".llama.cpp" / "bin" / "llama-server"
    return str(built) if built.is_file() else shutil.which("llama-server")


GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}


def gguf_of(folder: Path, dtype: str) -> Path:
    path = CACHE / f"gpt2-124m-random-{GGUF_TYPES[dtype]}.gguf"
    if not path.is_file():
        subprocess.run([str(Path(sys.executable).parent / "gpt2"), "export", str(path), "--model",
                        str(folder), "--format", "gguf", "--gguf-type", GGUF_TYPES[dtype]],
                       check=True, capture_output=True)
    return path


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict[str, str]):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {process.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[0]} did not become healthy")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> tuple[float, float]:
    """(time to first token, inter-token latency) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started, first, last = time.perf_counter(), None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text"):
                last = time.perf_counter()
                first = first or last
    return first - started, (last - first) / (NEW_TOKENS - 1)


def percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def load(url: str, clients: int, per_client: int, rng: random.Random,
               prompt_tokens: int | None = None) -> dict[str, float]:
    prompts = [[rng.randrange(50000) for _ in range(prompt_tokens or rng.randint(16, 64))]
               for _ in range(clients * per_client)]
    delays = [rng.uniform(0, 0.5) for _ in range(clients)]
    results: list[tuple[float, float]] = []

    async def client_loop(i: int, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(delays[i])
        for j in range(per_client):
            results.append(await one_request(http, url, prompts[i * per_client + j]))

    # a fresh connection per request for both servers (llama-server closes idle keep-alive ones)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one_request(http, url, prompts[0])  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": len(results) * NEW_TOKENS / elapsed, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": percentile(ttfts, 0.95), "ttft_p99": percentile(ttfts, 0.99),
            "itl_p50": statistics.median(r[1] for r in results)}


def busy() -> float:
    """The 1-minute load average over the cores: how busy the shared machine already is."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(GGUF_TYPES), default="float32",
                        help="weights of both servers (llama-server gets a GGUF of that type)")
    parser.add_argument("--streams", default=",".join(map(str, CONCURRENCY)), help="concurrent clients")
    parser.add_argument("--prompt-tokens", type=int, help="every prompt this long (default: 16-64)")
    args = parser.parse_args()
    streams = [int(n) for n in args.streams.split(",")]
    rows, context = str(max(streams)), max(256, (args.prompt_tokens or 0) + NEW_TOKENS)
    folder = gpt2_124m_checkpoint()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    servers = {"gpt2engine": lambda port: [str(Path(sys.executable).parent / "gpt2"), "serve", "--model",
                                           str(folder), "--port", str(port), "--max-batch", rows,
                                           "--max-model-len", str(context), "--dtype", args.dtype, "--quiet"]}
    binary = llama_server()
    if binary:
        model = gguf_of(folder, args.dtype)
        servers["llama-server"] = lambda port: [binary, "-m", str(model), "--port", str(port), "--host",
                                                "127.0.0.1", "--parallel", rows,
                                                "-c", str(int(rows) * context),
                                                "-t", str(THREADS), "-tb", str(THREADS), "--no-webui"]
    print(f"GPT-2 124M (random weights), {args.dtype}, {THREADS} threads each, {rows} rows / slots, prompts "
          f"of {args.prompt_tokens or '16-64'} tokens, {NEW_TOKENS} new tokens per request, greedy, "
          f"{args.requests_per_client} requests per client; load before: {busy():.2f}")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, command in servers.items():
        print(f"measuring {name}...", flush=True)
        port = free_port()
        with running(command(port), port, env) as url:
            results[name] = {c: asyncio.run(load(url, c, args.requests_per_client, random.Random(args.seed),
                                                 args.prompt_tokens)) for c in streams}
    if not binary:
        print("llama-server: missing (benchmarks/build_llama_server.sh builds it)")
    print(f"{'server':>13} {'streams':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8}")
    for name, by_streams in results.items():
        for c, r in by_streams.items():
            print(f"{name:>13} {c:>7} {r['tok_s']:>9.1f} {r['ttft_p50'] * 1000:>7.0f}ms "
                  f"{r['ttft_p95'] * 1000:>7.0f}ms {r['ttft_p99'] * 1000:>7.0f}ms "
                  f"{r['itl_p50'] * 1000:>6.1f}ms")
    ours = results["gpt2engine"]
    if len(streams) > 1:
        print(f"gpt2engine: {streams[-1]} streams / {streams[0]} aggregate = "
              f"x{ours[streams[-1]]['tok_s'] / ours[streams[0]]['tok_s']:.2f}")
    if "llama-server" in results:
        for c in streams:
            theirs = results["llama-server"][c]
            print(f"gpt2engine / llama-server at {c:>2} streams: tokens/s "
                  f"x{ours[c]['tok_s'] / theirs['tok_s']:.2f}, TTFT p95 "
                  f"x{ours[c]['ttft_p95'] / theirs['ttft_p95']:.2f} (below 1: ours is sooner)")
    print(f"load after: {busy():.2f}")


if __name__ == "__main__":
    main()
