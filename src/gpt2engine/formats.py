"""Weight formats for the CPU: the weights of the linear layers and the token embedding stored as
float32, bfloat16 or int8, while activations, the KV cache, LayerNorms and attention stay float32.

Decoding reads every weight once per token, so it runs at the memory bandwidth: half the bytes
(bfloat16) or a quarter (int8) per weight make it faster. Our kernels (kernels/) widen a
bfloat16 weight to float32 in registers and multiply in float32, and meet int8 weights with
activations quantized to int8 per row (kernels/linear_int8.h), the one other rounding:
- bfloat16: float32's exponent with 8 bits of mantissa, rounded to nearest (relative error ≤ 2^-9);
- int8: symmetric, one scale per output row (a row of the token embedding for the tied head):
  w[o, i] ≈ scale[o] * q[o, i], q in [-127, 127], scale[o] = max_i |w[o, i]| / 127.
"""

from __future__ import annotations

import torch

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
