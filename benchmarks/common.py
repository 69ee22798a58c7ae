"""Shared benchmark helpers: the 124M checkpoint, child processes, medians."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".checkpoints"


def gpt2_124m_checkpoint() -> Path:
    """The checkpoint every benchmark runs on, `gpt2 bench`'s own (bench.default_checkpoint): the
    real GPT-2 124M architecture with random weights and a byte-level vocabulary of GPT-2's size,
    built once into the cache (the Hub is out of reach here; speed does not depend on the values)."""
    from gpt2engine.bench import default_checkpoint

    return default_checkpoint()


def child(code: str, *args: str, stdin: str | None = None) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; return (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, done.stdout


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))
