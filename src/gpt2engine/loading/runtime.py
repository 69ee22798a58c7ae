"""What to run on and what to run: the `auto` device and dtype rules, and loading a model with its
tokenizer, the one place the CLI and the lm-eval adapter share."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpt2engine.errors import GPT2EngineError

if TYPE_CHECKING:  # torch is imported when a device is picked, so `gpt2 --help` stays quick
    import torch

    from gpt2engine.model import GPT2
    from gpt2engine.tokenizer import Tokenizer

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d{1,3})?)$")


def check_device_name(name: str) -> str:
    """The device names we run on (no `meta`: it holds no values); whether it is here is checked
    when a device is picked."""
    if not isinstance(name, str) or not DEVICE.match(name):
        raise GPT2EngineError(f"device must be auto, cpu, cuda, cuda:N, mps or xpu, got {name!r}")
    return name


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU; anything else must actually work here."""
    import torch

    name = check_device_name(str(name))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as error:
        raise GPT2EngineError(f"device {name!r} is not usable ({str(error).splitlines()[0]})") from None
    return torch.device(name)


def pick_dtype(name: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(dtype of the activations and the cache, weight format or None for weights in that dtype).

    `auto` is float32 on the CPU (exact, and our kernel streams it at the memory bandwidth) and
    float16 on accelerators. On the CPU, bfloat16 and int8 are weight formats (formats.py): the
    weights are stored small and widened in registers, the rest stays float32, so they are faster
    than float32 on any CPU; int8 is a CPU mode only.
    """
    import torch

    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise GPT2EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return (torch.float32, None) if device.type == "cpu" else (torch.float16, None)
    if device.type == "cpu" and name in ("bfloat16", "int8"):
        return torch.float32, name
    if name == "int8":
        raise GPT2EngineError(f"dtype int8 is a CPU mode; on {device} use float16 or bfloat16")
    return getattr(torch, name), None


def load_pretrained(
    name_or_path: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
    say: Callable[[str], None] | None = None, tokenizer: str | None = None,
) -> tuple[GPT2, Tokenizer]:
    """Model and tokenizer of one checkpoint, resolved (or downloaded) once (`tokenizer`: another
    folder or Hub id to take the tokenizer from); `say` hears what is being loaded, from where, on
    which device and dtype, and how long it took."""
    import time

    from gpt2engine.loading.hub import resolve_checkpoint
    from gpt2engine.tokenizer import Tokenizer

    say = say or (lambda message: None)
    check_device_name(device)
    if device not in ("auto", "cpu"):  # an accelerator that is not here fails before a download
        pick_device(device)
    started = time.perf_counter()
    folder = resolve_checkpoint(name_or_path, revision)
    # A broken tokenizer fails before the weights load. Parsed before torch is imported, the
    # parse's freed Python objects leave room that torch's import fills (a lower peak: docs/loading.md).
    text = Tokenizer.from_pretrained(tokenizer or folder)
    from gpt2engine.loading.weights import load_model  # it imports torch, so after the tokenizer

    target = pick_device(device)
    compute, weight_format = pick_dtype(dtype, target)
    mode = weight_format or str(compute).removeprefix("torch.")
    where = str(folder) if str(folder) == str(name_or_path) else f"{name_or_path} ({folder})"
    say(f"Loading weights from {where} on {target}, {mode}...")
    model = load_model(folder, dtype=compute, device=target, weight_format=weight_format)
    check_vocabularies(model, text)
    say(f"Weights loaded successfully ({model.config.parameter_count() / 1e6:.0f}M parameters, "
        f"{time.perf_counter() - started:.1f} s).")
    return model, text


def load_draft(name_or_path: str, model: GPT2, tokenizer: Tokenizer, dtype: str = "auto") -> GPT2:
    """A draft model for speculative decoding, on `model`'s device: its tokenizer must be
    `tokenizer`, token for token, or its guesses would be other tokens' ids."""
    draft, theirs = load_pretrained(name_or_path, device=str(model.device), dtype=dtype)
    if theirs.token_bytes.blob != tokenizer.token_bytes.blob or theirs.added != tokenizer.added:
        raise GPT2EngineError(f"the draft model {name_or_path}'s vocabulary differs from the model's; a "
                              f"draft must share the model's tokenizer")
    return draft


def check_vocabularies(model: GPT2, tokenizer: Tokenizer) -> None:
    """A model may have more rows than the tokenizer has tokens (padded, as nanoGPT's 50,304), never
    fewer: a token without a row cannot be embedded."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GPT2EngineError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size} embedding rows; they do not belong together")
