"""What a request asks of sampling, checked when it is made: plain Python, no tensors, so the
CLI checks its flags (and the server its JSON) before torch is imported. sampling.py applies it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from gpt2engine.errors import GPT2EngineError

MAX_SEED = 2**64 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
# Below this temperature, sampling is greedy (vLLM's rule): logits / 1e-40 overflow to inf.
GREEDY_BELOW = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it, finite logits could overflow


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class RowParam:
    """What declares a per-row sampling parameter, once: the engine keeps a (B,) tensor of it
    (engine/runner.py, sampling.RowSettings), the CLI a flag and the server a field of the same
    name (cli/flags.py, server/protocol.py). Adding one: a field here, its step in sampling.py and
    its field in protocol.py's CompletionRequest (tests/test_sampling_params.py checks all)."""

    rule: str  # what `check` asks, in the error message: "top_p must be in (0, 1]"
    check: Callable[[Any], bool]
    help: str  # the CLI flag's help
    metavar: str  # the CLI flag's value, as `help` names it
    integer: bool = False


def row_param(default: float, rule: str, check: Callable[[Any], bool], help: str, metavar: str,
              integer: bool = False) -> Any:
    return field(default=default, metadata={"row": RowParam(rule, check, help, metavar, integer)})


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = row_param(1.0, "must be >= 0", lambda v: v >= 0,
                                   f"0 (or below {GREEDY_BELOW:g}) = greedy; lower is more focused", "T")
    top_k: int = row_param(0, "must be an integer >= 0", lambda v: v >= 0,
                           "sample among the K likeliest tokens, 0 = off", "K", integer=True)
    top_p: float = row_param(1.0, "must be in (0, 1]", lambda v: 0 < v <= 1,
                             "nucleus sampling: the likeliest tokens up to probability P (1 = off)", "P")
    min_p: float = row_param(0.0, "must be in [0, 1]", lambda v: 0 <= v <= 1,
                             "drop tokens below P times the likeliest one's probability (0 = off)", "P")
    repetition_penalty: float = row_param(  # CTRL's rule, over prompt and output tokens
        1.0, "must be in [0.01, 100]",
        lambda v: REPETITION_PENALTY_RANGE[0] <= v <= REPETITION_PENALTY_RANGE[1],
        "R > 1 discourages tokens already in the prompt or output (1 = off)", "R")
    presence_penalty: float = row_param(  # OpenAI's rules, over output tokens
        0.0, "must be in [-2, 2]", lambda v: -2 <= v <= 2,
        "P is subtracted once from each token already in the output (0 = off)", "P")
    frequency_penalty: float = row_param(0.0, "must be in [-2, 2]", lambda v: -2 <= v <= 2,
                                         "F is subtracted per occurrence in the output (0 = off)", "F")
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # None draws a fresh seed per request

    def __post_init__(self) -> None:
        for name, param in ROW_PARAMS.items():
            value = getattr(self, name)
            if param.integer:
                if not isinstance(value, int) or isinstance(value, bool) or not param.check(value):
                    raise GPT2EngineError(f"{name} {param.rule}")
                continue
            if not is_number(value) or not math.isfinite(value):
                raise GPT2EngineError(f"{name} must be a finite number, got {value!r}")
            if not param.check(value):
                raise GPT2EngineError(f"{name} {param.rule}")
        if not (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                      and 0 <= self.seed <= MAX_SEED)):
            raise GPT2EngineError(f"seed must be an integer in [0, {MAX_SEED}]")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise GPT2EngineError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
            if not is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise GPT2EngineError(f"logit_bias: bias of token {token} must be in [-100, 100]")

    def row_values(self) -> dict[str, float]:
        """Each per-row parameter as the sampler reads it: temperature 0 on a greedy row."""
        values = {name: getattr(self, name) for name in ROW_PARAMS}
        values["temperature"] = 0.0 if self.greedy else self.temperature
        return values

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def argmax_only(self) -> bool:
        """Greedy with no penalty or bias: the token is the argmax of the model's logits."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias)


_ROW_FIELDS = [f for f in fields(SamplingParams) if "row" in f.metadata]
ROW_PARAMS: dict[str, RowParam] = {f.name: f.metadata["row"] for f in _ROW_FIELDS}
ROW_DEFAULTS: dict[str, float] = {f.name: f.default for f in _ROW_FIELDS}  # type: ignore[misc]
