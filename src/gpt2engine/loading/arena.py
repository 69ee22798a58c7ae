"""Where a model's weights live on the CPU: one block of memory in 2 MiB pages.

A decode step reads every weight once, about 500 MB a token for the 124M model in float32. In
4 KiB pages that is 120,000 pages a token, far more than the TLB holds, so reading each page
begins with a page-table walk; in 2 MiB pages it is 240 (what that gains, measured:
docs/kernels.md). Linux backs an anonymous mapping with huge pages where it is asked to (madvise
MADV_HUGEPAGE; transparent_hugepage set to `madvise` or `always`); asked before any page is
touched, the pages are huge from the first write (faulting them in is paid once, at load).
Elsewhere, or with huge pages turned off, the block
is ordinary memory and nothing else changes.
"""

from __future__ import annotations

import contextlib
import mmap

import torch

HUGE_PAGE = 2 * 2**20
ALIGNMENT = 64  # a cache line: every tensor starts on one


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class Arena:
    """A block of `nbytes` (plus the alignment of each tensor) handing out tensors one after
    another, each one's pages faulted in as it is handed out (so the block grows in memory as a
    loader fills it); they keep the block alive, and it is given back when the last of them is
    gone. A tensor that no longer fits comes from torch.empty."""

    def __init__(self, nbytes: int) -> None:
        self.block: mmap.mmap | None = None
        self.offset = self.end = 0
        if nbytes <= 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
            return
        self.block = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # a kernel without transparent huge pages
                self.block.madvise(mmap.MADV_HUGEPAGE)
        start = torch.frombuffer(self.block, dtype=torch.uint8, count=1).data_ptr()
        self.offset = -start % HUGE_PAGE  # the first huge page boundary inside the block
        self.end = self.offset + nbytes
        self.faulted = self.offset  # the pages below are in memory

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the block (contiguous, 64-byte aligned)."""
        count = torch.Size(shape).numel()
        nbytes = count * dtype.itemsize
        if self.block is None or count == 0 or self.offset + nbytes > self.end:
            return torch.empty(shape, dtype=dtype)
        tensor = torch.frombuffer(self.block, dtype=dtype, count=count, offset=self.offset)
        self.offset += padded(nbytes)
        while self.faulted < self.offset:  # this tensor's pages, from this thread: two threads
            self.block[self.faulted] = 0  # faulting huge pages at once took 10x as long here
            self.faulted += HUGE_PAGE
        return tensor.view(shape)
