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
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling import (
    apply_min_p,
    apply_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    as_int64,
    draw,
    exponential_noise,
    mix64,
    process_logits,
)
from gpt2engine.sampling_params import SamplingParams

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


def test_top_k_per_row_keeps_ties_and_lets_rows_off():
    """A (B,) k, read from the top max(k) of each row: ties with the k-th stay, k >= V keeps all."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, 5.0, 4.0, 3.0, 2.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    kept = ~torch.isinf(apply_top_k(logits, torch.tensor([2, 1, 3, 5])))
    assert kept.tolist() == [[True, False, True, True, False], [False, True, False, False, False],
                             [True] * 5, [True] * 5]
    assert torch.equal(apply_top_k(logits, torch.tensor([5, 7, 5, 5])), logits)


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


ROW_PARAMS = [  # one row each: a batch that mixes settings
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_k=3, min_p=0.2),
    SamplingParams(),
]


def test_per_row_parameters_equal_each_row_alone(logits, history):
    """Tensors of per-row values give each row exactly what its own numbers give it."""
    seen = seen_mask(history)

    def column(name, off=None):
        values = [getattr(p, name) for p in ROW_PARAMS]
        return torch.tensor([len(logits[0]) if v == off else v for v in values])

    batched = apply_repetition_penalty(logits, seen, column("repetition_penalty"))
    batched = apply_temperature(batched, column("temperature"))
    batched = apply_top_k(batched, column("top_k", off=0))
    batched = apply_top_p(batched, column("top_p"))
    batched = apply_min_p(batched, column("min_p"))
    for row, params in enumerate(ROW_PARAMS):
        alone = process_logits(logits[row : row + 1], seen[row : row + 1], params)
        assert_same(batched[row : row + 1], alone)


def test_presence_and_frequency_penalties_follow_openai(logits, history):
    counts = torch.zeros(4, VOCAB, dtype=torch.int32).scatter_add(
        1, history, torch.ones_like(history, dtype=torch.int32))
    presence, frequency = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([0.3, 0.0, -0.7, 1.5])
    ours = apply_penalties(logits, counts, presence, frequency)
    for row in range(4):
        for token in range(VOCAB):
            n = int(counts[row, token])
            expected = logits[row, token] - n * frequency[row] - (n > 0) * presence[row]
            assert abs(float(ours[row, token] - expected)) < 1e-5


def splitmix64_finaliser(x: int) -> int:
    """The reference in plain Python integers."""
    mask = 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_the_hash_is_splitmix64_in_wrapping_int64():
    values = [0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15]
    ours = mix64(torch.tensor([as_int64(v) for v in values])).tolist()
    assert ours == [as_int64(splitmix64_finaliser(v)) for v in values]


def test_noise_is_a_function_of_seed_draw_and_token_only():
    seeds, draws = torch.tensor([as_int64(7), as_int64(2**64 - 1), 7]), torch.tensor([0, 3, 1])
    noise = exponential_noise(seeds, draws, 1000)
    alone = exponential_noise(seeds[1:2], draws[1:2], 1000)
    assert torch.equal(noise[1], alone[0])  # alone = in the batch
    assert not torch.equal(noise[0], noise[2])  # the next draw of the same seed differs
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert abs(float(noise.mean()) - 1.0) < 0.05  # Exp(1) has mean 1


def test_fixed_seed_reproduces_a_sample_and_rows_are_independent(logits):
    seeds, draws = torch.tensor([7, 7, 8, 9]), torch.zeros(4, dtype=torch.long)
    first = draw(logits, seeds, draws)
    assert torch.equal(draw(logits, seeds, draws), first)
    assert torch.equal(draw(logits[2:3], seeds[2:3], draws[2:3]), first[2:3])  # alone = in the batch
    others = torch.stack([draw(logits, seeds + s, draws) for s in range(1, 6)])
    assert not torch.equal(others, first.expand(5, 4))


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    tokens = draw(probs.log().expand(n, 4), torch.full((n,), 3), torch.arange(n))
    assert torch.allclose(torch.bincount(tokens, minlength=4) / n, probs, atol=0.015)


def test_a_draw_after_filters_races_the_tokens_left_as_a_full_race_would():
    """Where filters left few tokens, only theirs are raced: the same token as racing them all."""
    torch.manual_seed(3)
    logits = torch.randn(6, 3000) * 2
    filtered = apply_top_k(logits, torch.tensor([1, 5, 40, 3000, 700, 2]))  # a row left whole, too
    for seed in range(20):
        seeds, draws = torch.full((6,), seed), torch.arange(6) * 7
        full = (filtered.log_softmax(-1) - exponential_noise(seeds, draws, 3000).log()).argmax(-1)
        assert torch.equal(draw(filtered, seeds, draws), full)
        assert torch.equal(draw(filtered[:3], seeds[:3], draws[:3]), full[:3])  # 46 of 9000 raced
        assert torch.equal(draw(filtered[3:5], seeds[3:5], draws[3:5]), full[3:5])  # all of them


def test_filtered_tokens_are_never_drawn(logits):
    filtered = apply_top_k(logits, 3)
    allowed = ~torch.isinf(filtered)
    for seed in range(50):
        tokens = draw(filtered, torch.full((4,), seed), torch.arange(4))
        assert allowed[torch.arange(4), tokens].all()


@pytest.mark.parametrize(
    ("params", "message"),
    [(dict(temperature=-1), "temperature must be >= 0"), (dict(top_k=-2), "top_k must be"),
     (dict(top_p=0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), "top_p must be"),
     (dict(min_p=2), "min_p must be"),
     (dict(repetition_penalty=0), r"repetition_penalty must be in \[0.01, 100\]"),
     (dict(repetition_penalty=1e30), "repetition_penalty must be in"),
     (dict(presence_penalty=2.5), "presence_penalty must be in"), (dict(seed=2**64), "seed must be"),
     (dict(seed=-1), "seed must be"), (dict(temperature=float("nan")), "temperature must be a finite"),
     (dict(logit_bias={5: 101}), "logit_bias: bias of token 5"), (dict(top_k=1.5), "top_k must be")],
)
def test_invalid_parameters(params, message):
    with pytest.raises(GPT2EngineError, match=message):
        SamplingParams(**params)


def test_tiny_temperatures_are_greedy_not_garbage(tiny_model):
    greedy = GenerationOptions(max_new_tokens=10, sampling=SamplingParams(temperature=0), ignore_eos=True)
    expected = complete(*tiny_model, ["Once upon"], greedy)[0].token_ids
    for temperature in (1e-40, 1e-30, 1e-6):
        options = GenerationOptions(max_new_tokens=10, ignore_eos=True,
                                    sampling=SamplingParams(temperature=temperature, seed=1))
        assert complete(*tiny_model, ["Once upon"], options)[0].token_ids == expected


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_extreme_legal_repetition_penalties_stay_finite(tiny_model, penalty):
    for sampling in (SamplingParams(temperature=0, repetition_penalty=penalty),
                     SamplingParams(repetition_penalty=penalty, seed=3)):
        options = GenerationOptions(max_new_tokens=20, sampling=sampling, ignore_eos=True)
        tokens = complete(*tiny_model, ["the the the the"], options)[0].token_ids
        assert len(tokens) == 20 and len(set(tokens)) > 1  # not token 0 repeated
