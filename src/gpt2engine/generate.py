"""Text generation: prefill the prompt into the KV cache, then decode one token per step.

`prefill` and `decode_step` are separate functions over a preallocated cache, so the decode step
alone can be compiled or captured. Rows of a batch keep their own positions (slot p of the cache
holds position p of its row), so prompts of different lengths decode together and each row gets
the tokens it would get alone. This file knows nothing of terminals or HTTP.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from gpt2engine.errors import GPT2EngineError
from gpt2engine.model import GPT2, KVCache
from gpt2engine.sampling import SamplingParams, next_tokens
from gpt2engine.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 100
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # strings that end the response; they are not part of it
    ignore_eos: bool = False  # keep going past <|endoftext|>
    truncate: Literal["error", "left"] = "error"  # what to do when the prompt does not fit

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GPT2EngineError("max_new_tokens must be >= 1")
        if self.truncate not in ("error", "left"):
            raise GPT2EngineError("truncate must be 'error' or 'left'")
        if any(not s for s in self.stop):
            raise GPT2EngineError("stop strings must not be empty")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]  # stop: <|endoftext|> or a stop string


def fit_prompt(ids: list[int], n_positions: int, options: GenerationOptions) -> list[int]:
    """Check the prompt + new tokens fit in the context, or keep its most recent tokens."""
    room = n_positions - options.max_new_tokens
    if room < 1:
        raise GPT2EngineError(
            f"max_new_tokens ({options.max_new_tokens}) leaves no room for a prompt in the "
            f"model's context of {n_positions} tokens"
        )
    if len(ids) <= room:
        return ids
    if options.truncate == "left":
        return ids[-room:]
    raise GPT2EngineError(
        f"prompt of {len(ids)} tokens + {options.max_new_tokens} new tokens exceeds the model's "
        f"context of {n_positions}; shorten it, lower max_new_tokens, or truncate left"
    )


def prefill(model: GPT2, cache: list[KVCache], prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts through the model, filling the cache -> logits of each last token (B, V)."""
    device = model.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    # Right-padding lands in slots >= the row's length, which its first decode steps overwrite
    # before any query of that row can see them.
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)  # (B, T)
    positions = torch.arange(T, device=device).expand(len(prompts), T)
    hidden = model.hidden_states(ids, positions, cache)  # (B, T, C)
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # (B, C)
    return model.lm_head(last)


def decode_step(
    model: GPT2, cache: list[KVCache], tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    # tokens: (B,), positions: (B,) -> logits of the next token (B, V)
    return model(tokens[:, None], positions[:, None], cache)[:, -1]


def generate_tokens(
    model: GPT2, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), `max_new_tokens` times; stop iterating to stop."""
    device = model.wte.weight.device
    batch = len(prompts)
    cache = model.make_cache(batch, max(map(len, prompts)) + max_new_tokens)
    generators = [
        torch.Generator(device).manual_seed(sampling.seed if sampling.seed is not None
                                            else secrets.randbits(63))
        for _ in prompts
    ]
    seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        seen[row, prompt] = True
    positions = torch.tensor([len(p) for p in prompts], device=device)
    with torch.inference_mode():
        logits = prefill(model, cache, prompts)
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, seen, sampling, generators)
            yield tokens
            if step + 1 == max_new_tokens:
                return
            seen[torch.arange(batch, device=device), tokens] = True
            logits = decode_step(model, cache, tokens, positions)
            positions = positions + 1


class RowText:
    """One row's text: UTF-8-safe decoding, stop strings across token boundaries, the result."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int, options: GenerationOptions) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.eot_id = None if options.ignore_eos else tokenizer.eot_id
        self.stop = options.stop
        self.max_new_tokens = options.max_new_tokens
        self.held = ""  # text that may be the start of a stop string
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.prompt_tokens = prompt_tokens
        self.finish_reason: Literal["stop", "length"] | None = None

    def push(self, token_id: int) -> str:
        """Take the next token; return the text that is now certain to be in the response."""
        if token_id == self.eot_id:
            self.held += self.decoder.flush()
            return self.finish("stop")
        self.token_ids.append(token_id)
        self.held += self.decoder.push(token_id)
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = self.held[: min(hits)]
            return self.finish("stop")
        if len(self.token_ids) == self.max_new_tokens:
            self.held += self.decoder.flush()
            return self.finish("length")
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])),
                   default=0)
        return self.emit(len(self.held) - keep)

    def emit(self, upto: int) -> str:
        piece, self.held = self.held[:upto], self.held[upto:]
        self.text.append(piece)
        return piece

    def finish(self, reason: Literal["stop", "length"]) -> str:
        self.finish_reason = reason
        return self.emit(len(self.held))

    def result(self) -> GenerationResult:
        return GenerationResult("".join(self.text), self.token_ids, self.prompt_tokens,
                                len(self.token_ids), self.finish_reason or "length")


class Generation:
    """A batch of prompts generating together; iterate for (row, text piece) as tokens arrive.

    Every generated token yields one event, its piece possibly empty (held back), so a client
    can time the first token. `results` holds each row's outcome once iteration ends.
    """

    def __init__(
        self, model: GPT2, tokenizer: Tokenizer, prompts: list[str], options: GenerationOptions
    ) -> None:
        self.model, self.options = model, options
        n_positions = model.config.n_positions
        start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
        self.prompt_ids = [fit_prompt(ids or start, n_positions, options)
                           for ids in tokenizer.encode_batch(prompts)]
        if not all(self.prompt_ids):
            raise GPT2EngineError("empty prompt, and the tokenizer has no <|endoftext|> to start from")
        self.rows = [RowText(tokenizer, len(ids), options) for ids in self.prompt_ids]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        steps = generate_tokens(self.model, self.prompt_ids, self.options.max_new_tokens,
                                self.options.sampling)
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if self.rows[row].finish_reason is None:
                    yield row, self.rows[row].push(token)
            if all(r.finish_reason for r in self.rows):
                break

    @property
    def results(self) -> list[GenerationResult]:
        return [row.result() for row in self.rows]


def stream(
    model: GPT2, tokenizer: Tokenizer, prompt: str, options: GenerationOptions | None = None
) -> Iterator[str]:
    """Yield the response to `prompt` piece by piece as it is generated."""
    for _, piece in Generation(model, tokenizer, [prompt], options or GenerationOptions()):
        if piece:
            yield piece


def complete(
    model: GPT2, tokenizer: Tokenizer, prompts: list[str], options: GenerationOptions | None = None
) -> list[GenerationResult]:
    """Generate for every prompt together and return each row's whole result."""
    generation = Generation(model, tokenizer, prompts, options or GenerationOptions())
    for _ in generation:
        pass
    return generation.results
