"""The prefix cache: KV blocks of prompts already computed, and their prompt log-probabilities,
kept in a bounded store and copied into a new request's row instead of being computed again.

A block is one prefill chunk of a prompt (`prefill_chunk` tokens at a fixed offset: positions
[jC, (j+1)C)), keyed by its tokens and the block before it, so a key names a whole prefix
exactly (no hash to collide). Because a block is exactly a piece the engine computes anyway, and
a prompt is always prefilled in the same pieces, a request that starts from cached blocks computes
the rest of its prompt in the pieces it would compute without them: the same bits, whatever the
kernels (docs/engine.md#prefix-caching says why the block is a chunk and not smaller).

Blocks are copied, not shared: a request's row holds its own copy, so the decode step and its
kernels never see the cache, a request holds no block once its prefill has copied it, and a
block is pinned only between the scheduler matching it and the runner copying it. The store is
bounded in bytes; inserting beyond it evicts the least recently used block that no longer
prefix of another (a leaf), never a pinned one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt2engine.engine.request import TokenLogprob

if TYPE_CHECKING:  # (the CLI reads this file's default before torch is imported)
    import torch

DEFAULT_PREFIX_CACHE_MIB = 1024
RECORDED_TOP = 5  # the top log-probabilities kept per cached prompt position (at least)


@dataclass(frozen=True)
class BlockLogprobs:
    """A block's prompt log-probabilities, as the request that computed it got them: at each of
    its positions, the next token's and the top `top`. The last position's next token is the
    following block's first, which the key does not fix, so that position's whole log-softmax
    row (V,) is kept to read any next token's from."""

    entries: list[TokenLogprob]  # one per position of the block
    last_row: torch.Tensor  # (V,) float32
    top: int

    def for_next(self, token: int, top: int) -> list[TokenLogprob]:
        """The block's entries when `token` follows it, each with its `top` (<= self.top) others."""
        last = TokenLogprob(float(self.last_row[token]), self.entries[-1].top)
        return [e.truncated(top) for e in [*self.entries[:-1], last]]


@dataclass(eq=False)
class Block:
    key: tuple = field(repr=False)
    parent: Block | None = field(repr=False)
    keys: list[torch.Tensor] = field(repr=False)  # per layer (nh, C, hs)
    values: list[torch.Tensor] = field(repr=False)
    nbytes: int
    logprobs: BlockLogprobs | None = field(default=None, repr=False)
    children: int = 0
    pins: int = 0
    last_used: int = 0

    def serves(self, top: int | None, scored: bool) -> bool:
        """Whether it can stand in for computing, for a request wanting `top` prompt logprobs
        (None: none) of which some fall in this block (`scored`)."""
        return top is None or not scored or (self.logprobs is not None and self.logprobs.top >= top)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens of every request looked up
    hit_tokens: int = 0  # of those, how many came from the cache
    blocks: int = 0
    bytes: int = 0


@dataclass
class PrefixCache:
    """Blocks of `block` tokens, at most `capacity` bytes of them (keys, values, log-softmax rows)."""

    block: int
    capacity: int
    blocks: dict[tuple, Block] = field(default_factory=dict)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    clock: itertools.count = field(default_factory=itertools.count)

    def match(
        self, ids: list[int], start: int, need_logprobs: int | None = None, logprobs_from: int = 1
    ) -> list[Block]:
        """The cached blocks that continue a prompt whose first `start` tokens (a multiple of the
        block) are in its row: pinned, to be copied this step. Never the block holding the prompt's
        last token, whose logits the request needs; with `need_logprobs`, a block that predicts a
        token from `logprobs_from` on only if it holds log-probabilities of that many top entries."""
        found: list[Block] = []
        parent = self.parent_of(ids, start)
        if start and parent is None:
            return found
        usable = (len(ids) - 1) // self.block
        for j in range(start // self.block, usable):
            block = self.blocks.get(key_of(parent, ids[j * self.block : (j + 1) * self.block]))
            if block is None or not block.serves(need_logprobs, (j + 1) * self.block >= logprobs_from):
                break
            found.append(block)
            parent = block
        now = next(self.clock)
        for block in found:
            block.pins += 1
            ancestor: Block | None = block
            while ancestor is not None:
                ancestor.last_used = now
                ancestor = ancestor.parent
        return found

    def looked_up(self, prompt_tokens: int) -> None:
        """Count a request's prompt as queried (once, whatever its lookups before each chunk)."""
        self.stats.queried_tokens += prompt_tokens

    def parent_of(self, ids: list[int], stop: int) -> Block | None:
        """The cached block ending at `stop` on this prompt's path (None at 0 or if not cached)."""
        parent = None
        for j in range(stop // self.block):
            parent = self.blocks.get(key_of(parent, ids[j * self.block : (j + 1) * self.block]))
            if parent is None:
                return None
        return parent

    def load(self, blocks: list[Block], row: list, start: int) -> None:
        """Copy `blocks` into a row's cache (one KVCache view per layer) from position `start`,
        and unpin them."""
        self.stats.hit_tokens += len(blocks) * self.block
        try:
            for j, block in enumerate(blocks):
                at = start + j * self.block
                for layer, keys, values in zip(row, block.keys, block.values, strict=True):
                    layer.k[0, :, at : at + self.block] = keys
                    layer.v[0, :, at : at + self.block] = values
        finally:
            self.unpin(blocks)

    def unpin(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.pins -= 1

    def unpin_all(self) -> None:
        """After an interrupted step: nothing is being copied any more."""
        for block in self.blocks.values():
            block.pins = 0

    def insert(self, ids: list[int], index: int, row: list, logprobs: BlockLogprobs | None) -> None:
        """Keep block `index` of a prompt, just computed into its row (one KVCache view per
        layer), with its log-probabilities if the request computed them."""
        parent = self.parent_of(ids, index * self.block)
        if index and parent is None:
            return  # its prefix was evicted meanwhile: a block nobody could reach
        key = key_of(parent, ids[index * self.block : (index + 1) * self.block])
        known = self.blocks.get(key)
        if known is not None and (known.logprobs is not None or logprobs is None):
            known.last_used = next(self.clock)
            return
        at = slice(index * self.block, (index + 1) * self.block)
        kv_bytes = 0 if known else 2 * sum(layer.k[0, :, at].nbytes for layer in row)
        nbytes = kv_bytes + (logprobs.last_row.nbytes if logprobs else 0)
        if not self.make_room(nbytes, keep=known or parent):
            return
        if known is None:
            known = Block(key, parent, [layer.k[0, :, at].clone() for layer in row],
                          [layer.v[0, :, at].clone() for layer in row], 0)
            self.blocks[key] = known
            self.stats.blocks += 1
            if parent is not None:
                parent.children += 1
        known.logprobs = known.logprobs or logprobs  # a request that wanted them computed them again
        known.nbytes += nbytes
        known.last_used = next(self.clock)
        self.stats.bytes += nbytes

    def make_room(self, nbytes: int, keep: Block | None) -> bool:
        """Evict least recently used leaves (never `keep`, never a pinned block) until `nbytes`
        more fit; False if they cannot."""
        while self.stats.bytes + nbytes > self.capacity:
            leaves = [b for b in self.blocks.values() if b.children == 0 and b.pins == 0 and b is not keep]
            if not leaves:
                return False
            self.evict(min(leaves, key=lambda b: b.last_used))
        return True

    def evict(self, block: Block) -> None:
        del self.blocks[block.key]
        self.stats.blocks -= 1
        self.stats.bytes -= block.nbytes
        if block.parent is not None:
            block.parent.children -= 1


def key_of(parent: Block | None, tokens: list[int]) -> tuple:
    """A block's key: its tokens and, through its parent's key, every token before them."""
    return (None if parent is None else parent.key, tuple(tokens))
