"""Which requests run this step: admission into free cache rows, chunked prefill, decode.

The scheduler owns the free-row list of the preallocated cache and the bounded waiting queue.
A row is held from admission to the end of its request; rows are handed out lowest first, so
the rows in use stay packed at the front of the cache and one decode step covers rows 0..hi-1.
A prompt enters the cache in chunks of `prefill_chunk` tokens at fixed offsets (0, C, 2C, ...),
so a prompt is computed in the same pieces whatever else is running: a request's output is its
output alone. A step computes up to `max_batched_tokens` tokens (vLLM's max_num_batched_tokens):
one per decoding row, and the chunks of as many waiting prompts, oldest first, as fit in the rest
(one chunk always, so prompts move on), so a burst of arrivals is prefilled together while the
streams already decoding wait no longer than that budget's step.
Before a request's next chunk, the prefix cache (prefix_cache.py) is asked for the chunks that
follow what its row holds; those are copied in, not computed, and it goes on from there.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from gpt2engine.engine.prefix_cache import Block, PrefixCache
from gpt2engine.engine.request import Request, Status
from gpt2engine.errors import GPT2EngineError

DEFAULT_MAX_QUEUE = 64  # requests waiting for a cache row
DEFAULT_PREFILL_CHUNK = 256  # a prompt is prefilled in pieces of this many tokens (the prefix cache's blocks)
DEFAULT_SPECULATIVE_TOKENS = 8  # the most tokens proposed for a request a step (speculative.py)
SPECULATIVE_BUDGET = 32  # positions a step verifies, all rows together, before speculation backs off


class QueueFull(GPT2EngineError):
    """The waiting queue is at its limit; try again later (HTTP 503 + Retry-After)."""


@dataclass(frozen=True)
class PrefillChunk:
    """Copy `cached` (pinned blocks of the prefix cache) into the request's row, then compute
    prompt tokens [start, stop)."""

    request: Request
    start: int
    stop: int
    cached: tuple[Block, ...] = ()


@dataclass(frozen=True)
class Schedule:
    admitted: list[Request]  # new in a row this step: the runner sets up their sampling state
    prefill: list[PrefillChunk]
    decode: list[Request]  # requests that feed their last token this step


class Scheduler:
    def __init__(
        self, max_batch: int, max_queue: int, prefill_chunk: int, prefix_cache: PrefixCache | None = None,
        max_batched_tokens: int | None = None,
    ) -> None:
        """`max_batched_tokens`: a step's tokens, decoding rows and prompt chunks together
        (default: a chunk and a token per row, so a full batch still prefills a chunk a step)."""
        max_batched_tokens = prefill_chunk + max_batch if max_batched_tokens is None else max_batched_tokens
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or max_batched_tokens < 1:
            raise GPT2EngineError("max_batch, prefill_chunk and max_batched_tokens must be >= 1, "
                                  "max_queue >= 0")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_batched_tokens = max_batched_tokens
        self.prefix_cache = prefix_cache  # its blocks are prefill chunks
        self.free_rows = list(range(max_batch))  # a heap: the lowest free row first
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}  # row -> the request holding it

    def add(self, request: Request) -> None:
        if len(self.waiting) - len(self.free_rows) >= self.max_queue:  # free rows admit at once
            raise QueueFull(f"the engine is busy: {len(self.active)} requests running and "
                            f"{self.max_queue} waiting (the limit); try again later")
        self.waiting.append(request)

    def schedule(self) -> Schedule:
        """Admit waiting requests into free rows, then pick the requests that decode and this
        step's prefill chunks (what the token budget leaves)."""
        admitted = []
        while self.waiting and self.free_rows:
            request = self.waiting.popleft()
            request.row, request.status = heapq.heappop(self.free_rows), Status.PREFILLING
            self.active[request.row] = request
            admitted.append(request)
        decode = [r for r in self.active.values() if r.status is Status.DECODING]
        prefill: list[PrefillChunk] = []
        budget = self.max_batched_tokens - len(decode)
        for request in sorted(self.active.values(), key=lambda r: r.arrival):
            if request.status is not Status.PREFILLING:
                continue
            cached = self.cached_blocks(request)
            start = request.prefilled + len(cached) * self.prefill_chunk
            stop = min(start + self.prefill_chunk, len(request.prompt_ids))
            if prefill and stop - start > budget:
                if self.prefix_cache is not None:
                    self.prefix_cache.unpin(cached)
                break
            prefill.append(PrefillChunk(request, start, stop, tuple(cached)))
            budget -= stop - start
        return Schedule(admitted, prefill, sorted(decode, key=lambda r: r.held_row))

    def cached_blocks(self, request: Request) -> list[Block]:
        options = request.options
        if self.prefix_cache is None or options.hooked:
            return []
        return self.prefix_cache.match(request.prompt_ids, request.prefilled, options.prompt_logprobs,
                                       options.prompt_logprobs_from)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out: free its row, or drop it from the queue."""
        if request.row is not None and self.active.get(request.row) is request:
            del self.active[request.row]
            heapq.heappush(self.free_rows, request.row)
            request.row = None
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def rows_in_use(self) -> int:
        return len(self.active)
