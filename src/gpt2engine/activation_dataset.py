"""`gpt2 activations`: the activations of every token of a corpus at chosen hook points, written in
shards that sparse-autoencoder training reads.

The corpus is tokenized into one stream (documents joined by <|endoftext|>) and cut into rows of
`context` tokens, each starting with <|endoftext|> as SAELens prepends it; the last partial row is
dropped. Rows go through the model in batches, only as far as the last block hooked (no LM head),
and every `shard_rows` rows become one safetensors shard: a (rows, context, *shape) float32 tensor
per hook, TransformerLens' shapes per token, and the rows' token_ids. manifest.json says what was
asked and which shards are done, written after each shard, so an interrupted run resumes where it
stopped when run again with the same settings; an output of other settings is never touched.
`--format saelens` then also writes the Hugging Face dataset that SAELens' cached activations read
(`datasets.load_from_disk`, one Array2D (context, d_in) column per hook and `token_ids`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpt2engine.errors import GPT2EngineError
from gpt2engine.evaluation import read_jsonl, read_text
from gpt2engine.hooks import Hooks, check_hooks, position_shape, split_name
from gpt2engine.model import GPT2
from gpt2engine.tokenizer import Tokenizer

FORMAT = "gpt2engine-activations/1"
FORMATS = ("safetensors", "saelens")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Settings:
    """What an output folder was made with; a run resumes a folder only of the same settings."""

    model: str
    hooks: tuple[str, ...]
    context: int
    prepend_eot: bool
    input_sha256: str
    shard_rows: int
    format: str


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """A corpus: JSON lines (.jsonl, .json), one object with a `text_field` string per line, or
    plain UTF-8 text, one document; read as evaluation reads its files (bounded, checked)."""
    if path.suffix in (".jsonl", ".json"):
        return [record[text_field] for _, record in read_jsonl(path, {text_field: str})]
    return [read_text(path)]


def token_rows(tokenizer: Tokenizer, documents: list[str], context: int, prepend_eot: bool) -> torch.Tensor:
    """The corpus as rows of `context` tokens -> (rows, context) int64: one stream of the documents
    joined by <|endoftext|>, each row led by <|endoftext|> if `prepend_eot`."""
    eot = tokenizer.eot_id
    if eot is None and (prepend_eot or len(documents) > 1):
        raise GPT2EngineError("the tokenizer has no <|endoftext|> to join documents and start rows with")
    stream: list[int] = []
    for i, document in enumerate(documents):
        if i:
            stream.append(eot)  # type: ignore[arg-type]
        stream += tokenizer.encode(document)
    width = context - prepend_eot
    rows = len(stream) // width
    if rows == 0:
        raise GPT2EngineError(f"the input has {len(stream)} tokens, fewer than one row of {width}")
    ids = torch.tensor(stream[: rows * width]).view(rows, width)
    return torch.cat((torch.full((rows, 1), eot), ids), dim=1) if prepend_eot else ids  # type: ignore[arg-type]


def check_names(names: list[str], model: GPT2, context: int) -> tuple[str, ...]:
    hooks = check_hooks(names, model.config.n_layer)
    if not hooks:
        raise GPT2EngineError("--hooks: name at least one hook point")
    patterns = [n for n in hooks if split_name(n)[1] == "attn.hook_pattern"]
    if patterns:
        raise GPT2EngineError(f"{patterns[0]!r} is per pair of positions, not per token: capture it with "
                              f"run_with_cache or the server's `capture`")
    if not 1 < context <= model.config.n_positions:
        raise GPT2EngineError(f"--context must be in [2, {model.config.n_positions}], got {context}")
    return hooks


def start_or_resume(out: Path, settings: Settings) -> dict:
    """The manifest to go on with: a new one for a new or empty folder, the folder's own where it
    holds an unfinished run of the same settings; otherwise an error, and nothing is touched."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            theirs = Settings(**{**manifest["settings"], "hooks": tuple(manifest["settings"]["hooks"])})
        except (ValueError, KeyError, TypeError):
            raise GPT2EngineError(f"{manifest_path} is not an activation dataset's manifest; choose "
                                  f"another --out (nothing was changed)") from None
        if theirs != settings:
            differ = [k for k, v in asdict(settings).items() if asdict(theirs)[k] != v]
            raise GPT2EngineError(f"{out} holds activations of other settings ({', '.join(differ)} "
                                  f"differ); choose another --out (nothing was changed)")
        if manifest["complete"]:
            raise GPT2EngineError(f"{out} already holds this complete dataset; nothing was written")
        for shard in manifest["shards"]:
            if not (out / shard["file"]).is_file():
                raise GPT2EngineError(f"{out / shard['file']} is missing; the run cannot resume")
        return manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GPT2EngineError(f"{out} exists and is not an activation dataset; choose another --out "
                              f"(nothing was changed)")
    # the hooks' shapes and the rows are the caller's to add, as it knows them
    return {"format": FORMAT, "settings": asdict(settings) | {"hooks": list(settings.hooks)},
            "dtype": "float32", "shards": [], "complete": False}


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all: a crash never leaves half a manifest."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def blocks_needed(hooks: tuple[str, ...]) -> int | None:
    """How many blocks must run to reach every hook (None: all, and the final LayerNorm); block L's
    hook_resid_pre is where the first L blocks end."""
    if "ln_final.hook_normalized" in hooks:
        return None
    return max(0 if layer is None else layer if short == "hook_resid_pre" else layer + 1
               for layer, short in map(split_name, hooks))


@torch.inference_mode()
def write_activations(
    model: GPT2, tokenizer: Tokenizer, documents: list[str], names: list[str], out: Path, *, context: int,
    model_name: str, input_sha256: str, format: str = "safetensors", batch_size: int = 8,
    shard_mib: float = 256, prepend_eot: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Write (or finish writing) the dataset into `out` -> its manifest. `progress(tokens done,
    tokens in all, tokens/s)` is called after each batch."""
    if format not in FORMATS:
        raise GPT2EngineError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    hooks = check_names(names, model, context)
    per_token = {name: position_shape(name, model.config, 0) for name in hooks}
    row_bytes = 4 * context * sum(math.prod(shape) for shape in per_token.values())
    shard_rows = max(1, int(shard_mib * 2**20) // row_bytes)
    settings = Settings(model_name, hooks, context, prepend_eot, input_sha256, shard_rows, format)
    manifest = start_or_resume(out, settings)
    rows = token_rows(tokenizer, documents, context, prepend_eot)
    stop = blocks_needed(hooks)
    out.mkdir(parents=True, exist_ok=True)
    manifest |= {"hooks": {n: list(s) for n, s in per_token.items()}, "rows": len(rows),
                 "tokens": len(rows) * context}
    write_json(out / MANIFEST, manifest)
    done = resumed_at = sum(s["rows"] for s in manifest["shards"])
    started = time.perf_counter()
    while done < len(rows):
        shard = rows[done : done + shard_rows]
        values: dict[str, list[torch.Tensor]] = {name: [] for name in hooks}
        for b in range(0, len(shard), batch_size):
            batch = shard[b : b + batch_size]
            recorder = Hooks(hooks)
            model.hidden_states(batch.to(model.device), hooks=recorder, stop_at_layer=stop)
            for name in hooks:
                values[name].append(recorder.cache[name].to("cpu", torch.float32))
            if progress:
                rows_now = done + b + len(batch)
                progress(rows_now * context, len(rows) * context,
                         (rows_now - resumed_at) * context / (time.perf_counter() - started))
        save_shard(out, len(manifest["shards"]), values, shard)
        manifest["shards"].append({"file": shard_name(len(manifest["shards"])), "rows": len(shard)})
        done += len(shard)
        write_json(out / MANIFEST, manifest)
    if settings.format == "saelens":
        write_saelens(out, manifest)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return manifest


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def save_shard(out: Path, index: int, values: dict[str, list[torch.Tensor]], token_ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {name: torch.cat(parts).contiguous() for name, parts in values.items()}
    tensors["token_ids"] = token_ids.to(torch.int32).contiguous()
    partial = out / (shard_name(index) + ".partial")
    save_file(tensors, str(partial), metadata={"format": FORMAT})
    os.replace(partial, out / shard_name(index))


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_saelens(out: Path, manifest: dict) -> None:
    """The shards as the Hugging Face dataset SAELens reads for cached activations: a column per
    hook of Array2D (context, d_in), heads flattened as SAELens flattens them, and token_ids."""
    try:
        import datasets
    except ImportError:
        raise GPT2EngineError("--format saelens needs the datasets package: pip install datasets") from None
    context = manifest["settings"]["context"]
    widths = {name: math.prod(shape) for name, shape in manifest["hooks"].items()}
    features = datasets.Features({
        **{name: datasets.Array2D(shape=(context, d_in), dtype="float32") for name, d_in in widths.items()},
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=context)})

    def rows():
        for shard in manifest["shards"]:
            tensors = read_shard(out / shard["file"])
            for r in range(shard["rows"]):
                row = {name: tensors[name][r].reshape(context, -1).numpy() for name in widths}
                yield row | {"token_ids": tensors["token_ids"][r].numpy()}

    cache = out / ".datasets-cache"
    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache))
    dataset.save_to_disk(str(out / "saelens"))
    shutil.rmtree(cache, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def print_progress(tokens: int, total: int, rate: float) -> None:
    """One line on stderr, rewritten in place: tokens done of all, and tokens/s."""
    print(f"\r[activations] {tokens:,}/{total:,} tokens ({100 * tokens / total:.0f}%), "
          f"{rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True)
