"""The continuous-batching engine: request.py (what is asked), scheduler.py (who runs when),
runner.py (the tensors), engine.py (the loop)."""

from gpt2engine.engine.engine import Engine, fit_prompt, prompt_ids
from gpt2engine.engine.request import (
    GenerationOptions,
    GenerationResult,
    Request,
    StepOutput,
    TokenLogprob,
)
from gpt2engine.engine.scheduler import QueueFull

__all__ = ["Engine", "GenerationOptions", "GenerationResult", "QueueFull", "Request", "StepOutput",
           "TokenLogprob", "fit_prompt", "prompt_ids"]
