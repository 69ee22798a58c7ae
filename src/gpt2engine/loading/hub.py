"""Turn a model name or a folder into a local checkpoint folder.

A folder is used as it is. A Hub id (`gpt2`, `openai-community/gpt2-medium`, a fine-tune) goes
through huggingface_hub's cache, so `HF_HOME` and `HF_HUB_OFFLINE` behave as in every other
Hugging Face tool. Only the files the engine reads are fetched: the Hub's GPT-2 repos also hold
TensorFlow, Flax, ONNX and Rust copies of the weights, gigabytes we would never open.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt2engine.errors import GPT2EngineError
from gpt2engine.loading.training import is_training_checkpoint

CONFIG_AND_TOKENIZER = ["config.json", "vocab.json", "merges.txt", "tokenizer.json"]
SAFETENSORS_WEIGHTS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PYTORCH_WEIGHTS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local folder holding `name_or_path`, downloading it into the Hub cache if needed; or
    the file itself, when it is a nanoGPT or llm.c checkpoint (loading/training.py)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or is_training_checkpoint(path):
        return path
    if path.exists():
        raise GPT2EngineError(f"{path}: is a file, but not a nanoGPT (ckpt.pt) or llm.c (.bin) checkpoint; "
                              "for a Hugging Face checkpoint pass its folder")
    if not HUB_ID.match(str(name_or_path)):
        raise GPT2EngineError(f"{path}: no such folder")
    return download(str(name_or_path), revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, tokenizer and weights (safetensors, else .bin) of a Hub repo into the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=CONFIG_AND_TOKENIZER + SAFETENSORS_WEIGHTS
        ))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(
                repo_id, revision=revision, allow_patterns=CONFIG_AND_TOKENIZER + PYTORCH_WEIGHTS
            ))
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise GPT2EngineError(
            f"{where} is not a local folder and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {reason}; download it elsewhere or pass the "
            f"path of a checkpoint folder (config.json + weights)"
        ) from None
    except GatedRepoError:
        raise GPT2EngineError(f"{where}: gated repository; log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise GPT2EngineError(f"{where}: no such model on the Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise GPT2EngineError(f"{where}: no such revision on the Hub") from None
    except (HfHubHTTPError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GPT2EngineError(f"{where}: download failed ({message})") from None
    return folder
