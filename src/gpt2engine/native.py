"""Our C code: two shared libraries, compiled on first use by one builder, with one table of what
each exports. No torch here, so the tokenizer's library loads before torch is imported.

- KERNELS (kernels/*.c): the math, `-O3 -march=native -fopenmp` (GPT2ENGINE_MARCH names another
  level, say a fleet's floor); `GPT2ENGINE_KERNELS=0` switches it off (torch does the work).
- BPE (tokenizer/bpe.c): the tokenizer's byte-level BPE, single-threaded, no OpenMP, built
  whatever GPT2ENGINE_KERNELS says (the `tokenizers` library stands in where it cannot be built).

Each is compiled with the machine's C compiler into a cache keyed by its sources, the flags, the
compiler and the CPU's feature flags, so a build for one CPU is never loaded on another, and loaded
with every export's argument and result types set from EXPORTS (tests/test_native.py checks the
table against the C). No compiler or not Linux: None. A failed build: None, and one line on
stderr naming the compiler's log. GPT2ENGINE_SANITIZE=1 builds both with AddressSanitizer and
UndefinedBehaviorSanitizer (`scripts/sanitize` runs the kernel and tokenizer tests so).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
P, INT, LONG, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_int64, ctypes.c_float
Signature = tuple[type | None, tuple[type, ...]]  # (result type, argument types)


@dataclass(frozen=True, eq=False)  # hashed by identity: load() caches per library
class Library:
    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    flags: tuple[str, ...]
    exports: dict[str, Signature]
    fallback: str  # what does its work where it cannot be had
    switch: str | None = None  # an environment variable that turns it off with "0"
    tuned: bool = False  # -march and the per-CPU choices of `tuning()`


KERNELS = Library(
    "kernels",
    sources=tuple(HERE / "kernels" / f for f in ("linear.c", "attention.c", "step.c", "rows.c", "convert.c")),
    headers=tuple(HERE / "kernels" / f for f in ("kernels.h", "vec.h", "linear_body.h", "linear_int8.h")),
    flags=("-O3", "-fopenmp", "-ffp-contract=off"),  # a*b+c rounds alike wherever the compiler puts it
    exports={
        "gpt2engine_linear": (None, (P, P, INT, P, P, P, INT, INT, INT, INT)),
        "gpt2engine_decode_step": (None, (P, P, P, P, INT, P, INT, P, P)),
        "gpt2engine_convert": (INT, (P, INT, INT64, INT, INT, INT, INT, P, P, INT)),
        "gpt2engine_prefill_attention": (INT, (P, P, P, P, INT, INT, INT, INT, INT, FLOAT, INT)),
        "gpt2engine_gelu_tanh": (None, (P, LONG, INT)),
        "gpt2engine_rows_finite": (None, (P, INT, INT, INT, P)),
        "gpt2engine_rows_argmax": (None, (P, INT, INT, P)),
        "gpt2engine_quantize": (None, (P, INT, INT, P, P, INT)),
        "gpt2engine_dequantize": (None, (P, INT, INT, P, P, P, P, INT)),
    },
    fallback="torch does its work, several times slower",
    switch="GPT2ENGINE_KERNELS",
    tuned=True,
)
BPE = Library(
    "bpe",
    sources=(HERE / "tokenizer" / "bpe.c",),
    headers=(HERE / "tokenizer" / "unicode_classes.h",),
    flags=("-O3",),
    exports={
        "gpt2engine_bpe_new": (P, (P, INT, P, P, P)),
        "gpt2engine_bpe_encode": (LONG, (P, P, LONG, P)),
        "gpt2engine_bpe_free": (None, (P,)),
    },
    fallback="the tokenizers library stands in",
)
COMMON_FLAGS = ("-shared", "-fPIC", "-Wall")
SANITIZERS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all")


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
    """Choices measured per CPU maker: a batch of one streams its weights faster with our software
    prefetch on Intel and with the hardware's alone on AMD (the numbers: docs/kernels.md)."""
    return ["-DPREFETCH_ONE_ROW=0"] if "AuthenticAMD" in cpuinfo("vendor_id") else []


def cache_dir() -> Path:
    root = os.environ.get("GPT2ENGINE_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "gpt2engine"


def flags_for(library: Library) -> list[str]:
    flags = [*library.flags, *COMMON_FLAGS]
    if library.tuned:
        flags += [f"-march={os.environ.get('GPT2ENGINE_MARCH', 'native')}", *tuning()]
    if os.environ.get("GPT2ENGINE_SANITIZE") == "1":
        flags += SANITIZERS
    return flags


@functools.cache
def load(library: Library) -> ctypes.CDLL | None:
    """The library, built on first use and its exports typed; None if it cannot be had here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    switched_off = library.switch is not None and os.environ.get(library.switch, "1") == "0"
    if switched_off or compiler is None or platform.system() != "Linux":
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    flags = flags_for(library)
    key = hashlib.sha256("\n".join([*(s.read_text() for s in library.sources + library.headers),
                                    " ".join(flags), version, cpu_flags()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{library.name}-{key}.so"
    try:
        if not path.is_file() and not build(library, compiler, flags, path):
            return None
        shared = ctypes.CDLL(str(path))
    except OSError as error:
        print(f"gpt2engine: cannot load {path} ({error}); {library.fallback}", file=sys.stderr)
        return None
    for name, (result, arguments) in library.exports.items():
        function = getattr(shared, name)
        function.restype, function.argtypes = result, list(arguments)
    return shared


def build(library: Library, compiler: str, flags: list[str], path: Path) -> bool:
    """Compile `library` into `path`; on failure say so in one line, with where the log is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        command = [compiler, *flags, *map(str, library.sources), "-o", str(built)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            output = done.stdout + done.stderr if done.returncode else None
        except subprocess.SubprocessError as error:
            output = str(error)
        if output is not None:
            log = path.with_suffix(".log")
            log.write_text(" ".join(command) + "\n" + output)
            print(f"gpt2engine: the {library.name} library did not build (the compiler's log: {log}); "
                  f"{library.fallback}", file=sys.stderr)
            return False
        os.replace(built, path)
    return True
