"""The fused decode step (kernels/step.py, step.c) against torch's path through model.py: every
format, the config variants, the cache it writes, batch invariance, and where it does not apply."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CONFIGS
from gpt2engine import GPT2
from gpt2engine.engine.runner import Runner
from gpt2engine.kernels import step as step_module
from gpt2engine.kernels.step import DecodeStep

ROWS, SLOTS, PROMPT = 3, 16, 10
POSITIONS = [10, 3, 7]  # each row decodes at its own position; slots past it must be ignored


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint):
    untied = dict(TINY_CONFIGS["odd-heads"], tie_word_embeddings=False)
    return {name: make_checkpoint(**config) for name, config in [*TINY_CONFIGS.items(), ("untied", untied)]}


def prefilled(model: GPT2, rows: int = ROWS):
    """A cache whose rows each hold a random prompt, prefilled row by row (the same bits whatever
    the number of rows)."""
    torch.manual_seed(1)
    cache = model.make_cache(rows, SLOTS)
    for row in range(rows):
        ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
        with torch.inference_mode():
            model(ids, torch.arange(PROMPT)[None], [c.rows(row, row + 1) for c in cache], PROMPT)
    return cache


def torch_step(model: GPT2, cache, tokens: list[int], positions: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache, SLOTS)
    return logits[:, -1]


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("variant", [*TINY_CONFIGS, "untied"])
def test_matches_torchs_path_and_writes_the_same_cache(checkpoints, variant, fmt):
    model = GPT2.from_pretrained(checkpoints[variant], dtype=fmt)
    fused_cache, torch_cache = prefilled(model), prefilled(model)
    step = DecodeStep.build(model, fused_cache)
    assert step is not None
    tokens, positions = [1, model.config.vocab_size - 1, 7], list(POSITIONS)
    for _ in range(4):  # a few steps, each fed the tokens both paths chose
        fused = step(tokens, positions)
        expected = torch_step(model, torch_cache, tokens, positions)
        # int8: activations are quantized after a LayerNorm whose last bit may differ
        tolerance = (1e-4 if fmt != "int8" else 2e-3) * max(1.0, expected.abs().max().item())
        assert fused.shape == expected.shape and (fused - expected).abs().max() <= tolerance
        for ours, theirs in zip(fused_cache, torch_cache, strict=True):
            assert max((ours.k - theirs.k).abs().max(), (ours.v - theirs.v).abs().max()) <= tolerance
        tokens, positions = expected.argmax(-1).tolist(), [p + 1 for p in positions]


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_a_row_gives_the_same_bits_alone_and_in_a_batch(checkpoints, fmt):
    model = GPT2.from_pretrained(checkpoints["wide-mlp"], dtype=fmt)
    batch_cache, alone_cache = prefilled(model), prefilled(model, rows=1)
    together = DecodeStep.build(model, batch_cache)([3, 4, 5], POSITIONS)
    alone = DecodeStep.build(model, alone_cache)([3], POSITIONS[:1])
    assert torch.equal(alone, together[:1])
    assert torch.equal(alone_cache[0].k[0], batch_cache[0].k[0])


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_consecutive_positions_of_one_row_in_one_call_are_its_steps_one_by_one(checkpoints, fmt):
    """A speculative verification: step rows that feed one cache row at consecutive positions
    (beside another row's step) give the bits of feeding them one step at a time."""
    model = GPT2.from_pretrained(checkpoints["odd-heads"], dtype=fmt)
    at_once, one_by_one = prefilled(model), prefilled(model)
    tokens = [5, 17, 2, 40]
    together = DecodeStep.build(model, at_once)([*tokens, 9], [10, 11, 12, 13, 3], rows=[0, 0, 0, 0, 1])
    step = DecodeStep.build(model, one_by_one)
    steps = [step([tokens[0], 9], [10, 3], rows=[0, 1])]
    steps += [step([token], [10 + i], rows=[0]) for i, token in enumerate(tokens[1:], 1)]
    assert torch.equal(together[:4], torch.cat([steps[0][:1], *steps[1:]]))
    assert torch.equal(together[4], steps[0][1])
    for a, b in zip(at_once, one_by_one, strict=True):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_tokens_or_positions_out_of_range_are_refused(checkpoints):
    model = GPT2.from_pretrained(checkpoints["one-head"])
    step = DecodeStep.build(model, model.make_cache(2, 8))
    for tokens, positions in [([50], [0]), ([-1], [0]), ([1], [8]), ([1, 2, 3], [0, 0, 0]), ([1], [0, 1])]:
        with pytest.raises(ValueError, match="out of range"):
            step(tokens, positions)
    with pytest.raises(ValueError, match="out of range"):
        step([1, 2], [0, 1], rows=[0, 2])


def test_where_it_does_not_apply_the_engine_takes_torchs_path(checkpoints, monkeypatch):
    model = GPT2.from_pretrained(checkpoints["one-head"])
    assert Runner(model, max_batch=2, max_len=8, vocab_limit=50).fused_step is not None
    assert DecodeStep.build(model.double(), model.make_cache(1, 8)) is None  # not float32
    model = GPT2.from_pretrained(checkpoints["one-head"])
    monkeypatch.setattr(step_module, "MAX_ATTENTION_SLOTS", 7)
    assert DecodeStep.build(model, model.make_cache(1, 8)) is None  # past the attention's slot limit
    monkeypatch.undo()
    model.h[0].mlp.c_fc.weight.requires_grad_(True)
    assert DecodeStep.build(model, model.make_cache(1, 8)) is None  # autograd


GENERATE = """
import json, sys
from gpt2engine import GPT2, GenerationOptions, SamplingParams, Tokenizer, complete
model, tokenizer = GPT2.from_pretrained(sys.argv[1]), Tokenizer.from_pretrained(sys.argv[1])
options = GenerationOptions(max_new_tokens=12, sampling=SamplingParams(temperature=0.8, seed=3))
results = complete(model, tokenizer, ["The quick brown fox", "Hello"], options)
print(json.dumps([r.token_ids for r in results]))
"""


@pytest.mark.slow
def test_generation_is_the_same_without_the_kernels(tiny_checkpoint):
    def generate(kernels: str) -> list[list[int]]:
        env = {**os.environ, "GPT2ENGINE_KERNELS": kernels}
        child = subprocess.run([sys.executable, "-c", GENERATE, str(tiny_checkpoint)], check=True,
                               capture_output=True, text=True, env=env)
        return json.loads(child.stdout)

    assert generate("0") == generate("1")  # torch's path (checked against transformers) and ours
