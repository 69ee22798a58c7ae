"""Our C sources (kernels/*.c) as one shared library, compiled on first use; no torch here, so
the tokenizer (bpe.c) loads before torch is imported.

The sources are compiled with the machine's C compiler (`-O3 -march=native -fopenmp`;
GPT2ENGINE_MARCH names another level) into a cache keyed by the sources, the flags, the compiler
and the CPU's feature flags, so a build for one CPU is never loaded on another. No compiler, a
failed build, not Linux, or `GPT2ENGINE_KERNELS=0`: None, and each user falls back (kernels: torch;
the tokenizer: the `tokenizers` library).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent / "kernels"
SOURCES = tuple(HERE / name for name in ("linear.c", "attention.c", "step.c", "rows.c", "convert.c", "bpe.c"))
HEADERS = tuple(HERE / name for name in ("kernels.h", "vec.h", "linear_body.h", "linear_int8.h",
                                         "unicode_classes.h"))
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-Wall"]  # and -march=$GPT2ENGINE_MARCH, by default native


def cpuinfo(*fields: str) -> str:
    """The first line of /proc/cpuinfo that starts with one of `fields`; else the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(fields):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> str:
    return cpuinfo("flags", "Features")


def tuning() -> list[str]:
    """Choices measured per CPU maker. A batch of one streams its weights faster with our software
    prefetch on Intel (Sapphire Rapids: the int8 step 0.67x the time, float32 0.9x) and with the
    hardware's alone on AMD (Zen 4: int8 0.70-0.90x the time without ours); docs/kernels.md."""
    return ["-DPREFETCH_ONE_ROW=0"] if "AuthenticAMD" in cpuinfo("vendor_id") else []


def cache_dir() -> Path:
    root = os.environ.get("GPT2ENGINE_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "gpt2engine"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The library, built on first use; None if it cannot be had here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if os.environ.get("GPT2ENGINE_KERNELS", "1") == "0" or compiler is None or platform.system() != "Linux":
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    march = os.environ.get("GPT2ENGINE_MARCH", "native")  # another: a fleet's floor
    flags = [*FLAGS, f"-march={march}", *tuning()]
    key = hashlib.sha256("\n".join([*(s.read_text() for s in SOURCES + HEADERS), " ".join(flags),
                                    version, cpu_flags()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                built = Path(scratch) / path.name
                subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
