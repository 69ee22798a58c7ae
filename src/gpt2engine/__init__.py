"""gpt2engine: a GPT-2 inference engine written from scratch in PyTorch.

The names below are imported on first use, so `import gpt2engine` (and `gpt2 --help`) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "gpt2engine.engine",
    "GPT2": "gpt2engine.loading.pretrained",  # the model class with from_pretrained and save_pretrained
    "KVCache": "gpt2engine.model",
    "GPT2Config": "gpt2engine.config",
    "GPT2EngineError": "gpt2engine.errors",
    "GenerationOptions": "gpt2engine.engine",
    "GenerationResult": "gpt2engine.engine",
    "Hooks": "gpt2engine.hooks",
    "Steering": "gpt2engine.hooks",
    "complete": "gpt2engine.generate",
    "stream": "gpt2engine.generate",
    "SamplingParams": "gpt2engine.sampling_params",
    "Tokenizer": "gpt2engine.tokenizer",
}
__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` (PEP 562) that imports each name of `exports` from its module on
    first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from gpt2engine.config import GPT2Config as GPT2Config
    from gpt2engine.engine import Engine as Engine
    from gpt2engine.engine import GenerationOptions as GenerationOptions
    from gpt2engine.engine import GenerationResult as GenerationResult
    from gpt2engine.errors import GPT2EngineError as GPT2EngineError
    from gpt2engine.generate import complete as complete
    from gpt2engine.generate import stream as stream
    from gpt2engine.hooks import Hooks as Hooks
    from gpt2engine.hooks import Steering as Steering
    from gpt2engine.loading.pretrained import GPT2 as GPT2
    from gpt2engine.model import KVCache as KVCache
    from gpt2engine.sampling_params import SamplingParams as SamplingParams
    from gpt2engine.tokenizer import Tokenizer as Tokenizer
