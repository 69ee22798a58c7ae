"""Kernels of our own for the CPU, torch as the fallback: the linear layers (linear.c), a whole
decode step in one call (step.c, with attention.c; its Python side is step.py), a prefill chunk's
causal attention (attention.c) and GELU (linear.c), the scans of the logits that sampling needs
(rows.c) and the conversion of a checkpoint's tensors while loading (convert.c).

torch's float32 kernels stream the weights at about half the memory bandwidth when a decode
step multiplies them by a few rows, and have none for float32 activations against bfloat16 or
int8 weights (formats.py). linear.c reads each weight once per step at close to the bandwidth,
in any of the three formats, and computes every row the same way whatever the batch (batch
invariance); longer products go to torch's GEMMs (`gemm`). The sources are compiled on first use
(native.py). No compiler, a failed build, `GPT2ENGINE_KERNELS=0`: torch's F.linear (over the
decoded weights for the smaller formats: correct, not fast), scaled_dot_product_attention and the
rest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gpt2engine.formats import STORAGE, decode
from gpt2engine.loading.arena import Arena
from gpt2engine.native import KERNELS, cpu_flags, load

MAX_ROWS = 128  # beyond this (long prefill chunks, evaluation windows) a GEMM is the faster one
MAX_ATTENTION_SLOTS = 8192  # attention.c keeps a row's scores on the stack
FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # kernels.h, by storage dtype
CFunction = Callable[..., Any]  # a C function of native.KERNELS, its types set from native.py's table


@dataclass(frozen=True)
class Kernels:
    linear: CFunction
    decode_step: CFunction  # its structs are step.py's
    convert: CFunction
    rows_finite: CFunction
    rows_argmax: CFunction
    prefill_attention: CFunction
    gelu_tanh: CFunction
    quantize: CFunction  # the int8 GEMM's activations, as the int8 kernel quantizes them
    dequantize: CFunction


@functools.cache
def compiled() -> Kernels | None:
    """The kernels as ctypes functions, built on first use; None if they cannot be had here."""
    if (shared := load(KERNELS)) is None:
        return None
    return Kernels(shared.gpt2engine_linear, shared.gpt2engine_decode_step, shared.gpt2engine_convert,
                   shared.gpt2engine_rows_finite, shared.gpt2engine_rows_argmax,
                   shared.gpt2engine_prefill_attention, shared.gpt2engine_gelu_tanh,
                   shared.gpt2engine_quantize, shared.gpt2engine_dequantize)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16, AMX) and torch may use it (not
    held below AVX-512, as ATEN_CPU_CAPABILITY=avx2 holds it), which makes torch's bfloat16 GEMM
    faster than its float32 one (elsewhere it is several times slower)."""
    allowed = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
    return allowed and bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         scale: torch.Tensor | None) -> torch.Tensor:
    """Many rows (a long prefill chunk) against a weight in any format: torch's GEMM in the fastest
    type this CPU has for it. int8 weights meet activations quantized per row exactly as our
    kernel quantizes them (symmetric, scale = max |x| / 127; exact int32 sums) wherever it is
    built, on every instruction set alike (linear_int8.h); bfloat16 weights meet activations
    rounded to bfloat16 where the CPU multiplies those natively; elsewhere the weights are widened
    to float32."""
    # x: (M, in) float32 -> (M, out) float32
    if weight.dtype == torch.int8 and scale is not None and (kernels := compiled()) is not None:  # in C
        (M, n), threads = x.shape, torch.get_num_threads()
        xq, x_scale = torch.empty(M, n, dtype=torch.int8), torch.empty(M)
        kernels.quantize(x.data_ptr(), M, n, xq.data_ptr(), x_scale.data_ptr(), threads)
        sums = torch._int_mm(xq, weight.t())  # (M, out) int32
        y = torch.empty(sums.shape)
        kernels.dequantize(sums.data_ptr(), M, weight.shape[0], x_scale.data_ptr(), scale.data_ptr(),
                           None if bias is None else bias.data_ptr(), y.data_ptr(), threads)
        return y
    if weight.dtype == torch.bfloat16 and native_bf16():
        y = F.linear(x.bfloat16(), weight).float()
        return y if bias is None else y.add_(bias)
    return F.linear(x, decode(weight, scale, x.dtype), bias)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    # x: (..., in), weight: (out, in) float32/bfloat16/int8, bias, scale: (out,) or None -> (..., out)
    # = F.linear(x, scale[:, None] * weight, bias), up to the rounding of the weights' format
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    on_cpu = (rows > 0 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.is_contiguous()
              and (bias is None or bias.is_contiguous()) and not (x.requires_grad or weight.requires_grad))
    if not on_cpu:
        return F.linear(x, decode(weight, scale, x.dtype), bias)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    kernels = compiled()
    if kernels is None or rows > MAX_ROWS or weight.dtype not in FORMAT_CODES:
        return gemm(x2, weight, bias, scale).reshape(*x.shape[:-1], weight.shape[0])
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    kernels.linear(x2.data_ptr(), weight.data_ptr(), FORMAT_CODES[weight.dtype],
                   None if scale is None else scale.data_ptr(), None if bias is None else bias.data_ptr(),
                   out.data_ptr(), rows, x.shape[-1], weight.shape[0], torch.get_num_threads())
    return out.reshape(*x.shape[:-1], weight.shape[0])


def kernels_for(*tensors: torch.Tensor) -> Kernels | None:
    """The kernels, if they are built and every tensor is what they read: contiguous float32 on the
    CPU, outside autograd."""
    kernels = compiled()
    if kernels is None or not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                  and not t.requires_grad for t in tensors):
        return None
    return kernels


def rows_finite(logits: torch.Tensor, n: int) -> torch.Tensor:
    """(B, V) -> (B,) bool: whether each row's first n values are all finite."""
    if (kernels := kernels_for(logits)) is None:
        real = logits[:, :n]  # NaN carries through max and min; inf shows there
        return torch.isfinite(real.amax(dim=-1)) & torch.isfinite(real.amin(dim=-1))
    finite = torch.empty(logits.shape[0], dtype=torch.bool)
    kernels.rows_finite(logits.data_ptr(), *logits.shape, n, finite.data_ptr())
    return finite


def rows_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) without NaN -> (B,) int64: logits.argmax(dim=-1), the first of ties."""
    if (kernels := kernels_for(logits)) is None:
        return logits.argmax(dim=-1)
    index = torch.empty(logits.shape[0], dtype=torch.int64)
    kernels.rows_argmax(logits.data_ptr(), *logits.shape, index.data_ptr())
    return index


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same
    function within float rounding. For a prefill's many rows (the MLP keeps nn.GELU on a decode
    step's few): in place in one vectorised pass (linear.c), else in torch, still twice as fast
    as torch's own GELU kernel."""
    # x: (..., C) -> (..., C)
    if (kernels := kernels_for(x)) is not None:
        kernels.gelu_tanh(x.data_ptr(), x.numel(), torch.get_num_threads())
        return x
    c = 2 * math.sqrt(2 / math.pi)
    return (x * x).mul_(0.044715 * c).add_(c).mul_(x).sigmoid_().mul_(x)


def prefill_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                      n_head: int, scale: float) -> torch.Tensor | None:
    """A prefill chunk's causal attention for one row (attention.c), its keys and values already in
    the cache: query t (position start + t) attends to slots 0..start + t. None where the kernel
    does not apply (then the caller takes torch's path)."""
    # qkv: (1, T, 3C), k_cache, v_cache: (1, nh, S, hs) -> (1, T, C)
    kernels = kernels_for(qkv, k_cache, v_cache)
    _, T, three_c = qkv.shape
    if kernels is None or qkv.shape[0] != 1:
        return None
    out = torch.empty(1, T, three_c // 3)
    if not kernels.prefill_attention(qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                                     T, start, n_head, k_cache.shape[2], k_cache.shape[3], scale,
                                     torch.get_num_threads()):
        return None
    return out


def convert(source: torch.Tensor, fmt: str, transpose: bool, file: tuple[int, int] | None = None,
            arena: Arena | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """A checkpoint's float32 tensor (rows, cols) as a weight in `fmt` (formats.py), transposed
    to (cols, rows) for a Conv1D, in one pass on every thread (convert.c): (the weight, its
    per-row scale or None, whether every value was finite), the same bits as formats.encode. With
    `file` (descriptor, byte offset), the values are read from there (pread), and `source` (a
    memory map of them) gives only the shape: its pages are never touched. The weight and its
    scale are written into `arena` if one is given. None where the kernels cannot (then:
    formats.encode); OSError if the file cannot be read."""
    if (kernels := kernels_for(source)) is None or source.dim() != 2:
        return None
    rows, cols = source.shape
    empty = (arena or Arena(0)).empty
    stored = empty((cols, rows) if transpose else (rows, cols), STORAGE[fmt])
    scale = empty((stored.shape[0],), torch.float32) if fmt == "int8" else None
    fd, offset = file or (-1, 0)
    finite = kernels.convert(None if file else source.data_ptr(), fd, offset, rows, cols, int(transpose),
                             FORMAT_CODES[stored.dtype], stored.data_ptr(),
                             None if scale is None else scale.data_ptr(), torch.get_num_threads())
    if finite < 0:
        raise OSError("the weights could not be read")
    return stored, scale, bool(finite)
