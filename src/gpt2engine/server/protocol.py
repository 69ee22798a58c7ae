"""OpenAI's completion API shapes: requests in (checked, turned into engine options), responses
and streamed chunks out. Modelled on vLLM's OpenAI server; nothing here touches HTTP."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from gpt2engine.config import GPT2Config
from gpt2engine.engine import GenerationOptions, Request, StepOutput, TokenLogprob
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import Steering, check_hooks, split_name
from gpt2engine.sampling_params import MAX_SEED, ROW_PARAMS, SamplingParams
from gpt2engine.tokenizer import Tokenizer

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 5  # as OpenAI's legacy completions


class APIError(Exception):
    """An error for the client, in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


class Strict(BaseModel):
    # No coercion: "5" is not 5 and 1 is not true; unknown fields are ignored, as OpenAI's are.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class SteerField(Strict):
    """gpt2engine's extension: add `coefficient * vector` to a residual hook (hooks.Steering)."""

    hook: str = Field(description="a residual hook point, e.g. blocks.6.hook_resid_pre")
    vector: list[float] | None = Field(None, description="d_model numbers")
    from_prompts: list[str] | None = Field(
        None, description="instead of vector, two prompts: the difference of their activations at "
                          "the hook, at their last tokens")
    coefficient: float = 1.0
    start: int = Field(0, description="the first position steered (0: every position)")

    def steering(self) -> Steering:
        prompts = None if self.from_prompts is None else tuple(self.from_prompts)
        if prompts is not None and len(prompts) != 2:
            raise GPT2EngineError("steer: from_prompts is two prompts")
        return Steering(self.hook, self.vector, self.coefficient, self.start, prompts)


class GenerationFields(Strict):
    """What /v1/completions and /v1/chat/completions both take: the model, the sampling, the choices,
    the stream. One field per sampling_params.ROW_PARAMS, with OpenAI's defaults
    (tests/test_sampling_params.py checks)."""

    model: str | None = Field(None, description="the served model's name (default: it)")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(-1, description="-1 or 0: off")
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]")
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    steer: list[SteerField] | None = Field(
        None, description="gpt2engine extension: vectors added to the residual stream (activation addition)")


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of such lists")
    max_tokens: int | None = Field(16, description="null: as many as the context leaves")
    logprobs: int | None = Field(None, description="0-5: the chosen token's logprob and the top N")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    capture: list[str] | None = Field(
        None, description="gpt2engine extension: hook points whose activations each choice carries "
                          "(TransformerLens' names, e.g. blocks.6.hook_resid_pre)")


class ChatMessage(Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool fields...: the template's
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(GenerationFields):
    """OpenAI's chat completions and vLLM's template switches: the conversation is rendered by the
    chat template into one prompt, which is then completed as /v1/completions would."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="null: as many as the context leaves")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="0-5, with logprobs: the top N at each token")
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def as_completion(self, prompt: str) -> CompletionRequest:
        """The same request as a completion of the rendered conversation."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        fields = self.model_dump(include=set(GenerationFields.model_fields))
        max_tokens = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return CompletionRequest.model_validate(
            {**fields, "prompt": prompt, "max_tokens": max_tokens, "logprobs": logprobs})


class TokenizeRequest(Strict):
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, description="a conversation, for the chat template")
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # GPT-2 adds none either way


class DetokenizeRequest(Strict):
    tokens: list[int]


def prompts_of(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    one = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
    prompts = cast("list[str | list[int]]", [prompt] if one else prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request", "prompt")
    return list(prompts)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice 0 uses the seed itself (so n=1 samples as the library does); the others differ."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice * 0x9E3779B97F4A7C15) % (MAX_SEED + 1)


def check(body: CompletionRequest) -> None:
    """The request-wide fields; a value out of range is a 400 naming its field."""
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of other than n is not supported", "best_of")
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}]", "n")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")


def max_tokens_of(body: CompletionRequest, prompt_tokens: int, context: int) -> int:
    return max(context - prompt_tokens, 1) if body.max_tokens is None else body.max_tokens


def hooks_of(body: CompletionRequest, config: GPT2Config) -> tuple[tuple[str, ...], tuple[Steering, ...]]:
    """The request's capture and steering, checked against the model; a 400 naming the field."""
    try:
        capture = check_hooks(body.capture or (), config.n_layer)
    except GPT2EngineError as error:
        raise APIError(400, f"capture: {error}", "capture") from None
    try:
        steer = tuple(field.steering() for field in body.steer or ())
        for steering in steer:
            steering.check(config.n_layer, config.n_embd)
    except GPT2EngineError as error:
        raise APIError(400, f"steer: {error}", "steer") from None
    return capture, steer


def options_for(body: CompletionRequest, prompt_tokens: int, context: int, choice: int,
                hooks: tuple[tuple[str, ...], tuple[Steering, ...]] = ((), ())) -> GenerationOptions:
    """Engine options for one choice of one prompt (after `check`), with `hooks_of`'s capture and
    steering; whether the prompt and `max_tokens` fit the context is the engine's to say, when the
    request is added."""
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    max_tokens = max_tokens_of(body, prompt_tokens, context)
    try:
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from None
    try:
        row_values = {name: getattr(body, name) for name in ROW_PARAMS} | {"top_k": max(body.top_k, 0)}
        sampling = SamplingParams(**row_values, logit_bias=bias, seed=choice_seed(body.seed, choice))
        return GenerationOptions(max_new_tokens=max_tokens, sampling=sampling, stop=tuple(stop),
                                 ignore_eos=body.ignore_eos, logprobs=body.logprobs,
                                 prompt_logprobs=body.logprobs if body.echo else None,
                                 capture=hooks[0], steer=hooks[1])
    except GPT2EngineError as error:
        message = str(error)
        field = message.split(" ")[0].rstrip(":")
        raise APIError(400, message, "max_tokens" if field == "max_new_tokens" else field) from None


@dataclass
class Choice:
    """One choice's text and logprobs as they accumulate (also the unit of a streamed chunk)."""

    index: int
    tokenizer: Tokenizer
    want_logprobs: bool
    text: str = ""
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0  # characters of this choice's text so far, for text_offset
    covers_prompt: bool = False  # echo: the choice starts with the prompt (and its activations cover it)
    activations: dict[str, Any] | None = None  # with `capture`, once the request has finished

    def add(self, text: str, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> dict[str, Any]:
        """Append text and its tokens' logprobs -> the chunk choice for just this part."""
        start = len(self.tokens)
        self.text += text
        if self.want_logprobs:
            for token_id, logprob in zip(token_ids, logprobs, strict=True):
                piece = self.tokenizer.decode([token_id])
                self.tokens.append(piece)
                self.token_logprobs.append(None if logprob is None else logprob.logprob)
                self.top_logprobs.append(None if logprob is None else
                                         {self.tokenizer.decode([t]): v for t, v in logprob.top.items()})
                self.text_offset.append(self.offset)
                self.offset += len(piece)
        return self.as_dict(start, text)

    def as_dict(self, start: int = 0, text: str | None = None) -> dict[str, Any]:
        logprobs = None
        if self.want_logprobs:
            logprobs = {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                        "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}
        shaped = {"index": self.index, "text": self.text if text is None else text,
                  "logprobs": logprobs, "finish_reason": self.finish_reason}
        if self.activations is not None and (text is None or self.finish_reason):  # the last chunk's
            shaped["activations"] = self.activations
        return shaped

    def echo(self, request: Request) -> dict[str, Any]:
        """The prompt, as the start of the choice, with its logprobs (the first one null)."""
        ids = request.prompt_ids
        logprobs: list[TokenLogprob | None] = (
            [None, *request.prompt_logprobs] if self.want_logprobs else [None] * len(ids))
        return self.add(self.tokenizer.decode(ids), ids, logprobs)

    def take(self, output: StepOutput) -> dict[str, Any]:
        """A step's output -> the chunk choice for it."""
        if output.finished:
            self.finish_reason = output.request.finish_reason
            hooks = output.request.hooks
            if hooks and hooks.capture and self.finish_reason in ("stop", "length"):
                self.activations = activations_json(hooks.activations(), 0 if self.covers_prompt else
                                                    len(output.request.prompt_ids))
        ids = [] if output.token_id is None else [output.token_id]
        return self.add(output.text, ids, [output.logprob] * len(ids))


def activations_json(activations: dict[str, Any], start: int) -> dict[str, Any]:
    """Each hook's activations from position `start` on as {shape, dtype, data}: base64 of the
    little-endian float32 values, in TransformerLens' shapes without the batch."""
    shaped = {}
    for name, values in activations.items():
        values = values[:, start:] if split_name(name)[1] == "attn.hook_pattern" else values[start:]
        data = values.contiguous().numpy().astype("<f4").tobytes()
        shaped[name] = {"shape": list(values.shape), "dtype": "float32",
                        "data": base64.b64encode(data).decode("ascii")}
    return shaped


def chat_logprobs(choice: dict[str, Any]) -> dict[str, Any] | None:
    """A completion choice's logprobs in the chat format: {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}."""
    logprobs = choice["logprobs"]
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    tokens = zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    return {"content": [{**entry(token, logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
                        for token, logprob, top in tokens]}


def chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A whole completion choice as a chat choice."""
    return {"index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
            "logprobs": chat_logprobs(choice), "finish_reason": choice["finish_reason"]}


def chat_delta(choice: dict[str, Any], first: bool) -> dict[str, Any]:
    """A streamed completion choice as a chat chunk's choice (the role in a choice's first)."""
    delta = {"role": "assistant", "content": choice["text"]} if first else {"content": choice["text"]}
    return {"index": choice["index"], "delta": delta, "logprobs": chat_logprobs(choice),
            "finish_reason": choice["finish_reason"]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens that came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(
    completion_id: str, model: str, choices: list[dict], usage_: dict | None, kind: str = "text_completion"
) -> dict[str, Any]:
    """A response or a streamed chunk; `kind`: text_completion, chat.completion(.chunk)."""
    body: dict[str, Any] = {"id": completion_id, "object": kind, "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
