"""CUDA graphs over the decode step.

On a GPU a decode step of GPT-2 is a few hundred small kernels whose launches cost more than
their work. The KV cache never changes shape, so the step for a given number of rows and cache
slots is captured once as a CUDA graph and then replayed with new tokens and positions: one
launch per token instead of hundreds. A step runs the smallest captured bucket that holds it:
rows rounded up to a power of two (the extra rows write the never-read last cache slot, as the
runner's free rows do), slots rounded up to a power of two from 128, up to the cache's length.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from gpt2engine.model import GPT2, KVCache

SMALLEST_LENGTH = 128  # attention reads at most twice the slots in use, at least this many


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class GraphedDecode:
    """The decode step as one replay per (rows, slots) bucket; `capture=False` runs the same
    fixed-shape steps eagerly (the CPU tests check the bucketing that way)."""

    def __init__(self, model: GPT2, cache: list[KVCache], capture: bool = True) -> None:
        self.model, self.cache = model, cache
        B, _, S, _ = cache[0].k.shape
        self.max_len = S
        self.inputs = torch.zeros(2, B, 1, dtype=torch.long, device=model.device)  # tokens, positions
        self.batch_sizes, self.lengths = buckets(B), buckets(S, min(SMALLEST_LENGTH, S))
        self.steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle() if capture else None
        for rows in reversed(self.batch_sizes):  # the largest first: the smaller reuse its memory
            for length in reversed(self.lengths):
                self.steps[rows, length] = (self.captured(rows, length, pool) if capture
                                            else functools.partial(self.forward, rows, length))

    @classmethod
    def build(cls, model: GPT2, cache: list[KVCache]) -> GraphedDecode | None:
        """Captured graphs on CUDA; None elsewhere, or (with a one-line warning) where capture fails."""
        if model.device.type != "cuda":
            return None
        try:
            return cls(model, cache)
        except RuntimeError as error:  # out of memory too (torch.cuda.OutOfMemoryError is one)
            print(f"warning: CUDA graphs unavailable, decoding eagerly ({str(error).splitlines()[0]})",
                  file=sys.stderr, flush=True)
            return None

    @torch.inference_mode()
    def forward(self, rows: int, length: int) -> torch.Tensor:
        # -> logits (rows, V) of the tokens in self.inputs, attending to the first `length` slots
        view = [layer.rows(0, rows) for layer in self.cache]
        return self.model(self.inputs[0, :rows], self.inputs[1, :rows], view, length)[:, -1]

    def captured(self, rows: int, length: int, pool) -> Callable[[], torch.Tensor]:
        """Capture one bucket's step after an eager run (which sets up cuBLAS and the attention
        kernels outside the capture); the padding rows write the last slot only."""
        self.inputs[1].fill_(self.max_len - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(rows, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.forward(rows, length)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    def __call__(self, tokens: list[int], positions: list[int], length: int) -> torch.Tensor:
        """tokens, positions: one per row 0..n-1; length: the slots the real rows attend to ->
        logits (n, V), valid until the next call."""
        n = len(tokens)
        rows = next(b for b in self.batch_sizes if b >= n)
        slots = next(s for s in self.lengths if s >= length)
        padding = rows - n
        host = torch.tensor([tokens + [0] * padding, positions + [self.max_len - 1] * padding])
        self.inputs[:, :rows, 0].copy_(host, non_blocking=True)
        return self.steps[rows, slots]()[:n]
