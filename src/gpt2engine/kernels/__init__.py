"""A float32 matrix-vector kernel of our own for the CPU decode step (linear.c), with torch as
the fallback.

torch's float32 kernels stream the weights at about half the memory bandwidth when a decode
step multiplies them by a few rows; linear.c reads each weight once per step at close to the
bandwidth, and computes every row the same way whatever the batch (batch invariance). It is
compiled on first use with the machine's C compiler (`-O3 -march=native -fopenmp`) into a cache
keyed by the source, the compiler and the CPU's feature flags, so a build for one CPU is never
loaded on another. No compiler, a failed build, `GPT2ENGINE_KERNELS=0`: torch's F.linear.
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

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("linear.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 128  # beyond this (long prefill chunks, evaluation windows), torch's GEMM is the faster one


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("GPT2ENGINE_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "gpt2engine"


@functools.cache
def compiled():
    """The kernel as a ctypes function, built on first use; None if it cannot be had here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if os.environ.get("GPT2ENGINE_KERNELS", "1") == "0" or compiler is None or platform.system() != "Linux":
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, cpu_flags()])
                         .encode()).hexdigest()[:16]
    library = cache_dir() / f"linear-{key}.so"
    try:
        if not library.is_file():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
                built = Path(scratch) / library.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, library)
        function = ctypes.CDLL(str(library)).gpt2engine_linear_f32
    except (OSError, subprocess.SubprocessError):
        return None
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    function.restype = None
    return function


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: (..., in), weight: (out, in), bias: (out,) or None -> (..., out), as F.linear
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    usable = (0 < rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
              and weight.is_contiguous() and (bias is None or bias.is_contiguous())
              and not (x.requires_grad or weight.requires_grad))
    kernel = compiled() if usable else None
    if kernel is None:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    kernel(x2.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
           rows, x.shape[-1], weight.shape[0], torch.get_num_threads())
    return out.reshape(*x.shape[:-1], weight.shape[0])
