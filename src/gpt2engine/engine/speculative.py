"""Speculative decoding: a cheap guess proposes a request's next few tokens, and one step of the
model checks them all.

Decoding one token reads every weight for that one token; a step that feeds a request's last
token and K proposed ones costs about as much where decoding is bound by memory (batch 1, a CPU).
Two proposers: prompt lookup (the tokens that followed the latest earlier occurrence of the last
n tokens in the request's prompt and output) and a draft model (a smaller GPT-2 of the same
vocabulary, with its own cache rows, proposing greedily).

Exactness: the model's logits for the fed positions are those plain decoding computes (on the CPU
each verified position is its own row of the fused step, kernels/step.c), and each position's token
is drawn from them exactly as plain decoding draws it (the request's settings, penalties and
seeded counter); a proposed token is accepted while it equals the drawn one. Proposals are point
masses (greedy), for which this is Leviathan et al.'s rejection rule: a proposal d is kept with
probability p(d), otherwise the token comes from p without d. So every request gets the tokens,
bit for bit, that it gets without speculation, for any sampling setting and seed; only fewer steps.

The number proposed adapts per request, to the one with the most tokens per second expected from
the request's acceptance so far and what a proposal costs: the time to propose it (a draft model's
step; prompt lookup's is next to nothing) and its row of the verifying step, over a plain step's
time, measured as it runs. Where no number is worth it, the request pauses, then tries one. Under
load it backs off: a step verifies at most `budget` positions (a batch already reuses the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from gpt2engine.engine.request import Request
from gpt2engine.engine.scheduler import DEFAULT_SPECULATIVE_TOKENS, SPECULATIVE_BUDGET
from gpt2engine.errors import GPT2EngineError
from gpt2engine.kernels import rows_argmax
from gpt2engine.kernels.step import DecodeStep
from gpt2engine.model import GPT2

MARGIN = 1.05  # proposals are made where they are expected to gain more than this; else a pause...
PAUSE_STEPS = 16  # ...for this many steps (doubling each pause in a row, at most 8 times), then tries one
MAX_NGRAM, MIN_NGRAM = 3, 1  # prompt lookup: the longest suffix first (transformers: 2..1)


class Proposer(Protocol):
    name: str

    def propose(self, requests: list[Request], counts: list[int]) -> list[list[int]]:
        """Up to counts[i] tokens to follow requests[i]'s prompt and output."""
        ...


class PromptLookup:
    """The tokens that followed the latest earlier occurrence of the request's last n tokens (n
    from MAX_NGRAM down to MIN_NGRAM) in its prompt and output: no second model."""

    name = "ngram"

    def propose(self, requests: list[Request], counts: list[int]) -> list[list[int]]:
        return [lookup(r.prompt_ids + r.output_ids, k) for r, k in zip(requests, counts, strict=True)]


def lookup(tokens: list[int], k: int) -> list[int]:
    """The k tokens after the latest earlier occurrence of the longest suffix that has one; the
    latest whose continuation is k long (a match near the end, in a repetition, runs into it)."""
    for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
        suffix, best = tokens[-n:], list[int]()
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, not the suffix itself
            if tokens[start : start + n] == suffix:
                following = tokens[start + n : start + n + k]
                if len(following) == k:
                    return following
                best = max(best, following, key=len)
        if best:
            return best
    return []


class DraftModel:
    """A smaller GPT-2 of the same vocabulary proposing greedily, in its own cache rows (the
    target's row numbers). What each row holds is remembered as tokens; before proposing, a row is
    brought up to the request's tokens from where the two first differ."""

    name = "draft"

    def __init__(self, model: GPT2, max_batch: int, max_len: int, vocab_limit: int) -> None:
        self.model, self.vocab_limit = model, vocab_limit
        self.cache = model.make_cache(max_batch, max_len)
        self.step = DecodeStep.build(model, self.cache)
        self.held: dict[int, tuple[str, list[int]]] = {}  # cache row -> (request id, tokens it holds)

    @torch.inference_mode()
    def propose(self, requests: list[Request], counts: list[int]) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in requests]
        feeds = []  # each row is given what it lacks of its request's tokens; the last one's logits propose
        for r in requests:
            tokens = r.prompt_ids + r.output_ids
            request_id, held = self.held.get(r.held_row, ("", []))
            same = common_prefix(held, tokens) if request_id == r.request_id else 0
            same = min(same, len(tokens) - 1)  # the last token is fed again for its logits
            feeds.append((r.held_row, tokens[same:], same))
            self.held[r.held_row] = (r.request_id, tokens)
        logits, active = self.feed(feeds), list(range(len(requests)))
        while True:
            chosen = rows_argmax(logits[:, : self.vocab_limit]).tolist()
            for i, token in zip(active, chosen, strict=True):
                proposals[i].append(token)
            active = [i for i in active if len(proposals[i]) < counts[i]]
            if not active:
                return proposals
            feeds = []
            for i in active:
                held = self.held[requests[i].held_row][1]
                held.append(proposals[i][-1])
                feeds.append((requests[i].held_row, [proposals[i][-1]], len(held) - 1))
            logits = self.feed(feeds)

    def feed(self, feeds: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Each (cache row, tokens, first position) into the draft's cache -> the logits after each
        one's last token (n, V)."""
        if self.step is not None and all(len(tokens) <= 16 for _, tokens, _ in feeds):  # one fused step
            tokens = [t for _, ts, _ in feeds for t in ts]
            where = [start + i for _, ts, start in feeds for i in range(len(ts))]
            rows = [row for row, ts, _ in feeds for _ in ts]
            logits = self.step(tokens, where, rows=rows)
            if len(tokens) == len(feeds):  # a token each, as every proposal after the first
                return logits
            return logits[torch.tensor([len(ts) for _, ts, _ in feeds]).cumsum(0) - 1]
        out = []
        device = self.model.device
        for row, tokens, start in feeds:  # a prompt's worth: the prefill path
            view = [layer.rows(row, row + 1) for layer in self.cache]
            ids = torch.tensor([tokens], device=device)
            positions = torch.arange(start, start + len(tokens), device=device)[None]
            hidden = self.model.hidden_states(ids, positions, view, start + len(tokens))
            out.append(self.model.lm_head(hidden[0, -1]).float().cpu())
        return torch.stack(out)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Adaptive:
    """One request's number of proposed tokens, as its acceptance goes."""

    tokens: int
    acceptance: float = 1.0  # running average: the chance a proposal is kept, those before it kept
    paused: int = 0  # steps left without proposals
    pauses: int = 0  # pauses in a row, less one for each step whose proposals were all kept


@dataclass
class SpeculationStats:
    proposer: str
    proposed: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, kept
    steps: int = 0  # steps that verified proposals


@dataclass
class Speculation:
    proposer: Proposer
    max_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    budget: int = SPECULATIVE_BUDGET
    adaptive: dict[str, Adaptive] = field(default_factory=dict)
    stats: SpeculationStats = field(init=False)
    cost: float = 0.0  # running average: a proposal's seconds (proposing, verifying its row) / a plain step's
    plain: tuple[float, float] = (0.0, 0.0)  # running averages: seconds of a step without proposals, its rows

    def __post_init__(self) -> None:
        if not (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= 64):
            raise GPT2EngineError(
                f"speculative tokens must be an integer in [1, 64], got {self.max_tokens!r}")
        self.stats = SpeculationStats(self.proposer.name)

    def propose(self, decoding: list[Request], max_len: int) -> dict[Request, list[int]]:
        """This step's proposals for the requests decoding (none for those that capture or steer,
        are paused, or have no room)."""
        if self.plain == (0.0, 0.0):
            return {}  # the first step runs plain, to time one: what a kept proposal saves
        room_per_row = self.budget // max(1, len(decoding)) - 1  # under load: fewer, then none
        chosen, counts = [], []
        for r in decoding:
            state = self.adaptive.setdefault(r.request_id, Adaptive(self.max_tokens))
            if state.paused:
                state.paused -= 1
                continue
            left = r.options.max_new_tokens - len(r.output_ids) - 1  # the step adds one more itself
            k = min(state.tokens, room_per_row, left, max_len - 1 - r.position - 1)
            if k >= 1 and not r.hooks:
                chosen.append(r)
                counts.append(k)
        if not chosen:
            return {}
        proposals = self.proposer.propose(chosen, counts)
        return {r: p for r, p in zip(chosen, proposals, strict=True) if p}

    def timed_plain(self, seconds: float, rows: int) -> None:
        """A step without proposals took `seconds` for `rows` rows."""
        if self.plain == (0.0, 0.0):
            self.plain = (seconds, rows)
        else:
            self.plain = (0.8 * self.plain[0] + 0.2 * seconds, 0.8 * self.plain[1] + 0.2 * rows)

    def timed(self, proposing: float, proposed: int, verifying: float, rows: int) -> None:
        """A step's proposals took `proposing` seconds for `proposed` tokens, and verifying them
        and the rows without proposals (`rows` in all) `verifying`. A proposal costs its share of
        the proposing and its row of the verification, against a plain step's time, which is what
        a kept proposal saves: it is worth it while more than that share of them is kept."""
        plain, plain_rows = self.plain
        if not (proposed and plain > 0):
            return
        per_row = max(0.0, verifying - plain) / max(1.0, rows - plain_rows)
        cost = (proposing / proposed + per_row) / plain
        self.cost = cost if self.cost == 0 else 0.8 * self.cost + 0.2 * cost

    def best_count(self, acceptance: float) -> int:
        """The number of proposals with the most tokens per second, where each is kept with chance
        `acceptance` once those before it are and costs `cost` steps: k gives 1 + a + ... + a^k
        tokens in 1 + k cost steps. 0 (no proposals) unless that gains more than MARGIN."""
        best, best_gain, tokens, chance = 0, MARGIN, 1.0, 1.0
        for k in range(1, self.max_tokens + 1):
            chance *= acceptance
            tokens += chance
            gain = tokens / (1 + k * self.cost)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def verified(self, request: Request, proposed: int, accepted: int) -> None:
        """How a request's proposals fared: the counts, and its next number of proposals."""
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.steps += 1
        request.proposed_tokens += proposed
        request.accepted_tokens += accepted
        state = self.adaptive.get(request.request_id)
        if state is None:  # the request has finished (forgotten)
            return
        tried = accepted + (accepted < proposed)  # up to the first proposal not kept
        state.acceptance = 0.7 * state.acceptance + 0.3 * accepted / tried
        best = self.best_count(state.acceptance)
        if best:
            state.tokens = best
            if accepted == proposed:  # a lucky probe does not undo the pauses before; a run of them does
                state.pauses = max(0, state.pauses - 1)
        else:  # a pause, then one proposal to see whether it has become worth it
            state.paused, state.tokens = PAUSE_STEPS << min(state.pauses, 3), 1
            state.pauses += 1

    def forget(self, request: Request) -> None:
        self.adaptive.pop(request.request_id, None)
