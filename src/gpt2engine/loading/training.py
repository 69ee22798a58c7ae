"""Checkpoints that training code writes, read as a config and Hugging Face-named tensors:
nanoGPT's `ckpt.pt` (train.py) and llm.c's `gpt2_124M.bin` / `gpt2_124M_bf16.bin`
(train_gpt2.py's write_model). Neither carries tokenizer files: both are GPT-2's vocabulary
(tokenizer.tokenizer_folder gives the bundled one).

Both keep their matrices as nn.Linear does, (out, in), where Hugging Face's Conv1D keeps (in, out):
the tensors are handed on in Hugging Face's layout and under its names, so the one weight surgery
(weights.convert_checkpoint) checks and converts them as it does any checkpoint.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2engine.config import GPT2Config
from gpt2engine.errors import GPT2EngineError

if TYPE_CHECKING:  # (hub.py asks is_training_checkpoint before torch is imported)
    import torch

    Tensors = Iterator[tuple[str, torch.Tensor, None]]

LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}  # train_gpt2.py's write_model
LLMC_HEADER_INTS = 256
LINEAR_LAYOUT = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_training_checkpoint(path: Path) -> bool:
    """A file that is nanoGPT's (a zip of a torch.save) or llm.c's (its magic number first)."""
    return path.is_file() and (is_llmc(path) or zipfile.is_zipfile(path))


def is_llmc(path: Path) -> bool:
    """llm.c's files begin with its magic number."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return len(head) == 4 and struct.unpack("<i", head)[0] == LLMC_MAGIC


def read_training_checkpoint(path: Path) -> tuple[GPT2Config, Tensors]:
    """The config and the tensors (Hugging Face names and layout) of a nanoGPT or llm.c file."""
    return read_llmc(path) if is_llmc(path) else read_nanogpt(path)


def hf_layout(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, None]:
    """A (out, in) matrix under its Hugging Face key, in Conv1D's (in, out) layout: written out
    whole, one matrix at a time, so the weight surgery converts it as it converts any
    checkpoint's (on the CPU, in one C pass into the weights' block of huge pages)."""
    return f"transformer.{name}", tensor.t().contiguous() if name.endswith(LINEAR_LAYOUT) else tensor, None


# nanoGPT ---------------------------------------------------------------------------------------


def read_nanogpt(path: Path) -> tuple[GPT2Config, Tensors]:
    """train.py's checkpoint: {"model_args": {n_layer, n_head, n_embd, block_size, bias,
    vocab_size, ...}, "model": state dict, ...}, unpickled with weights_only (no code runs). Keys
    may carry torch.compile's `_orig_mod.` prefix; with bias=False there are no biases (zeros here).
    nanoGPT's MLP uses the exact GELU."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a pickle with code, a truncated zip: many ways to fail
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GPT2EngineError(f"{path}: not a readable nanoGPT checkpoint ({reason})") from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("model_args"), dict)
        or not isinstance(checkpoint.get("model"), dict)
    ):
        raise GPT2EngineError(f"{path}: not a nanoGPT checkpoint (no 'model_args' and 'model')")
    args = checkpoint["model_args"]
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise GPT2EngineError(f"{path}: model_args lacks {', '.join(missing)}")
    try:
        config = GPT2Config(
            vocab_size=args["vocab_size"],
            n_positions=args["block_size"],
            n_embd=args["n_embd"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            activation_function="gelu",
        )
    except GPT2EngineError as error:
        raise GPT2EngineError(f"{path}: model_args: {str(error).removeprefix('config: ')}") from None
    state = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise GPT2EngineError(f"{path}: model entry {key!r} is a {type(value).__name__}, not a tensor")
    if args.get("bias", True) is False:
        state |= zero_biases(config)
    tensors = (
        hf_layout(key.removeprefix("transformer."), value)
        for key, value in state.items()
        if key != "lm_head.weight"
    )  # tied to the token embedding
    return config, tensors


def zero_biases(config: GPT2Config) -> dict[str, torch.Tensor]:
    """The biases a bias=False nanoGPT model does without, as zeros."""
    import torch

    C = config.n_embd
    widths = {
        "ln_1.bias": C,
        "attn.c_attn.bias": 3 * C,
        "attn.c_proj.bias": C,
        "ln_2.bias": C,
        "mlp.c_fc.bias": config.mlp_width,
        "mlp.c_proj.bias": C,
    }
    biases = {
        f"transformer.h.{i}.{name}": torch.zeros(width)
        for i in range(config.n_layer)
        for name, width in widths.items()
    }
    return biases | {"transformer.ln_f.bias": torch.zeros(C)}


# llm.c -----------------------------------------------------------------------------------------


def llmc_shapes(config: GPT2Config, padded_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of an llm.c file in their order, each layer's stacked: (name, shape)."""
    C, L, T, F = config.n_embd, config.n_layer, config.n_positions, config.mlp_width
    return [
        ("wte.weight", (padded_vocab, C)),
        ("wpe.weight", (T, C)),
        ("ln_1.weight", (L, C)),
        ("ln_1.bias", (L, C)),
        ("attn.c_attn.weight", (L, 3 * C, C)),
        ("attn.c_attn.bias", (L, 3 * C)),
        ("attn.c_proj.weight", (L, C, C)),
        ("attn.c_proj.bias", (L, C)),
        ("ln_2.weight", (L, C)),
        ("ln_2.bias", (L, C)),
        ("mlp.c_fc.weight", (L, F, C)),
        ("mlp.c_fc.bias", (L, F)),
        ("mlp.c_proj.weight", (L, C, F)),
        ("mlp.c_proj.bias", (L, C)),
        ("ln_f.weight", (C,)),
        ("ln_f.bias", (C,)),
    ]


def read_llmc(path: Path) -> tuple[GPT2Config, Tensors]:
    """train_gpt2.py's write_model: 256 int32s (magic, version, block_size, vocab_size, n_layer,
    n_head, n_embd, padded vocab size), then every tensor in float32 (version 3) or bfloat16 (5),
    the vocabulary padded with zero rows. The header and the file's size are checked against each
    other before anything is allocated; the tensors are views of a private memory map."""
    import mmap

    import torch

    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(4 * LLMC_HEADER_INTS)
        if len(raw) < 4 * LLMC_HEADER_INTS:
            raise GPT2EngineError(
                f"{path}: an llm.c header is {4 * LLMC_HEADER_INTS} bytes; the file has {size}"
            )
        header = struct.unpack(f"<{LLMC_HEADER_INTS}i", raw)
        version, block, vocab, layers, heads, width, padded = header[1:8]
        if version not in LLMC_VERSIONS:
            raise GPT2EngineError(
                f"{path}: llm.c checkpoint version {version} is not one we read "
                f"({', '.join(map(str, LLMC_VERSIONS))})"
            )
        if not vocab <= padded:
            raise GPT2EngineError(f"{path}: llm.c header: padded vocabulary {padded} is below {vocab}")
        try:
            config = GPT2Config(
                vocab_size=padded, n_positions=block, n_embd=width, n_layer=layers, n_head=heads
            )
        except GPT2EngineError as error:
            raise GPT2EngineError(f"{path}: llm.c header: {str(error).removeprefix('config: ')}") from None
        dtype = getattr(torch, LLMC_VERSIONS[version])
        shapes = llmc_shapes(config, padded)
        counts = [torch.Size(shape).numel() for _, shape in shapes]
        expected = 4 * LLMC_HEADER_INTS + sum(counts) * dtype.itemsize
        if size != expected:
            raise GPT2EngineError(
                f"{path}: the llm.c header describes {expected:,} bytes, the file "
                f"has {size:,} ({'truncated' if size < expected else 'more than that'})"
            )
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    values = torch.frombuffer(mapped, dtype=dtype, offset=4 * LLMC_HEADER_INTS, count=sum(counts))
    return config, llmc_tensors(values, shapes, counts)


def llmc_tensors(
    values: torch.Tensor, shapes: list[tuple[str, tuple[int, ...]]], counts: list[int]
) -> Tensors:
    offset = 0
    for (name, shape), count in zip(shapes, counts, strict=True):
        tensor = values[offset : offset + count].view(shape)
        offset += count
        if name.startswith(("wte", "wpe", "ln_f")):
            yield hf_layout(name, tensor)
        else:
            for layer, per_layer in enumerate(tensor):
                yield hf_layout(f"h.{layer}.{name}", per_layer)
