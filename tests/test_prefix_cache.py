"""The prefix cache: a request that starts from cached blocks gets the same bits as without the
cache (tokens, logprobs, prompt logprobs), whatever arrives beside it, under eviction and abort."""

import pytest
import torch

from gpt2engine import GPT2
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.engine.prefix_cache import PrefixCache
from gpt2engine.sampling_params import SamplingParams

CHUNK = 16  # tokens a block (and a prefill chunk): the tiny model's prompts span several
SHARED = ("The isle is full of noises, sounds and sweet airs, that give delight and hurt not. "
          "Sometimes a thousand twangling instruments will hum about mine ears; and sometime voices")
ENDINGS = [" that, if I then had waked", " will make me sleep again", " and then, in dreaming",
           " the clouds methought would open", ""]
SETTINGS = [SamplingParams(temperature=0), SamplingParams(top_k=40, top_p=0.9, seed=3),
            SamplingParams(temperature=0.8, seed=11, repetition_penalty=1.2)]


def options(i: int) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=6 + i % 4, sampling=SETTINGS[i % 3], ignore_eos=True,
                             logprobs=2, prompt_logprobs=[None, 1, 5][i % 3])


def run(engine: Engine, work: list[tuple[int, str, GenerationOptions]], abort: dict[int, int] | None = None):
    """Add each (step, prompt, options) at its step, abort request i at step abort[i]; step to the
    end -> the requests."""
    requests, step = {}, 0
    while step <= max(s for s, _, _ in work) or engine.has_work():
        for i, (at, prompt, opts) in enumerate(work):
            if at == step:
                requests[i] = engine.add_request(prompt, opts)
        for i, at in (abort or {}).items():
            if at == step and i in requests:
                engine.abort(requests[i].request_id)
        engine.step()
        step += 1
    return [requests[i] for i in range(len(work))]


def outcome(request) -> tuple:
    return (request.output_ids, [(lp.logprob, lp.top) for lp in request.prompt_logprobs],
            request.finish_reason)


def engines(tiny_model, mib: float, max_batch: int = 3) -> tuple[Engine, Engine]:
    model, tokenizer = tiny_model
    return (Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=CHUNK, prefix_cache_mib=mib),
            Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=CHUNK, prefix_cache_mib=0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_staggered_requests_with_shared_prefixes_get_the_same_bits(tiny_model, tiny_checkpoint, dtype):
    if dtype != "float32":
        tiny_model = (GPT2.from_pretrained(tiny_checkpoint, dtype=dtype), tiny_model[1])
    work = [(2 * i, SHARED + ENDINGS[i % len(ENDINGS)], options(i)) for i in range(8)]
    work += [(3, SHARED[:60], options(8)), (5, "Nothing shared at all here, " * 3, options(9))]
    cached, plain = engines(tiny_model, 64)
    with_cache, without = run(cached, work), run(plain, work)
    assert [outcome(r) for r in with_cache] == [outcome(r) for r in without]  # bit for bit
    assert all(r.cached_tokens == 0 for r in without)
    assert sum(r.cached_tokens for r in with_cache[1:8]) >= 7 * CHUNK  # most of them hit
    stats = cached.prefix_cache.stats
    assert stats.hit_tokens == sum(r.cached_tokens for r in with_cache)
    assert stats.queried_tokens == sum(len(r.prompt_ids) for r in with_cache)


def test_a_partial_hit_computes_only_the_rest(tiny_model):
    cached, _ = engines(tiny_model, 64)
    tokenizer = cached.tokenizer
    first = run(cached, [(0, SHARED, options(2))])[0]  # keeps the top 5 prompt logprobs
    ids = tokenizer.encode(SHARED)
    blocks = (len(ids) - 1) // CHUNK
    assert cached.prefix_cache.stats.blocks == len(ids) // CHUNK and first.cached_tokens == 0
    branch = ids[: 2 * CHUNK + 3] + tokenizer.encode(" and a different road")  # shares 2 blocks
    second, whole = run(cached, [(0, branch, options(1)), (0, ids, options(2))])
    assert second.cached_tokens == 2 * CHUNK and whole.cached_tokens == blocks * CHUNK


def test_a_prompt_of_whole_blocks_still_computes_its_last_token(tiny_model):
    cached, plain = engines(tiny_model, 64)
    ids = cached.tokenizer.encode(SHARED)[: 3 * CHUNK]
    work = [(0, ids, options(0)), (1, ids, options(0))]
    again = run(cached, work)
    assert again[1].cached_tokens == 2 * CHUNK  # not the block holding the last token
    assert [outcome(r) for r in again] == [outcome(r) for r in run(plain, work)]


def test_eviction_under_memory_pressure_keeps_the_bound_and_the_bits(tiny_model):
    model, _ = tiny_model
    block_bytes = 2 * model.config.n_layer * CHUNK * model.config.n_embd * 4
    cached, plain = engines(tiny_model, 3 * block_bytes / 2**20)  # three blocks, no log-softmax rows
    words = ["red", "green", "red", "blue", "red", "gold", "red", "green", "blue", "red"]
    work = [(3 * i, f"{word} " * 40 + ENDINGS[i % 5], options(3 * i)) for i, word in enumerate(words)]
    with_cache = run(cached, work)
    assert [outcome(r) for r in with_cache] == [outcome(r) for r in run(plain, work)]
    stats = cached.prefix_cache.stats
    assert stats.bytes <= 3 * block_bytes and stats.blocks <= 3 and stats.hit_tokens > 0


def test_an_aborted_request_leaves_its_blocks_to_the_others(tiny_model):
    cached, plain = engines(tiny_model, 64)
    work = [(0, SHARED + ENDINGS[0], options(0)), (4, SHARED + ENDINGS[1], options(3)),
            (5, SHARED + ENDINGS[2], options(6)), (12, SHARED, options(9))]
    with_cache = run(cached, work, abort={1: 6})
    without = run(plain, work, abort={1: 6})
    assert with_cache[1].finish_reason == without[1].finish_reason == "abort"
    others = [0, 2, 3]  # (the aborted one got further with the cache before its abort)
    assert [outcome(with_cache[i]) for i in others] == [outcome(without[i]) for i in others]
    assert with_cache[2].cached_tokens > 0 and with_cache[3].cached_tokens > 0
    assert all(b.pins == 0 for b in cached.prefix_cache.blocks.values())


def test_two_requests_arriving_together_share_the_first_ones_prefill(tiny_model):
    cached, plain = engines(tiny_model, 64)
    work = [(0, SHARED + ENDINGS[0], options(0)), (0, SHARED + ENDINGS[1], options(3))]
    first, second = run(cached, work)
    assert second.cached_tokens > 0 and first.cached_tokens == 0
    assert [outcome(r) for r in (first, second)] == [outcome(r) for r in run(plain, work)]


def test_blocks_without_logprobs_serve_the_cache_but_not_a_logprobs_request(tiny_model):
    cached, _ = engines(tiny_model, 64)
    plain_options = GenerationOptions(max_new_tokens=2, sampling=SETTINGS[0])
    wanting = GenerationOptions(max_new_tokens=2, sampling=SETTINGS[0], prompt_logprobs=3)
    _, second, third, fourth = run(cached, [(0, SHARED, plain_options), (3, SHARED, wanting),
                                            (6, SHARED, wanting), (9, SHARED, plain_options)])
    assert second.cached_tokens == 0  # the first one kept no logprobs: computed again, kept now
    assert third.cached_tokens > 0 and fourth.cached_tokens > 0
    assert third.prompt_logprobs == second.prompt_logprobs
    more = GenerationOptions(max_new_tokens=2, sampling=SETTINGS[0], prompt_logprobs=8)
    assert run(cached, [(0, SHARED, more)])[0].cached_tokens == 0  # kept only the top 5


def test_a_matched_block_is_never_evicted_before_it_is_copied():
    cache = PrefixCache(block=2, capacity=2 * 2 * 8)  # two blocks of one layer (1, 1, 2, 1) floats
    row = [type("Layer", (), {"k": torch.arange(8.0).view(1, 1, 8, 1), "v": torch.zeros(1, 1, 8, 1)})]
    cache.insert([1, 2, 3, 4, 5], 0, row, None)
    cache.insert([1, 2, 3, 4, 5], 1, row, None)
    [first, second] = cache.match([1, 2, 3, 4, 5], 0, None)
    assert first.pins == second.pins == 1
    cache.insert([7, 8, 9], 0, row, None)  # no room: every block is pinned or a parent
    assert cache.stats.blocks == 2 and [7, 8] not in [list(b.key[1]) for b in cache.blocks.values()]
    cache.unpin([first, second])
    cache.insert([7, 8, 9], 0, row, None)  # now the least recently used leaf goes
    assert {b.key[1] for b in cache.blocks.values()} == {(1, 2), (7, 8)}
    assert cache.stats.bytes == 2 * 2 * 2 * 4


def test_no_prefix_cache_and_bad_sizes(tiny_model):
    model, tokenizer = tiny_model
    assert Engine(model, tokenizer, prefix_cache_mib=0).prefix_cache is None
    with pytest.raises(Exception, match="prefix cache's size must be >= 0 MiB"):
        Engine(model, tokenizer, prefix_cache_mib=-1)


@pytest.mark.slow
def test_the_124m_config_with_the_default_chunk(gpt2_124m_checkpoint, tiny_model):
    _, tokenizer = tiny_model
    model = GPT2.from_pretrained(gpt2_124m_checkpoint)
    prefix = tokenizer.encode(SHARED * 20)[:600]
    assert len(prefix) == 600
    work = [(0, prefix + tokenizer.encode(ENDINGS[0]), options(2)),
            (1, prefix + tokenizer.encode(ENDINGS[1]), options(3))]
    cached = Engine(model, tokenizer, max_batch=2)
    with_cache = run(cached, work)
    without = run(Engine(model, tokenizer, max_batch=2, prefix_cache_mib=0), work)
    assert with_cache[1].cached_tokens == 512
    assert [outcome(r) for r in with_cache] == [outcome(r) for r in without]
