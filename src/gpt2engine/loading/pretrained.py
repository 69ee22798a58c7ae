"""`GPT2.from_pretrained` and `GPT2.save_pretrained`: the model's public loading and export,
given to the class here, above everything they need (runtime.py's device and dtype rules,
weights.py's surgery), so model.py imports none of it. `gpt2engine.GPT2` is this module's GPT2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2engine.loading.runtime import pick_device, pick_dtype
from gpt2engine.loading.weights import load_model, save_model
from gpt2engine.model import GPT2

__all__ = ["GPT2"]


def from_pretrained(
    cls: type[GPT2], name_or_path: str | Path, *, revision: str | None = None,
    dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
) -> GPT2:
    """Load a Hugging Face GPT-2 checkpoint (a folder or a Hub id); see weights.py.
    dtype: a torch dtype or its name ("float32", "bfloat16", "float16", "int8", "auto"); on the
    CPU, bfloat16 and int8 store the weights small and compute in float32 (formats.py)."""
    target = pick_device(device)
    compute, weight_format = pick_dtype(dtype, target)
    return load_model(name_or_path, revision=revision, dtype=compute, device=target,
                      weight_format=weight_format)


def save_pretrained(
    self: GPT2, folder: str | Path, *, overwrite: bool = False, extra_files: tuple[Path, ...] = ()
) -> None:
    """Write the Hugging Face layout (config.json + model.safetensors, + extra_files such as
    the tokenizer's, all or none); see weights.py."""
    save_model(self, folder, overwrite=overwrite, extra_files=extra_files)


GPT2.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment]
GPT2.save_pretrained = save_pretrained
