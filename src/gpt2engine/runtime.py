"""What to run on and what to run: the `auto` device and dtype rules, and loading a model with its
tokenizer, the one place the CLI and the lm-eval adapter share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpt2engine.errors import GPT2EngineError

if TYPE_CHECKING:  # torch is imported when a device is picked, so `gpt2 --help` stays quick
    import torch

    from gpt2engine.model import GPT2
    from gpt2engine.tokenizer import Tokenizer

DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU; anything else must actually work here."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as error:
        raise GPT2EngineError(f"device {name!r} is not usable ({str(error).splitlines()[0]})") from None
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on the CPU (exact) and float16 on accelerators (fast)."""
    import torch

    if name not in DTYPES:
        raise GPT2EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return getattr(torch, name)


def load_pretrained(
    name_or_path: str, revision: str | None = None, device: str = "auto", dtype: str = "auto"
) -> tuple[GPT2, Tokenizer]:
    """Model and tokenizer of one checkpoint, resolved (or downloaded) once."""
    from gpt2engine.hub import resolve_checkpoint
    from gpt2engine.model import GPT2
    from gpt2engine.tokenizer import Tokenizer

    target = pick_device(device)
    folder = resolve_checkpoint(name_or_path, revision)
    model = GPT2.from_pretrained(folder, dtype=pick_dtype(dtype, target), device=target)
    return model, Tokenizer.from_pretrained(folder)
