"""Ray Serve scale-out on one machine: aggregate tokens/s of `gpt2 serve --ray` with 1 and 2
replicas, and the cost of the Ray path against the plain `gpt2 serve` at 1 replica, same load.

Every setup but the last two gets the machine's CPUs in total (2 threads for one replica, 1 each for
two); the last two give the engine one core and leave the other to Ray's proxy, as a cluster node
with cores to spare would. On one machine this shows the overhead of Ray's proxy and router and that
requests spread; it cannot show scaling, because two replicas share the cores one replica already
uses: that needs more machines (README, "Scale-out on Ray Serve").

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
    ray = [*gpt2, "--ray", "--cpus-per-replica"]
    setups = {  # name -> (command, torch threads of a plain server)
        "plain, 2 threads": ([*gpt2, "--max-batch", "16"], CPUS),
        "ray 1x2 CPUs": ([*ray, str(CPUS), "--max-batch", "16", "--replicas", "1"], CPUS),
        "ray 2x1 CPU": ([*ray, str(max(1, CPUS // 2)), "--max-batch", "8", "--replicas", "2"], CPUS),
        # one core for the engine, the other free for Ray's proxy: the overhead at equal compute
        "plain, 1 thread": ([*gpt2, "--max-batch", "16"], 1),
        "ray 1x1 CPU": ([*ray, "1", "--max-batch", "16", "--replicas", "1"], 1),
    }
    print(f"GPT-2 124M (random weights), float32, {CPUS} CPUs, 64 new tokens per request, greedy, "
          f"{args.requests_per_client} requests per client; load before: {busy():.2f}")
    results = {}
    for name, (command, threads) in setups.items():
        print(f"measuring {name}...", flush=True)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with running([*command, "--port", str(port)], port, env) as url:
            results[name] = {s: asyncio.run(load(url, s, args.requests_per_client, random.Random(0)))
                             for s in STREAMS}
    print(f"{'setup':>16} {'streams':>7} {'tokens/s':>9} {'TTFT p50':>9} {'ITL p50':>8}")
    for name, by_streams in results.items():
        for s, r in by_streams.items():
            print(f"{name:>16} {s:>7} {r['tok_s']:>9.1f} {r['ttft_p50'] * 1000:>7.0f}ms "
                  f"{r['itl_p50'] * 1000:>6.1f}ms")
    r = results
    for s in STREAMS:
        full = 1 - r["ray 1x2 CPUs"][s]["tok_s"] / r["plain, 2 threads"][s]["tok_s"]
        spare = 1 - r["ray 1x1 CPU"][s]["tok_s"] / r["plain, 1 thread"][s]["tok_s"]
        scaling = r["ray 2x1 CPU"][s]["tok_s"] / r["ray 1x2 CPUs"][s]["tok_s"]
        print(f"{s:>2} streams: Ray overhead against the plain server, on all {CPUS} CPUs {full:+.1%}, "
              f"on 1 CPU with a core to spare {spare:+.1%}; 2 replicas / 1 replica x{scaling:.2f}")
    print(f"load after: {busy():.2f}")


if __name__ == "__main__":
    main()
