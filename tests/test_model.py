"""Logits parity with transformers on the same weights, with and without the KV cache."""

import pytest
import torch

from conftest import GPT2_124M, TINY_CONFIGS, hf_model
from gpt2engine import GPT2, GPT2Config, GPT2EngineError

TOLERANCE = 1e-4


def load_pair(make_checkpoint, **config):
    folder = make_checkpoint(**config)
    return hf_model(**config), GPT2.from_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_124m_pair(gpt2_124m_checkpoint):
    return hf_model(initializer_range=0.02, **GPT2_124M), GPT2.from_pretrained(gpt2_124m_checkpoint)


def cached_logits(model: GPT2, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one token at a time through the cache."""
    B, T = ids.shape
    cache = model.make_cache(B, T)
    positions = torch.arange(T).expand(B, T)
    pieces = [model(ids[:, :prefill], positions[:, :prefill], cache)]
    pieces += [model(ids[:, t : t + 1], positions[:, t : t + 1], cache) for t in range(prefill, T)]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("name", TINY_CONFIGS)
@torch.inference_mode()
def test_tiny_configs_match_transformers(make_checkpoint, name):
    config = TINY_CONFIGS[name]
    reference, model = load_pair(make_checkpoint, **config)
    ids = torch.randint(0, config["vocab_size"], (3, config["n_positions"]))
    expected = reference(ids).logits
    assert model(ids).shape == (3, config["n_positions"], config["vocab_size"])
    assert (model(ids) - expected).abs().max() <= TOLERANCE
    assert (cached_logits(model, ids, prefill=5) - expected).abs().max() <= TOLERANCE


@pytest.mark.slow
@torch.inference_mode()
def test_gpt2_124m_matches_transformers_with_and_without_cache(gpt2_124m_pair):
    reference, model = gpt2_124m_pair
    ids = torch.randint(0, 50257, (2, 48))
    expected = reference(ids).logits
    assert (model(ids) - expected).abs().max() <= TOLERANCE
    assert (cached_logits(model, ids, prefill=40) - expected).abs().max() <= TOLERANCE


@pytest.mark.slow
@torch.inference_mode()
def test_gpt2_124m_full_context(gpt2_124m_pair):
    reference, model = gpt2_124m_pair
    ids = torch.randint(0, 50257, (1, 1024))
    assert (model(ids) - reference(ids).logits).abs().max() <= TOLERANCE


@torch.inference_mode()
def test_rows_at_different_positions_share_one_cache(make_checkpoint):
    """Each row writes its own slots: a short row decodes beside a long one as if alone."""
    config = TINY_CONFIGS["odd-heads"]
    reference, model = load_pair(make_checkpoint, **config)
    short, long = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 11))
    cache = model.make_cache(2, 12)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])
    model(padded, torch.arange(11).expand(2, 11), cache)  # pads land in slots the row reuses
    next_tokens = torch.tensor([[7], [9]])
    logits = model(next_tokens, torch.tensor([[6], [11]]), cache)[:, -1]
    expected_short = reference(torch.cat([short, next_tokens[:1]], 1)).logits[0, -1]
    expected_long = reference(torch.cat([long, next_tokens[1:]], 1)).logits[0, -1]
    assert (logits[0] - expected_short).abs().max() <= TOLERANCE
    assert (logits[1] - expected_long).abs().max() <= TOLERANCE


def test_input_longer_than_the_context_is_a_clear_error():
    model = GPT2(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=10))
    with pytest.raises(GPT2EngineError, match="input of 17 tokens is longer than the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(GPT2EngineError, match="cache of 20 positions exceeds the model's context of 16"):
        model.make_cache(1, 20)


def test_lm_head_is_tied_to_the_token_embedding(make_checkpoint):
    model = GPT2.from_pretrained(make_checkpoint(**TINY_CONFIGS["one-head"]))
    assert model.lm_head.weight is model.wte.weight
    assert not any(p.requires_grad for p in model.parameters())

