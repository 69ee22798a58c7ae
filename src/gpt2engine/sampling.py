"""Sampling as small pure functions over logits of shape (B, V).

They run in transformers' order (repetition penalty, temperature, top-k, top-p, min-p), so each
one can be checked against its transformers logits processor on the same logits; OpenAI's
presence and frequency penalties and logit bias come first, as in vLLM. Every parameter is a
number or a (B,) tensor with one value per row, so one batch mixes requests with different
settings. Filtered tokens get -inf; the draw picks among what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2engine.sampling_params import ROW_PARAMS, SamplingParams

Param = float | torch.Tensor  # one value for every row, or a (B,) tensor of one per row


def column(value: Param) -> Param:
    """A (B,) tensor as (B, 1), so it broadcasts over the vocabulary; numbers stay numbers."""
    return value[:, None] if isinstance(value, torch.Tensor) else value


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: Param, frequency: Param
) -> torch.Tensor:
    # logits: (B, V), counts: (B, V) times each token was generated -> (B, V), OpenAI's formula
    counts = counts.to(logits.dtype)
    return logits - column(frequency) * counts - column(presence) * (counts > 0).to(logits.dtype)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Param) -> torch.Tensor:
    # logits: (B, V), seen: (B, V) bool, tokens already in the row -> (B, V)
    # As in CTRL (Keskar et al.): shrink the logit of a seen token towards "less likely".
    penalty = column(penalty)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    # (B, V) -> (B, V)
    return logits / column(temperature)


def apply_top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    # (B, V) -> (B, V), keeping the k largest logits of each row (and any tied with the k-th);
    # a row whose k is V or more keeps them all. Read from the rows' top max(k), not a full sort.
    V = logits.shape[-1]
    k = torch.as_tensor(k, device=logits.device).clamp(1, V).expand(logits.shape[0])
    filters = k < V
    most = int(torch.where(filters, k, 0).max())  # one read from the device
    if not most:
        return logits
    kth_largest = torch.topk(logits, most).values.gather(-1, (k.clamp(max=most) - 1)[:, None])
    kth_largest = kth_largest.masked_fill(~filters[:, None], float("-inf"))
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: Param) -> torch.Tensor:
    # (B, V) -> (B, V), keeping the smallest set of tokens whose probability reaches p
    ascending, order = torch.sort(logits)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - column(p)
    drop_sorted[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    # (B, V) -> (B, V), dropping tokens less likely than min_p times the most likely one
    probs = logits.softmax(dim=-1)
    drop = probs < column(min_p) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class RowSettings:
    """Each row's sampling parameters as (B,) tensors (temperature 0 on greedy rows, top_k 0 =
    off), one per sampling_params.ROW_PARAMS, and the rows' SamplingParams, which say which steps
    any row needs."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    params: list[SamplingParams]

    @property
    def uses_counts(self) -> bool:  # presence or frequency penalties
        return any(p.presence_penalty or p.frequency_penalty for p in self.params)

    @property
    def uses_bias(self) -> bool:
        return any(p.logit_bias for p in self.params)

    @property
    def uses_seen(self) -> bool:  # the repetition penalty
        return any(p.repetition_penalty != 1.0 for p in self.params)

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> RowSettings:
        values = [p.row_values() for p in params]
        return cls(**{name: torch.tensor([v[name] for v in values], dtype=row_dtype(name), device=device)
                      for name in ROW_PARAMS}, params=params)


def row_dtype(name: str) -> torch.dtype:
    """The dtype of a per-row parameter's (B,) tensor."""
    return torch.long if ROW_PARAMS[name].integer else torch.float32


def process_rows(
    logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
    bias: torch.Tensor | None, rows: RowSettings,
) -> torch.Tensor:
    # logits, seen, counts, bias: (B, V) -> (B, V) ready for the draw (greedy rows: argmax of it)
    # seen, counts and bias are needed only when rows.uses_seen, uses_counts, uses_bias.
    params = rows.params
    if rows.uses_counts:
        assert counts is not None
        logits = apply_penalties(logits, counts, rows.presence_penalty, rows.frequency_penalty)
    if rows.uses_bias:
        assert bias is not None
        logits = logits + bias
    if rows.uses_seen:
        assert seen is not None
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
    if all(p.greedy for p in params):
        return logits
    logits = apply_temperature(logits, torch.where(rows.temperature == 0, 1.0, rows.temperature))
    if any(p.top_k for p in params):
        logits = apply_top_k(logits, torch.where(rows.top_k == 0, logits.shape[-1], rows.top_k))
    if any(p.top_p < 1 for p in params):
        logits = apply_top_p(logits, rows.top_p)
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, rows.min_p)
    return logits


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The pipeline with one setting for every row (what transformers' processors compute)."""
    rows = RowSettings.of([params] * len(logits), logits.device)
    counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device) if rows.uses_counts else None
    return process_rows(logits, seen, counts, None, rows)


# A counter-based generator: the noise of a row's n-th draw is a hash of (seed, n, token id), so
# a seeded request samples the same alone or in any batch, on any device, and a whole batch draws
# its noise in one call. The hash is SplitMix64's finaliser in int64 arithmetic, which wraps.
GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed 64-bit number
MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    # int64 tensor -> int64 tensor of the same shape, a bijective, well-mixed hash
    x = (x ^ shift_right(x, 30)) * MIX1
    x = (x ^ shift_right(x, 27)) * MIX2
    return x ^ shift_right(x, 31)


def as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the signed 64-bit number with the same bits."""
    return seed - 2**64 if seed >= 2**63 else seed


def exponential_noise(seeds: torch.Tensor, draws: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # seeds: (B,) int64, draws: (B,) int64 the index of this draw in the row -> Exp(1) noise (B, V)
    tokens = torch.arange(vocab_size, device=seeds.device)
    return noise_at(draw_keys(seeds, draws)[:, None], tokens)


def draw_keys(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    # seeds, draws: (B,) int64 -> (B,) int64, the key of each row's draw
    return mix64(seeds ^ mix64(draws * GOLDEN + 1))


def noise_at(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # keys, tokens: int64 of one shape (or broadcasting) -> Exp(1) noise of those draws' tokens
    bits = mix64(keys + tokens * GOLDEN)
    uniform = (shift_right(bits, 40).float() + 0.5) * 2.0**-24  # in (0, 1), 24 random bits
    return -torch.log(uniform)


def draw(logits: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    # logits: (B, V), seeds, draws: (B,) int64 -> token ids (B,)
    # argmax(p / E) with E ~ Exp(1) picks token i with probability p_i (the exponential race).
    # A token filtered to -inf never wins, so where filters left few (top-k, top-p), the noise is
    # computed for the others only: the same values, a fraction of the work.
    scores = logits.float().log_softmax(dim=-1)
    B, V = scores.shape
    candidates = torch.isfinite(scores)
    rows, tokens = candidates.nonzero(as_tuple=True)
    if len(rows) > B * V // 4:
        return (scores - exponential_noise(seeds, draws, V).log()).argmax(dim=-1)
    keys = draw_keys(seeds, draws)[rows]
    raced = torch.full_like(scores, float("-inf"))
    raced[rows, tokens] = scores[rows, tokens] - noise_at(keys, tokens).log()
    return raced.argmax(dim=-1)
