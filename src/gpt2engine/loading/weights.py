"""Weight surgery between Hugging Face GPT-2 checkpoints and our GPT2 module, both directions.

Hugging Face stores GPT-2 as OpenAI did: the four projections inside each block are `Conv1D`
modules whose weight is (in_features, out_features), the transpose of `nn.Linear`'s
(out_features, in_features). Everything else keeps its name once the `transformer.` prefix is
dropped. This is the only file that knows the Hugging Face key names and the Conv1D layout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gpt2engine import formats, kernels
from gpt2engine.config import GPT2Config
from gpt2engine.errors import GPT2EngineError
from gpt2engine.loading.arena import Arena, padded
from gpt2engine.loading.hub import resolve_checkpoint
from gpt2engine.loading.training import read_training_checkpoint
from gpt2engine.model import GPT2, Embedding, Linear

# Conv1D weights: stored (in, out) in the checkpoint, transposed into Linear's (out, in).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that older checkpoints saved beside the weights; we build masks ourselves.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
TIED_HEAD = "lm_head.weight"
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # glibc's mallopt parameters


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
    unsafe = [name for name in names if not isinstance(name, str) or Path(name).name != name
              or name in ("", ".", "..") or "\\" in name]
    if unsafe:
        raise GPT2EngineError(f"{index}: shard name {unsafe[0]!r} is not a plain file name in {folder}")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise GPT2EngineError(f"{index}: shard {missing[0]} is missing from {folder}")
    return [folder / name for name in names]


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@contextlib.contextmanager
def large_buffers_returned() -> Iterator[None]:
    """While loading, have glibc give buffers of 128 KiB and up back to the system when freed. By
    default it raises that threshold to the largest buffer freed so far, so the tensors read and
    converted one after another leave a heap of freed ones behind (measured: docs/loading.md).
    Afterwards the thresholds are where glibc's own
    rule ends up (32 MiB; trimming at twice that): the many temporaries of inference must come from
    the heap, not from fresh pages. Before the weights come in, the free memory inside the heap
    goes back too (malloc_trim): what earlier steps freed, such as the tokenizer's files parsed.
    Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    malloc_trim(0)
    mallopt(M_MMAP_THRESHOLD, 128 * 2**10)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        mallopt(M_TRIM_THRESHOLD, 64 * 2**20)


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor, tuple[int, int]]]:
    """The tensors of a .safetensors file, each a view of a private memory map of it, with where
    its bytes lie in the file (descriptor, offset; open while the tensors are being read).

    The format is a little-endian u64 header length, a JSON header of {name: dtype, shape,
    data_offsets}, then the raw bytes. Mapping the file reads nothing up front. On the CPU the
    loader reads each tensor from the file instead (kernels.convert, read_at): through the map,
    the kernel would map the page cache's large folios whole, the neighbours' pages with each
    tensor's, and they would stay counted in this process. So loading holds the weights once,
    never the file as well, and keeps no view of the map. The mapping is copy-on-write: nothing is
    ever written to the file.
    """
    with open(file, "rb") as handle:
        size = file.stat().st_size
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for key, info in entries:
            if data_start + info["data_offsets"][1] > size:
                raise ValueError(f"{key} ends past the end of the file (truncated?)")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        for key, info in entries:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            raw = (torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
                   if end > begin else torch.empty(0, dtype=torch.uint8))
            yield key, raw.view(dtype).reshape(info["shape"]), (handle.fileno(), data_start + begin)


def read_pickled_state(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A pytorch_model.bin: weights_only unpickling (no code runs), memory-mapped when it is the
    zip format (the old format cannot be); a nested {"state_dict": {...}} is unwrapped."""
    import zipfile

    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        yield key, value


def read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, tuple[int, int] | None]]:
    """Yield (key, tensor, where its bytes lie in a file that is open: descriptor, offset; None
    when they do not lie there as they are) from each file; .bin files are unpickled with
    weights_only=True."""
    for file in files:
        try:
            if file.suffix == ".safetensors":
                yield from read_safetensors(file)
            else:
                yield from ((key, tensor, None) for key, tensor in read_pickled_state(file))
        except Exception as error:  # corrupt or truncated files fail in many library-specific ways
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GPT2EngineError(f"{file}: not a readable weight file ({reason})") from None


def read_at(where: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A copy of `like` (a view of a file's memory map) read from the file itself (pread at
    where = (descriptor, offset)). A read through the map would have the kernel map the large
    folio of the page cache around it whole: for a bias between two weights, the neighbours'
    pages too, counted in this process from then on."""
    fd, offset = where
    data = bytearray(like.numel() * like.element_size())
    unread = memoryview(data)
    while unread:
        got = os.preadv(fd, [unread], offset)
        if got <= 0:
            raise OSError("the file ended before the tensor did")
        unread, offset = unread[got:], offset + got
    return torch.frombuffer(data, dtype=like.dtype).view(like.shape) if data else torch.empty_like(like)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf, in one scan of the values (kernels.rows_finite): no temporaries the size of
    the tensor, and none of torch's reductions (their code takes memory the first time)."""
    return tensor.numel() == 0 or bool(kernels.rows_finite(tensor.reshape(1, -1), tensor.numel())[0])


def convert_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor, tuple[int, int] | None]], model: GPT2, dtype: torch.dtype,
    device: torch.device | str, weight_format: str | None = None,
) -> dict[str, torch.Tensor]:
    """Map Hugging Face keys onto `model`'s parameters, transposing Conv1D and checking shapes;
    with a weight format, the weights it applies to are encoded one by one as they are read. On
    the CPU the weights a decode step streams are written into one block of huge pages (arena.py),
    and the rest (LayerNorms, biases, positions) is read from the file as it is.

    Shapes are compared in the checkpoint's own layout, so a message names the key and the
    shape exactly as they appear in the file.
    """
    expected = {  # in the file's layout: Conv1D weights are (in, out)
        name: tuple(t.shape)[::-1] if is_conv1d(name) else tuple(t.shape)
        for name, t in model.state_dict().items() if not name.endswith(".scale")
    }
    formatted = set(formatted_weights(model))
    encoded = formatted if weight_format else set()
    fmt = weight_format or "float32"
    on_cpu = torch.device(device).type == "cpu" and dtype == torch.float32
    tied = model.config.tie_word_embeddings
    # on the CPU, the weights that a decode step streams are converted into one block (arena.py)
    streamed = {name: model.get_parameter(name).shape for name in expected
                if on_cpu and (is_conv1d(name) or name in formatted) and not (name == TIED_HEAD and tied)}
    block = Arena(sum(padded(shape.numel() * formats.STORAGE[fmt].itemsize)
                      + (padded(4 * shape[0]) if fmt == "int8" else 0) for shape in streamed.values()))
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor, where in tensors:
        name = key.removeprefix(PREFIX)
        if name.endswith(MASK_BUFFERS) or (name == TIED_HEAD and tied):
            continue  # masks we build ourselves; the head is the token embedding
        if name not in expected:
            problems.append(f"unexpected tensor {key} of shape {tuple(tensor.shape)}")
            continue
        if tuple(tensor.shape) != expected[name]:
            problems.append(f"{key}: expected shape {expected[name]}, found {tuple(tensor.shape)}")
            continue
        if not tensor.is_floating_point():
            problems.append(f"{key} has dtype {str(tensor.dtype).removeprefix('torch.')}; weights "
                            "must be floating point")
            continue
        try:
            converted = (kernels.convert(tensor, fmt, is_conv1d(name), file=where, arena=block)
                         if name in streamed else None)  # one pass, every thread
            if converted is None and where is not None and on_cpu:
                tensor = read_at(where, tensor)  # as kernels.convert reads it: not through the map
        except OSError as error:
            raise GPT2EngineError(f"{key}: {error}") from None
        if converted is not None:
            state[name], scale, finite = converted
        else:
            finite = all_finite(tensor)
            tensor = (tensor.t() if is_conv1d(name) else tensor).to(device=device, dtype=dtype)
            if name in encoded:
                assert weight_format is not None  # encoded is empty without one
                state[name], scale = formats.encode(tensor, weight_format)
            else:
                state[name], scale = tensor.contiguous(), None
        if not finite:
            problems.append(f"{key} holds NaN or infinite values")
        if scale is not None:
            state[name.removesuffix("weight") + "scale"] = scale
    problems += [f"missing tensor {hf_name(name)} (expected shape {shape})"
                 for name, shape in expected.items()
                 if name not in state and not (name == TIED_HEAD and tied)]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise GPT2EngineError(f"checkpoint does not fit the config: {problems[0]}{more}")
    if tied:
        state[TIED_HEAD] = state["wte.weight"]
        if "wte.scale" in state:
            state["lm_head.scale"] = state["wte.scale"]
    return state


def formatted_modules(model: nn.Module) -> Iterator[tuple[str, Linear | Embedding]]:
    """(name, module) of what a format applies to: every linear layer and the token embedding."""
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
        weight = torch.empty(module.weight.shape, dtype=formats.STORAGE[fmt], device=module.weight.device)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.scale = torch.empty(rows, device=module.weight.device) if fmt == "int8" else None


def dense_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with every weight decoded to `dtype` and no scales: what exports write."""
    state = {name: t for name, t in model.state_dict().items() if not name.endswith(".scale")}
    for name, module in formatted_modules(model):
        if module.weight.dtype != dtype:
            state[f"{name}.weight"] = formats.decode(module.weight, module.scale, dtype)
    return state


def check_size(config: GPT2Config, files: list[Path]) -> None:
    """Refuse, before building anything, a config that asks for more weights than the files hold
    (a few-byte config.json must not make us build a model of a trillion parameters)."""
    stored = sum(f.stat().st_size for f in files)
    needed = config.parameter_count()  # bytes, at one byte a weight: a floor, not an estimate
    if stored < needed:  # (a config only somewhat off gets the named-tensor shape error instead)
        raise GPT2EngineError(
            f"config.json asks for {needed:,} parameters, but the weight files hold {stored:,} bytes: "
            "the config does not fit these weights")


def load_model(
    name_or_path: str | Path, *, revision: str | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    weight_format: str | None = None,
) -> GPT2:
    """Build GPT2 on the meta device and assign the converted tensors: one copy of the weights,
    in `weight_format` (formats.py) if one is given."""
    source = resolve_checkpoint(name_or_path, revision)
    tensors: Iterator[tuple[str, torch.Tensor, tuple[int, int] | None]] | None = None
    if source.is_file():  # nanoGPT's or llm.c's: the config and the tensors from one file
        config, tensors = read_training_checkpoint(source)
        files = [source]
    else:
        config = GPT2Config.from_json_file(source / "config.json")
        files = weight_files(source)
    check_size(config, files)
    if tensors is None:
        tensors = read_tensors(files)
    with torch.device("meta"):
        model = GPT2(config)
    if weight_format:
        prepare(model, weight_format)
    with large_buffers_returned():
        state = convert_checkpoint(tensors, model, dtype, device, weight_format)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def to_hf_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face keys, Conv1D weights transposed back to (in, out), weights
    in a smaller format decoded to the model's dtype."""
    tied = model.config.tie_word_embeddings
    return {
        hf_name(name): (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
        for name, tensor in dense_state_dict(model, model.dtype).items()
        if not (name == TIED_HEAD and tied)
    }


def save_model(
    model: GPT2, folder: str | Path, *, overwrite: bool = False, extra_files: tuple[Path, ...] = ()
) -> None:
    """Write config.json + model.safetensors (+ `extra_files`, e.g. the tokenizer's) that
    transformers' GPT2LMHeadModel loads as-is.

    All files are written into a scratch folder beside their destination, then put in place
    together: if one cannot be, those already placed are removed, so a failure leaves no half
    export. Existing names, symbolic links included (never written through), are refused unless
    `overwrite` is set, which replaces them (a link itself, not its target).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    names = ["config.json", "model.safetensors", *(path.name for path in extra_files)]
    existing = [folder / name for name in names if os.path.lexists(folder / name)]
    if existing and not overwrite:
        raise GPT2EngineError(f"{existing[0]} already exists; refusing to overwrite it")
    placed: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".gpt2engine-") as scratch:
            staged = Path(scratch)
            save_file(to_hf_state_dict(model), staged / "model.safetensors", metadata={"format": "pt"})
            (staged / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
            for path in extra_files:
                shutil.copyfile(path, staged / path.name)
            for name in names:
                if overwrite:
                    os.replace(staged / name, folder / name)
                else:
                    os.link(staged / name, folder / name)  # fails if the name appeared meanwhile
                placed.append(folder / name)
    except OSError as error:
        if not overwrite:
            for path in placed:
                path.unlink(missing_ok=True)
        raise GPT2EngineError(f"{folder}: cannot write the checkpoint ({error.strerror or error})") from None
