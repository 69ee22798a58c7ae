"""The CUDA-graph decode step's buckets, checked on the CPU: the same fixed-shape steps run
eagerly (capture=False) must give every request what the engine's own decode step gives it, as
rows and cache lengths cross bucket edges. tests/test_cuda.py checks the captured graphs."""

import pytest
from test_engine import MIXED

from gpt2engine import GPT2, Tokenizer
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.engine.graphs import GraphedDecode, buckets
from gpt2engine.sampling_params import SamplingParams

CONTEXT = 300  # slot buckets 128, 256, 300: a context that is not a power of two
PROMPTS = ["Hello world, this is", "The", "word " * 120, "Once upon a time", "x y " * 125, "1, 2, 3, 4,"]


def test_buckets_are_powers_of_two_then_the_limit():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(300, 128) == [128, 256, 300]
    assert buckets(64, 128) == [64]


def staggered(core: Engine, settings: list[SamplingParams] = MIXED) -> list[list[int]]:
    """Requests joining every other step, each with its own settings; their tokens."""
    requests, step = [], 0
    while len(requests) < len(PROMPTS) or core.has_work():
        if step % 2 == 0 and len(requests) < len(PROMPTS):
            i = len(requests)
            options = GenerationOptions(max_new_tokens=12 + 3 * i, sampling=settings[i], ignore_eos=True)
            requests.append(core.add_request(PROMPTS[i], options))
        core.step()
        step += 1
        assert step < 500
    return [r.output_ids for r in requests]


@pytest.fixture(scope="module")
def long_context_pair(make_checkpoint):
    folder = make_checkpoint(n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, vocab_size=50257)
    return GPT2.from_pretrained(folder), Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("max_batch", [5, 3])
def test_bucketed_steps_give_each_request_the_engines_tokens(long_context_pair, max_batch):
    model, tokenizer = long_context_pair
    expected = staggered(Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=64))
    core = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=64)
    core.runner.fused_step = None
    core.runner.graphed = graphed = GraphedDecode(model, core.runner.cache, capture=False)
    assert graphed.batch_sizes == buckets(max_batch) and graphed.lengths == [128, 256, 300]
    prompt_lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    assert prompt_lengths[2] < 128 < prompt_lengths[2] + 12 + 6  # decoding crosses slot buckets
    assert prompt_lengths[4] < 256 < prompt_lengths[4] + 12 + 12
    assert staggered(core) == expected


def test_warm_up_leaves_no_trace(long_context_pair):
    """The warm-up's throwaway chunk in row 0 does not change what a request there gets."""
    model, tokenizer = long_context_pair
    expected = staggered(Engine(model, tokenizer, max_batch=2))
    core = Engine(model, tokenizer, max_batch=2)
    core.runner.warm_up()
    assert staggered(core) == expected
