"""The weights' block of huge pages: tensors laid out in it, and what happens when it is full."""

import gc
from pathlib import Path

import pytest
import torch

from gpt2engine import GPT2
from gpt2engine.loading.arena import ALIGNMENT, HUGE_PAGE, Arena


def mapping_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_tensors_are_laid_out_aligned_one_after_another_from_a_huge_page_boundary():
    arena = Arena(1024 + 64 + 256)  # the three, each padded to a cache line
    first = arena.empty((10, 100), torch.uint8)
    second = arena.empty((7,), torch.bfloat16)
    third = arena.empty((8, 8), torch.float32)
    assert first.data_ptr() % HUGE_PAGE == 0
    assert second.data_ptr() == first.data_ptr() + 1024  # 1000 bytes, padded to a cache line
    assert third.data_ptr() == second.data_ptr() + ALIGNMENT
    assert third.shape == (8, 8) and third.dtype == torch.float32 and third.is_contiguous()
    third.fill_(2.5)
    first.fill_(1)
    assert bool((third == 2.5).all()) and int(second.numel()) == 7


def test_the_block_is_asked_for_huge_pages():
    tensor = Arena(HUGE_PAGE).empty((HUGE_PAGE // 4,), torch.float32)
    assert "hg" in mapping_flags(tensor.data_ptr())  # madvise(MADV_HUGEPAGE) took


def test_what_does_not_fit_comes_from_torch_and_the_block_lives_as_long_as_its_tensors():
    arena = Arena(256)
    inside = arena.empty((64,), torch.float32)
    outside = arena.empty((1,), torch.float32)  # 256 bytes are taken
    assert "hg" in mapping_flags(inside.data_ptr()) and "hg" not in mapping_flags(outside.data_ptr())
    del arena
    gc.collect()
    inside.fill_(3.0)  # still mapped: the tensor holds the block
    assert float(inside.sum()) == 192.0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_the_weights_a_decode_step_streams_share_one_block(tiny_checkpoint, dtype):
    model = GPT2.from_pretrained(tiny_checkpoint, dtype=dtype)
    layers = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in model.h]
    modules = [model.wte, *(m for layer in layers for m in layer)]
    streamed = [m.weight for m in modules] + ([m.scale for m in modules] if dtype == "int8" else [])
    starts = sorted(t.data_ptr() for t in streamed)
    assert starts[0] % HUGE_PAGE == 0 and all(start % ALIGNMENT == 0 for start in starts)
    assert all("hg" in mapping_flags(start) for start in starts)
    last = max(streamed, key=lambda t: t.data_ptr())
    used = last.data_ptr() + last.numel() * last.element_size() - starts[0]
    assert used < sum(t.numel() * t.element_size() + ALIGNMENT for t in streamed)  # packed, no gaps
    assert "hg" not in mapping_flags(model.ln_f.weight.data_ptr())  # a view of the file's mapping
