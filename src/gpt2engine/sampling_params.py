"""What a request asks of sampling, checked when it is made: plain Python, no tensors, so the
CLI checks its flags (and the server its JSON) before torch is imported. sampling.py applies it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpt2engine.errors import GPT2EngineError

MAX_SEED = 2**64 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]
# Below this temperature, sampling is greedy (vLLM's rule): logits / 1e-40 overflow to inf.
GREEDY_BELOW = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it, finite logits could overflow


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below 1e-5) means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL's rule, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's rules, over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # None draws a fresh seed per request

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise GPT2EngineError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
             "repetition_penalty must be in [0.01, 100]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and 0 <= self.seed <= MAX_SEED),
             f"seed must be an integer in [0, {MAX_SEED}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise GPT2EngineError(message)
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise GPT2EngineError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
            if not is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise GPT2EngineError(f"logit_bias: bias of token {token} must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def argmax_only(self) -> bool:
        """Greedy with no penalty or bias: the token is the argmax of the model's logits."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias)
