"""Ray Serve scale-out on one machine: aggregate tokens/s of `gpt2 serve --ray` with 1 and 2
replicas, and the cost of the Ray path against the plain `gpt2 serve` at 1 replica, same load.

Every server gets the machine's CPUs in total (2 threads for one replica, 1 each for two). On one
machine this shows the overhead of Ray's proxy and router and that requests spread; it cannot show
scaling, because two replicas share the cores one replica already uses: that needs more machines
(README, "Scale-out on Ray Serve").

Run: .venv/bin/python benchmarks/ray_serving.py [--requests-per-client R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

from common import gpt2_124m_checkpoint
from serving import busy, free_port, load, running

STREAMS = (1, 16)
CPUS = os.cpu_count() or 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=2)
    args = parser.parse_args()
    folder = gpt2_124m_checkpoint()
    gpt2 = [str(Path(sys.executable).parent / "gpt2"), "serve", "--model", str(folder), "--quiet",
            "--max-model-len", "256"]
    setups = {
        "plain, 1 server": [*gpt2, "--max-batch", "16"],
        "ray, 1 replica": [*gpt2, "--max-batch", "16", "--ray", "--replicas", "1",
                           "--cpus-per-replica", str(CPUS)],
        "ray, 2 replicas": [*gpt2, "--max-batch", "8", "--ray", "--replicas", "2",
                            "--cpus-per-replica", str(max(1, CPUS // 2))],
    }
    print(f"GPT-2 124M (random weights), float32, {CPUS} CPUs in all per setup, 64 new tokens per "
          f"request, greedy, {args.requests_per_client} requests per client; load before: {busy():.2f}")
    results = {}
    for name, command in setups.items():
        print(f"measuring {name}...", flush=True)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(CPUS)}
        with running([*command, "--port", str(port)], port, env) as url:
            results[name] = {s: asyncio.run(load(url, s, args.requests_per_client, random.Random(0)))
                             for s in STREAMS}
    print(f"{'setup':>16} {'streams':>7} {'tokens/s':>9} {'TTFT p50':>9} {'ITL p50':>8}")
    for name, by_streams in results.items():
        for s, r in by_streams.items():
            print(f"{name:>16} {s:>7} {r['tok_s']:>9.1f} {r['ttft_p50'] * 1000:>7.0f}ms "
                  f"{r['itl_p50'] * 1000:>6.1f}ms")
    plain, one, two = (results[name] for name in setups)
    for s in STREAMS:
        print(f"{s:>2} streams: Ray overhead at 1 replica {1 - one[s]['tok_s'] / plain[s]['tok_s']:+.1%} "
              f"of tokens/s; 2 replicas / 1 replica x{two[s]['tok_s'] / one[s]['tok_s']:.2f}")
    print(f"load after: {busy():.2f}")


if __name__ == "__main__":
    main()
