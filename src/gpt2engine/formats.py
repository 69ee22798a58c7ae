"""Weight formats for the CPU: the weights of the linear layers and the token embedding stored as
float32, bfloat16 or int8, while activations, the KV cache, LayerNorms and attention stay float32.

Decoding reads every weight once per token, so it runs at the memory bandwidth: half the bytes
(bfloat16) or a quarter (int8) per weight make it faster. Our kernel (kernels/) widens each
weight to float32 in registers and multiplies in float32, so the only error is the rounding of
the weights themselves:
- bfloat16: float32's exponent with 8 bits of mantissa, rounded to nearest (relative error ≤ 2^-9);
- int8: symmetric, one scale per output row (a row of the token embedding for the tied head):
  w[o, i] ≈ scale[o] * q[o, i], q in [-127, 127], scale[o] = max_i |w[o, i]| / 127.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

FORMATS = ("float32", "bfloat16", "int8")
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
CHUNK_ROWS = 4096  # rows encoded at a time, so encoding the embedding needs no copies of it


def encode(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float weight (rows, cols) in `fmt`: (stored weight, per-row scale or None)."""
    stored = torch.empty(weight.shape, dtype=STORAGE[fmt], device=weight.device)
    scale = torch.empty(weight.shape[0], device=weight.device) if fmt == "int8" else None
    for start in range(0, weight.shape[0], CHUNK_ROWS):  # small temporaries
        part = slice(start, start + CHUNK_ROWS)
        chunk = weight[part].to(torch.float32, copy=True)  # worked on in place
        if scale is None:
            stored[part] = chunk
            continue
        scale[part] = chunk.abs().amax(dim=1).clamp_(min=torch.finfo(torch.float32).tiny) / 127
        stored[part] = chunk.div_(scale[part, None]).round_().clamp_(-127, 127)
    return stored, scale


def decode(
    weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float weight (rows, cols) that a stored weight and its scale stand for (the weight
    itself when it is already that)."""
    if weight.dtype == dtype and scale is None:
        return weight
    wide = weight.to(dtype)
    return wide if scale is None else wide * scale.to(dtype)[:, None]


def formatted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of what a format applies to: every linear layer and the token embedding."""
    from gpt2engine.model import Embedding, Linear

    return ((name, m) for name, m in model.named_modules() if isinstance(m, Linear | Embedding))


def formatted_weights(model: nn.Module) -> list[str]:
    """Names of the weights a format applies to."""
    return [f"{name}.weight" for name, _ in formatted_modules(model)]


def prepare(model: nn.Module, fmt: str) -> None:
    """Give a model built on the meta device the storage dtypes (and scale buffers) of `fmt`, so
    that a state dict of encoded weights loads into it with assign=True."""
    for _, module in formatted_modules(model):
        rows = module.weight.shape[0]
        # torch.empty, not empty_like: on the meta device empty_like imports sympy (0.4 s)
        weight = torch.empty(module.weight.shape, dtype=STORAGE[fmt], device=module.weight.device)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.scale = torch.empty(rows, device=module.weight.device) if fmt == "int8" else None


def dense_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with every weight decoded to `dtype` and no scales: what exports write."""
    state = {name: t for name, t in model.state_dict().items() if not name.endswith(".scale")}
    for name, module in formatted_modules(model):
        if module.weight.dtype != dtype:
            state[f"{name}.weight"] = decode(module.weight, module.scale, dtype)
    return state
