"""A request: its prompt and options, its place in the engine, and the text it has produced.

`TextState` turns token ids into text as they arrive: UTF-8-safe pieces, stop strings across
token boundaries, `<|endoftext|>`, the token limit. Everything here is plain Python, no tensors.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import Steering
from gpt2engine.sampling_params import SamplingParams
from gpt2engine.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from gpt2engine.engine.activations import RequestHooks

FinishReason = Literal["stop", "length", "abort", "error"]
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 100
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # strings that end the response; they are not part of it
    ignore_eos: bool = False  # keep going past <|endoftext|>
    truncate: Literal["error", "left"] = "error"  # what to do when the prompt does not fit
    logprobs: int | None = None  # per generated token: its log-probability and the top-N others
    prompt_logprobs: int | None = None  # the same for every prompt token but the first...
    prompt_logprobs_from: int = 1  # ... or for those from this position on (scoring a continuation)
    capture: tuple[str, ...] = ()  # hook points (hooks.py) whose activations the result carries
    steer: tuple[Steering, ...] = ()  # vectors added to the residual stream

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "prompt_logprobs_from"):
            if not is_integer(value := getattr(self, name)) or value < 1:
                raise GPT2EngineError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise GPT2EngineError("sampling must be a SamplingParams")
        if self.truncate not in ("error", "left"):
            raise GPT2EngineError("truncate must be 'error' or 'left'")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise GPT2EngineError("stop must be a tuple of strings")
        if any(not s for s in self.stop):
            raise GPT2EngineError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and 0 <= value <= MAX_LOGPROBS):
                raise GPT2EngineError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if not isinstance(self.capture, tuple) or not all(isinstance(c, str) for c in self.capture):
            raise GPT2EngineError("capture must be a tuple of hook names")
        if not isinstance(self.steer, tuple) or not all(isinstance(s, Steering) for s in self.steer):
            raise GPT2EngineError("steer must be a tuple of Steering")

    @property
    def hooked(self) -> bool:
        """Whether the request captures or steers: then it runs through the model's own forward
        pass, alone in its row, and past the prefix cache (engine/activations.py)."""
        return bool(self.capture or self.steer)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # stop: <|endoftext|> or a stop string
    # hook name -> float32 tensor over the prompt's and output's positions (GenerationOptions.capture)
    activations: dict[str, Any] = field(default_factory=dict)
    proposed_tokens: int = 0  # speculative decoding: tokens proposed and verified...
    accepted_tokens: int = 0  # ... and of those, kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (before any sampling filter) and the top-N."""

    logprob: float
    top: dict[int, float]  # token id -> log-probability, most likely first

    def truncated(self, top: int) -> TokenLogprob:
        """The same with only the `top` most likely others."""
        if len(self.top) <= top:
            return self
        return TokenLogprob(self.logprob, dict(list(self.top.items())[:top]))


class TextState:
    """One request's text: UTF-8-safe decoding, stop strings across token boundaries, the result."""

    def __init__(self, tokenizer: Tokenizer, options: GenerationOptions) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.eot_id = None if options.ignore_eos else tokenizer.eot_id
        self.stop = options.stop
        self.max_new_tokens = options.max_new_tokens
        self.held = ""  # text that may be the start of a stop string
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None

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

    def finish(self, reason: FinishReason) -> str:
        self.finish_reason = reason
        return self.emit(len(self.held))


class Status(enum.Enum):
    WAITING = "waiting"  # in the queue, no cache row yet
    PREFILLING = "prefilling"  # has a row; its prompt is going into the cache chunk by chunk
    DECODING = "decoding"  # one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    options: GenerationOptions
    seed: int  # the draw's seed: the options' one, or a fresh one
    text: TextState
    status: Status = Status.WAITING
    row: int | None = None  # the cache row, while it has one
    prefilled: int = 0  # prompt tokens already in the cache
    cached_tokens: int = 0  # of those, how many were copied from the prefix cache
    error: str | None = None  # why it failed, when finish_reason is "error"
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens from..n-1
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    hooks: RequestHooks | None = None  # set by the runner when the options capture or steer
    proposed_tokens: int = 0  # speculative decoding (speculative.py): tokens proposed and verified...
    accepted_tokens: int = 0  # ... and of those, kept

    @property
    def output_ids(self) -> list[int]:
        return self.text.token_ids

    @property
    def held_row(self) -> int:
        """The cache row of a scheduled request (the scheduler gave it one on admission)."""
        if self.row is None:
            raise RuntimeError(f"request {self.request_id} holds no cache row")
        return self.row

    @property
    def position(self) -> int:
        """The position of the next token to feed: the last generated one's."""
        return len(self.prompt_ids) + len(self.text.token_ids) - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def result(self) -> GenerationResult:
        return GenerationResult("".join(self.text.text), self.text.token_ids, len(self.prompt_ids),
                                len(self.text.token_ids), self.finish_reason or "length",
                                self.hooks.activations() if self.hooks else {}, self.proposed_tokens,
                                self.accepted_tokens)


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: a token of its output (its text piece, maybe
    empty while held back; None for the <|endoftext|> that ends it) and/or the end of it."""

    request: Request
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    finished: bool
