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


def with_gpt2_vocabulary(checkpoint: Path) -> Path:
    """The benchmark checkpoint's weights beside GPT-2's own vocabulary (the copy bundled in the
    package), so that text has GPT-2's token counts."""
    from gpt2engine.tokenizer import GPT2_VOCABULARY

    folder = CACHE / "gpt2-124m-random-gpt2-vocabulary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("config.json", checkpoint / "config.json"),
                         ("model.safetensors", checkpoint / "model.safetensors"),
                         ("vocab.json", GPT2_VOCABULARY / "vocab.json"),
                         ("merges.txt", GPT2_VOCABULARY / "merges.txt")):
        if not (folder / name).exists():
            (folder / name).symlink_to(source.resolve())
    return folder


def child(code: str, *args: str, stdin: str | None = None) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; return (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, done.stdout


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))
