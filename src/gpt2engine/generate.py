"""`complete` and `stream`: the Python API for generation, a client of the engine loop.

Each call builds an engine sized for its prompts (one cache row each, as long as the longest
prompt plus `max_new_tokens`), adds the prompts and steps until they are done. Every row gets
the tokens its prompt would get alone. This file knows nothing of terminals or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpt2engine.engine import Engine, GenerationOptions, GenerationResult, prompt_ids
from gpt2engine.errors import GPT2EngineError
from gpt2engine.model import GPT2
from gpt2engine.tokenizer import Tokenizer

__all__ = ["GenerationOptions", "GenerationResult", "complete", "stream"]


def start(
    model: GPT2, tokenizer: Tokenizer, prompts: list[str] | list[list[int]], options: GenerationOptions
):
    """An engine with one row per prompt, and the prompts added to it."""
    if not isinstance(prompts, list) or not prompts:
        raise GPT2EngineError("prompts must be a non-empty list")
    if not isinstance(options, GenerationOptions):
        raise GPT2EngineError("options must be a GenerationOptions")
    ids = [prompt_ids(model, tokenizer, p) for p in prompts]
    longest = min(max(map(len, ids)) + options.max_new_tokens, model.config.n_positions)
    engine = Engine(model, tokenizer, max_batch=len(ids), max_queue=0, max_len=longest)
    return engine, [engine.add_request(i, options) for i in ids]  # each checked to fit there


def stream(
    model: GPT2, tokenizer: Tokenizer, prompt: str, options: GenerationOptions | None = None
) -> Iterator[str]:
    """Yield the response to `prompt` piece by piece as it is generated."""
    if not isinstance(prompt, str):
        raise GPT2EngineError("prompt must be a string")
    engine, requests = start(model, tokenizer, [prompt], options or GenerationOptions())
    for output in engine.run(requests):
        if output.text:
            yield output.text
    raise_if_failed(requests)


def complete(
    model: GPT2, tokenizer: Tokenizer, prompts: list[str], options: GenerationOptions | None = None
) -> list[GenerationResult]:
    """Generate for every prompt together and return each one's whole result."""
    engine, requests = start(model, tokenizer, prompts, options or GenerationOptions())
    for _ in engine.run(requests):
        pass
    raise_if_failed(requests)
    return [r.result() for r in requests]


def raise_if_failed(requests) -> None:
    for request in requests:
        if request.finish_reason == "error":
            raise GPT2EngineError(request.error)
