"""Generation against transformers' generate on the same checkpoint, and the text layer."""

import pytest
import torch

from gpt2engine import GPT2, GPT2EngineError
from gpt2engine.engine.request import TextState
from gpt2engine.generate import GenerationOptions, complete, stream
from gpt2engine.sampling_params import SamplingParams

PROMPTS = ["Hello world, this is", "The", "A longer prompt, with quite a few more tokens in it than the rest"]
GREEDY = SamplingParams(temperature=0)


def greedy(max_new_tokens=24, **options):
    return GenerationOptions(max_new_tokens=max_new_tokens, sampling=GREEDY, ignore_eos=True, **options)


def test_greedy_matches_transformers_single_with_and_without_cache(tiny_model, reference):
    model, tokenizer = tiny_model
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        [ours] = complete(model, tokenizer, [prompt], greedy())
        for use_cache in (True, False):
            theirs = reference.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                        use_cache=use_cache, pad_token_id=50256)
            assert ours.token_ids == theirs[0, ids.shape[1]:].tolist()


def test_greedy_batch_matches_transformers_batch(tiny_model, reference):
    model, tokenizer = tiny_model
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, encoded))
    ids = torch.tensor([[50256] * (width - len(e)) + e for e in encoded])  # left padding
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    theirs = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                                min_new_tokens=24, pad_token_id=50256)[:, width:]
    ours = complete(model, tokenizer, PROMPTS, greedy())
    assert [r.token_ids for r in ours] == theirs.tolist()


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(top_k=40, top_p=0.9, seed=3),
                                      SamplingParams(temperature=0.7, min_p=0.05, seed=11,
                                                     repetition_penalty=1.3)])
def test_each_row_of_a_batch_equals_the_prompt_alone(tiny_model, sampling):
    model, tokenizer = tiny_model
    options = GenerationOptions(max_new_tokens=16, sampling=sampling, ignore_eos=True)
    batch = complete(model, tokenizer, PROMPTS, options)
    alone = [complete(model, tokenizer, [p], options)[0] for p in PROMPTS]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]


def test_fixed_seed_reproduces_and_another_seed_differs(tiny_model):
    model, tokenizer = tiny_model

    def sample(seed):
        options = GenerationOptions(max_new_tokens=20, sampling=SamplingParams(seed=seed))
        return complete(model, tokenizer, ["Once upon a time"], options)[0].token_ids

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_stream_equals_complete_and_counts_tokens(tiny_model):
    model, tokenizer = tiny_model
    options = greedy(max_new_tokens=30)
    [result] = complete(model, tokenizer, [PROMPTS[0]], options)
    assert "".join(stream(model, tokenizer, PROMPTS[0], options)) == result.text
    assert result.text == tokenizer.decode(result.token_ids)
    assert (result.completion_tokens, result.finish_reason) == (30, "length")
    assert result.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))


def test_stop_string_across_token_boundaries(tiny_model):
    model, tokenizer = tiny_model
    [free] = complete(model, tokenizer, [PROMPTS[0]], greedy())
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    boundary = len(pieces[3]) + len(pieces[4]) + len(pieces[5])
    cut = sum(map(len, pieces[:3]))
    stop = free.text[cut + 1 : cut + boundary - 1]  # starts inside token 3, ends inside token 5
    options = greedy(stop=("never appears", stop))
    [stopped] = complete(model, tokenizer, [PROMPTS[0]], options)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    streamed = list(stream(model, tokenizer, PROMPTS[0], options))
    assert "".join(streamed) == stopped.text


def test_end_of_text_ends_a_row_unless_ignored(tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer.encode("Hello world<|endoftext|> more")
    row = TextState(tokenizer, GenerationOptions(max_new_tokens=10))
    text = "".join(row.push(t) for t in ids if row.finish_reason is None)
    assert (text, row.finish_reason, len(row.token_ids)) == ("Hello world", "stop", 2)
    ignoring = TextState(tokenizer, GenerationOptions(max_new_tokens=len(ids), ignore_eos=True))
    text = "".join(ignoring.push(t) for t in ids)
    assert text == "Hello world<|endoftext|> more"
    assert ignoring.finish_reason == "length"


def test_streaming_never_splits_a_character(tiny_model):
    _, tokenizer = tiny_model
    text = "Ça va? 😀 日本語 👨‍👩‍👧 🇯🇵!"
    row = TextState(tokenizer, GenerationOptions(max_new_tokens=100))
    pieces = [row.push(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some token ended mid-character and was held back


def test_held_back_stop_prefix_is_released_when_it_does_not_complete(tiny_model):
    _, tokenizer = tiny_model
    row = TextState(tokenizer, GenerationOptions(max_new_tokens=100, stop=("world peace",)))
    pieces = [row.push(t) for t in tokenizer.encode("hello world order")]
    assert pieces == ["hello", " ", "world order"]


def test_prompt_too_long_is_an_error_before_any_work(tiny_model):
    model, tokenizer = tiny_model
    prompt = "word" + " word" * 119
    with pytest.raises(GPT2EngineError, match=r"prompt of 120 tokens \+ 24 new tokens exceeds the "
                                              r"model's context of 128"):
        complete(model, tokenizer, [prompt], greedy())
    [kept] = complete(model, tokenizer, [prompt], greedy(truncate="left"))
    assert kept.prompt_tokens == 128 - 24
    with pytest.raises(GPT2EngineError, match="leaves no room for a prompt"):
        complete(model, tokenizer, ["hi"], greedy(max_new_tokens=128))


def test_empty_prompt_starts_from_end_of_text(tiny_model):
    model, tokenizer = tiny_model
    [result] = complete(model, tokenizer, [""], greedy(max_new_tokens=5))
    assert result.prompt_tokens == 1 and result.completion_tokens == 5


@pytest.mark.parametrize(("options", "message"), [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(truncate="right"), "truncate must be"), (dict(stop=("",)), "stop strings must not be empty"),
])
def test_invalid_options(options, message):
    with pytest.raises(GPT2EngineError, match=message):
        GenerationOptions(**options)


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, t: complete(m, t, []), "prompts must be a non-empty list"),
    (lambda m, t: complete(m, t, "abc"), "prompts must be a non-empty list"),
    (lambda m, t: GenerationOptions(max_new_tokens=1.5), "max_new_tokens must be an integer"),
    (lambda m, t: SamplingParams(seed="abc"), "seed must be an integer"),
    (lambda m, t: GenerationOptions(stop="xyz"), "stop must be a tuple of strings"),
    (lambda m, t: t.decode([-1]), "token id -1 is not in the vocabulary"),
    (lambda m, t: t.decode([1.5]), "token id 1.5 is not in the vocabulary"),
    (lambda m, t: GPT2.from_pretrained("x", device="nonsense"), "device must be"),
    (lambda m, t: GPT2.from_pretrained("x", dtype="int4"), "dtype must be one of"),
    (lambda m, t: t.encode(b"bytes"), "text must be a string"),
])
def test_the_api_refuses_what_the_cli_refuses(tiny_model, call, message):
    with pytest.raises(GPT2EngineError, match=message):
        call(*tiny_model)
