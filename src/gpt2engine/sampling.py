"""Sampling as small pure functions over logits of shape (B, V).

They run in transformers' order (repetition penalty, temperature, top-k, top-p, min-p), so
each one can be checked against its transformers logits processor on the same logits.
Filtered tokens get -inf; the draw picks among what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2engine.errors import GPT2EngineError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None draws a fresh seed per row

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GPT2EngineError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # logits: (B, V), seen: (B, V) bool, tokens already in the row -> (B, V)
    # As in CTRL (Keskar et al.): shrink the logit of a seen token towards "less likely".
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # (B, V) -> (B, V)
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    # (B, V) -> (B, V), keeping the k largest logits of each row (and any tied with the k-th)
    kth_largest = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    # (B, V) -> (B, V), keeping the smallest set of tokens whose probability reaches p
    ascending, order = torch.sort(logits)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    # (B, V) -> (B, V), dropping tokens less likely than min_p times the most likely one
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The whole pipeline before the draw, skipping the filters that are switched off."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = apply_min_p(logits, params.min_p)
    return logits


def draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    # logits: (B, V), one generator per row -> token ids (B,)
    # argmax(p / E) with E ~ Exp(1) picks token i with probability p_i; each row draws its noise
    # from its own generator, so a seeded row samples the same alone as inside a batch.
    noise = torch.stack([
        torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g)
        for g in generators
    ])
    return (logits.float().softmax(dim=-1) / noise).argmax(dim=-1)


def next_tokens(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    # logits: (B, V), seen: (B, V) -> token ids (B,)
    logits = process_logits(logits, seen, params)
    return logits.argmax(dim=-1) if params.greedy else draw(logits, generators)
