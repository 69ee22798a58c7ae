"""`gpt2 bench`: our engine in every mode against its peers, in one run (gpt2engine.bench)."""

from __future__ import annotations

import argparse
import os

from gpt2engine.cli.flags import bounded_int, positive_int


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    from gpt2engine.bench import MODES

    bench = commands.add_parser(
        "bench", help="speed against transformers, CTranslate2 and llama.cpp, in one run",
        description="Decode tokens/s at batch 1 and 8, prefill tokens/s, time to first token, load "
                    "time and peak RSS of gpt2engine in every mode and of each peer that is installed "
                    "(pip install 'gpt2engine[bench]'), each in its own process, on the same "
                    "checkpoint and thread count; then the ratios.")
    bench.add_argument("--model", dest="bench_model", metavar="NAME_OR_PATH",
                       help="checkpoint (default: GPT-2 124M's architecture with random weights, "
                            "built locally once)")
    bench.add_argument("--engines", type=lambda text: text.split(","), default=list(MODES),
                       metavar="LIST", help=f"comma-separated, of {','.join(MODES)} (default: all)")
    bench.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)), metavar="N",
                       help="threads for every engine (default: the CPUs this process may use)")
    bench.add_argument("--new-tokens", type=bounded_int(8, 512), default=64, metavar="N",
                       help="tokens generated per decode run (default: 64)")
    bench.add_argument("--repeats", type=bounded_int(1, 20), default=3, metavar="R",
                       help="rounds over every engine and mode; the medians are reported (default: 3)")
    bench.add_argument("--json", action="store_true",
                       help="one JSON object per engine, mode and batch size instead of the table")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from gpt2engine import bench

    args.model = args.bench_model
    return bench.main(args)
