"""The continuous-batching engine: request.py (what is asked), scheduler.py (who runs when),
runner.py (the tensors), engine.py (the loop).

The names below are imported on first use, so request.py's plain-Python options can be checked
(the CLI's flags, before the tokenizer is parsed) without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpt2engine import lazy_exports

_EXPORTS = {
    "Engine": "gpt2engine.engine.engine",
    "prompt_ids": "gpt2engine.engine.engine",
    "GenerationOptions": "gpt2engine.engine.request",
    "GenerationResult": "gpt2engine.engine.request",
    "Request": "gpt2engine.engine.request",
    "StepOutput": "gpt2engine.engine.request",
    "TokenLogprob": "gpt2engine.engine.request",
    "QueueFull": "gpt2engine.engine.scheduler",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from gpt2engine.engine.engine import Engine as Engine
    from gpt2engine.engine.engine import prompt_ids as prompt_ids
    from gpt2engine.engine.request import GenerationOptions as GenerationOptions
    from gpt2engine.engine.request import GenerationResult as GenerationResult
    from gpt2engine.engine.request import Request as Request
    from gpt2engine.engine.request import StepOutput as StepOutput
    from gpt2engine.engine.request import TokenLogprob as TokenLogprob
    from gpt2engine.engine.scheduler import QueueFull as QueueFull
