"""Weight surgery between Hugging Face GPT-2 checkpoints and our GPT2 module, both directions.

Hugging Face stores GPT-2 as OpenAI did: the four projections inside each block are `Conv1D`
modules whose weight is (in_features, out_features), the transpose of `nn.Linear`'s
(out_features, in_features). Everything else keeps its name once the `transformer.` prefix is
dropped. This is the only file that knows the Hugging Face key names and the Conv1D layout.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt2engine.config import GPT2Config
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hub import resolve_checkpoint
from gpt2engine.model import GPT2

# Conv1D weights: stored (in, out) in the checkpoint, transposed into Linear's (out, in).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that older checkpoints saved beside the weights; we build masks ourselves.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
TIED_HEAD = "lm_head.weight"


def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D_WEIGHTS)


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint key."""
    return name if name == TIED_HEAD else PREFIX + name


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors first, then pytorch_model.bin; sharded or not."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            return shard_files(folder, folder / index)
        if (folder / single).is_file():
            return [folder / single]
    raise GPT2EngineError(
        f"{folder}: no weights found (looked for model.safetensors, pytorch_model.bin "
        "and their sharded .index.json forms)"
    )


def shard_files(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise GPT2EngineError(f"{index}: not a valid shard index ({error!r})") from None
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise GPT2EngineError(f"{index}: shard {missing[0]} is missing from {folder}")
    return [folder / name for name in names]


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read a .safetensors file one tensor at a time, each straight into its own buffer.

    The format is a little-endian u64 header length, a JSON header of {name: dtype, shape,
    data_offsets}, then the raw bytes. Plain reads instead of a memory map mean no page of the
    file stays resident once its tensor is converted: loading peaks at about one copy of the
    weights plus the largest tensor.
    """
    with open(file, "rb") as handle:
        size = file.stat().st_size
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ValueError(f"{key} ends past the end of the file (truncated?)")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            buffer = bytearray(end - begin)
            handle.seek(data_start + begin)
            handle.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield key, flat.reshape(info["shape"])


def read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from each file; .bin files are unpickled with weights_only=True."""
    for file in files:
        try:
            if file.suffix == ".safetensors":
                yield from read_safetensors(file)
            else:
                yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
        except Exception as error:  # corrupt or truncated files fail in many library-specific ways
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GPT2EngineError(f"{file}: not a readable weight file ({reason})") from None


def convert_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]], model: GPT2, dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Map Hugging Face keys onto `model`'s parameters, transposing Conv1D and checking shapes.

    Shapes are compared in the checkpoint's own layout, so a message names the key and the
    shape exactly as they appear in the file.
    """
    expected = {  # in the file's layout: Conv1D weights are (in, out)
        name: tuple(t.shape)[::-1] if is_conv1d(name) else tuple(t.shape)
        for name, t in model.state_dict().items()
    }
    tied = model.config.tie_word_embeddings
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in tensors:
        name = key.removeprefix(PREFIX)
        if name.endswith(MASK_BUFFERS):
            continue
        if name not in expected:
            problems.append(f"unexpected tensor {key} of shape {tuple(tensor.shape)}")
            continue
        if tuple(tensor.shape) != expected[name]:
            problems.append(f"{key}: expected shape {expected[name]}, found {tuple(tensor.shape)}")
            continue
        if name == TIED_HEAD and tied:
            continue  # the head is the token embedding; the stored copy adds nothing
        tensor = tensor.t() if is_conv1d(name) else tensor
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
    problems += [f"missing tensor {hf_name(name)} (expected shape {shape})"
                 for name, shape in expected.items()
                 if name not in state and not (name == TIED_HEAD and tied)]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise GPT2EngineError(f"checkpoint does not fit the config: {problems[0]}{more}")
    if tied:
        state[TIED_HEAD] = state["wte.weight"]
    return state


def load_model(
    name_or_path: str | Path, *, revision: str | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> GPT2:
    """Build GPT2 on the meta device and assign the converted tensors: one copy of the weights."""
    folder = resolve_checkpoint(name_or_path, revision)
    config = GPT2Config.from_json_file(folder / "config.json")
    with torch.device("meta"):
        model = GPT2(config)
    state = convert_checkpoint(read_tensors(weight_files(folder)), model, dtype, device)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def to_hf_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face keys, Conv1D weights transposed back to (in, out)."""
    tied = model.config.tie_word_embeddings
    return {
        hf_name(name): (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if not (name == TIED_HEAD and tied)
    }


def save_model(model: GPT2, folder: str | Path, *, overwrite: bool = False) -> None:
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads as-is.

    Existing checkpoint files are never replaced unless `overwrite` is set, and each file is
    written beside its destination and renamed into place, so a failure leaves no half file.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    targets = {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise GPT2EngineError(f"{existing[0]} already exists; refusing to overwrite it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".gpt2engine-") as scratch:
            staged_weights = Path(scratch) / "model.safetensors"
            save_file(to_hf_state_dict(model), staged_weights, metadata={"format": "pt"})
            staged_config = Path(scratch) / "config.json"
            staged_config.write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
            os.replace(staged_weights, targets["model.safetensors"])
            os.replace(staged_config, targets["config.json"])
    except OSError as error:
        raise GPT2EngineError(f"{folder}: cannot write the checkpoint ({error.strerror})") from None
