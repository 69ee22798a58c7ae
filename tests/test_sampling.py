"""Each sampling step against its transformers logits processor, on the same logits."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2engine import GPT2EngineError
from gpt2engine.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
    next_tokens,
    process_logits,
)

VOCAB = 500


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, VOCAB) * 3


@pytest.fixture
def history():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (4, 30))


def seen_mask(history):
    return torch.zeros(history.shape[0], VOCAB, dtype=torch.bool).scatter(1, history, True)


def assert_same(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(logits, history, penalty):
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert_same(apply_repetition_penalty(logits, seen_mask(history), penalty), theirs)


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature(logits, history, temperature):
    assert_same(apply_temperature(logits, temperature),
                TemperatureLogitsWarper(temperature)(history, logits.clone()))


@pytest.mark.parametrize("k", [1, 40, VOCAB, VOCAB + 10])
def test_top_k(logits, history, k):
    assert_same(apply_top_k(logits, k), TopKLogitsWarper(k)(history, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 1.0])
def test_top_p(logits, history, p):
    assert_same(apply_top_p(logits, p), TopPLogitsWarper(p)(history, logits.clone()))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p(logits, history, min_p):
    assert_same(apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(history, logits.clone()))


def test_whole_pipeline_in_transformers_order(logits, history):
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    theirs = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(50),
        TopPLogitsWarper(0.9), MinPLogitsWarper(0.02),
    ])(history, logits.clone())
    assert_same(process_logits(logits, seen_mask(history), params), theirs)


def test_greedy_is_argmax_after_repetition_penalty(logits, history):
    params = SamplingParams(temperature=0, repetition_penalty=5.0)
    seen = seen_mask(history)
    expected = apply_repetition_penalty(logits, seen, 5.0).argmax(-1)
    assert torch.equal(next_tokens(logits, seen, params, []), expected)


def generators(seed, n):
    return [torch.Generator().manual_seed(seed) for _ in range(n)]


def test_fixed_seed_reproduces_a_sample_and_rows_are_independent(logits):
    first = draw(logits, generators(7, 4))
    assert torch.equal(draw(logits, generators(7, 4)), first)
    assert torch.equal(draw(logits[2:3], generators(7, 1)), first[2:3])  # alone = in the batch
    assert not torch.equal(torch.stack([draw(logits, generators(s, 4)) for s in range(5)]),
                           first.expand(5, 4))


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    generator = [torch.Generator().manual_seed(0)]
    counts = torch.bincount(torch.cat([draw(probs.log()[None], generator) for _ in range(20000)]),
                            minlength=4)
    assert torch.allclose(counts / 20000, probs, atol=0.015)


def test_filtered_tokens_are_never_drawn(logits):
    filtered = apply_top_k(logits, 3)
    allowed = ~torch.isinf(filtered)
    for seed in range(50):
        tokens = draw(filtered, generators(seed, 4))
        assert allowed[torch.arange(4), tokens].all()


@pytest.mark.parametrize(
    ("params", "message"),
    [(dict(temperature=-1), "temperature must be >= 0"), (dict(top_k=-2), "top_k must be"),
     (dict(top_p=0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), "top_p must be"),
     (dict(min_p=2), "min_p must be"), (dict(repetition_penalty=0), "repetition_penalty must be > 0")],
)
def test_invalid_parameters(params, message):
    with pytest.raises(GPT2EngineError, match=message):
        SamplingParams(**params)
