"""Speculative decoding (engine/speculative.py): every request gets the tokens, logprobs and finish
of plain decoding, with prompt lookup and with draft models, for greedy and seeded sampling with
every setting, beside requests that do not speculate; the drawn tokens keep the model's
distribution; the number proposed adapts and backs off under load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_GPT2, hf_model
from gpt2engine import GPT2, GPT2EngineError, Steering
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.engine.speculative import PAUSE_STEPS, Speculation, lookup
from gpt2engine.sampling_params import SamplingParams

REPEATING = "the cat sat on the mat and the cat sat on the mat and the cat sat on"
PROMPTS = [REPEATING, "Full fathom five thy father lies", "Those are pearls that were his eyes",
           "Sea-nymphs hourly ring his knell. Ding-dong. Hark! now I hear them, ding-dong, bell.",
           "Nothing of him that doth fade"]
SETTINGS = [
    dict(sampling=SamplingParams(temperature=0)),
    dict(sampling=SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=3), logprobs=2),
    dict(sampling=SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)),
    dict(sampling=SamplingParams(temperature=1.2, min_p=0.05, seed=11, presence_penalty=0.4), stop=("ing",)),
    dict(sampling=SamplingParams(temperature=0), logprobs=3, stop=("mat",)),
]


def run(engine: Engine, work: list[tuple[int, str, GenerationOptions]], abort: dict[int, int] | None = None):
    """Add each (step, prompt, options) at its step, abort request i at step abort[i]; step to the
    end -> per request, (its outputs' tokens and logprobs, its finish reason)."""
    requests, seen, step = {}, {}, 0
    while step <= max(s for s, _, _ in work) or engine.has_work():
        for i, (at, prompt, options) in enumerate(work):
            if at == step:
                requests[i] = engine.add_request(prompt, options)
        for i, at in (abort or {}).items():
            if at == step:
                engine.abort(requests[i].request_id)
        for output in engine.step():
            seen.setdefault(output.request.request_id, []).append(
                (output.token_id, output.text, output.logprob, output.finished))
        step += 1
    return [(seen.get(requests[i].request_id), requests[i].finish_reason) for i in range(len(work))], requests


def staggered(n: int = 10) -> list[tuple[int, str, GenerationOptions]]:
    options = [GenerationOptions(max_new_tokens=12 + 3 * (i % 4), ignore_eos=i % 3 > 0,
                                 **SETTINGS[i % len(SETTINGS)]) for i in range(n)]
    return [(i, PROMPTS[i % len(PROMPTS)], options[i]) for i in range(n)]


@pytest.fixture(scope="module")
def drafts(make_checkpoint, tiny_checkpoint):
    """A draft with the target's own weights (it guesses right: long acceptances) and a smaller,
    other one (it guesses wrong: rejections, pauses)."""
    return {"same": GPT2.from_pretrained(tiny_checkpoint),
            "other": GPT2.from_pretrained(make_checkpoint(seed=5, n_embd=16, n_layer=1, n_head=2,
                                                          n_positions=128, vocab_size=50257))}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "torch"])
@pytest.mark.parametrize("proposer", ["ngram", "same", "other"])
def test_every_request_gets_plain_decodings_output(tiny_model, drafts, proposer, fused):
    model, tokenizer = tiny_model
    work = staggered()

    def engine(speculative):
        built = Engine(model, tokenizer, max_batch=4, prefill_chunk=16, speculative=speculative)
        if not fused:
            built.runner.fused_step = None
        return built

    speculating = engine("ngram" if proposer == "ngram" else drafts[proposer])
    (with_speculation, requests), (without, _) = run(speculating, work), run(engine(None), work)
    if fused:  # the fused step verifies each position as its own decode step: the same bits
        assert with_speculation == without
    else:  # a forward pass over the proposals: the same tokens, logprobs within rounding
        assert [[o[:2] for o in outputs] for outputs, _ in with_speculation] == [
            [o[:2] for o in outputs] for outputs, _ in without]
    stats = speculating.speculation.stats
    assert stats.proposed == sum(r.proposed_tokens for r in requests.values()) > 0
    assert stats.accepted == sum(r.accepted_tokens for r in requests.values())
    if proposer != "other":
        assert stats.accepted > stats.proposed / 3
    else:
        assert stats.accepted < stats.proposed / 2


@pytest.mark.slow
def test_the_124m_config_greedy_and_seeded(gpt2_124m_checkpoint, tiny_model):
    model, tokenizer = GPT2.from_pretrained(gpt2_124m_checkpoint), tiny_model[1]
    work = [(2 * i, PROMPTS[i] * 2, GenerationOptions(max_new_tokens=16, ignore_eos=True, **SETTINGS[i]))
            for i in range(len(PROMPTS))]
    speculating = Engine(model, tokenizer, max_batch=3, speculative="ngram")
    assert run(speculating, work)[0] == run(Engine(model, tokenizer, max_batch=3), work)[0]
    assert speculating.speculation.stats.proposed > 0


def test_aborts_and_hooked_requests_beside_speculating_ones(tiny_model):
    model, tokenizer = tiny_model
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1)).tolist()
    hooked = GenerationOptions(max_new_tokens=10, sampling=SamplingParams(temperature=0),
                               capture=("blocks.1.hook_resid_post",),
                               steer=(Steering("blocks.0.hook_resid_pre", vector, 2.0),))
    work = [*staggered(6), (2, REPEATING, hooked)]
    abort = {1: 4, 5: 7}
    speculating = Engine(model, tokenizer, max_batch=3, speculative="ngram")
    with_speculation, requests = run(speculating, work, abort)
    assert with_speculation == run(Engine(model, tokenizer, max_batch=3), work, abort)[0]
    assert requests[6].proposed_tokens == 0  # a hooked request is never speculated for
    assert [requests[i].finish_reason for i in abort] == ["abort", "abort"]


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 5)])
def test_sampled_tokens_keep_the_models_distribution(tiny_model, temperature, top_k):
    """Chi-squared over 600 seeded requests: the second token, drawn where prompt lookup proposed
    one (kept when the draw equals it, the model's own draw otherwise), against the model's
    probabilities (after the bias, temperature and top-k) given each request's first token. A bias
    towards the prompt's words makes the first token one the lookup finds again."""
    model, tokenizer = tiny_model
    prompt, n = tokenizer.encode(REPEATING), 600
    bias = {token: 20.0 for token in set(prompt)}
    engine = Engine(model, tokenizer, max_batch=16, max_queue=n, speculative="ngram")
    requests = [engine.add_request(prompt, GenerationOptions(max_new_tokens=3, sampling=SamplingParams(
        seed=seed, logit_bias=bias, temperature=temperature, top_k=top_k))) for seed in range(n)]
    for _ in engine.run(requests):
        pass
    assert sum(r.proposed_tokens for r in requests) >= 0.9 * n  # nearly every second token proposed
    biased = torch.zeros(model.config.vocab_size)
    biased[list(bias)] = 20.0
    def distribution(logits: torch.Tensor) -> torch.Tensor:
        logits = (logits + biased) / temperature
        if top_k:
            logits[logits < logits.topk(top_k).values[-1]] = float("-inf")
        return logits.softmax(-1)

    with torch.inference_mode():  # p(second token | first), for each first token drawn
        given = {first: distribution(model(torch.tensor([[*prompt, first]]))[0, -1])
                 for first in {r.output_ids[0] for r in requests}}
    expected = sum(given[r.output_ids[0]] for r in requests)
    observed = torch.bincount(torch.tensor([r.output_ids[1] for r in requests]), minlength=len(expected))
    order = expected.argsort(descending=True)
    cells = order[expected[order] >= 5]  # the tokens expected 5 times or more; the rest pooled
    want, got = expected[cells].clone(), observed[cells].double()
    want[-1] += n - want.sum()  # into the smallest cell
    got[-1] += n - got.sum()
    chi2, degrees = float(((got - want) ** 2 / want).sum()), len(cells) - 1
    critical = {3: 16.3, 4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3, 8: 26.1}  # p = 0.001
    assert degrees >= 3 and chi2 < critical[degrees]
    proposals = [lookup([*prompt, r.output_ids[0]], 1) for r in requests]
    kept = sum(p == r.output_ids[1:2] for p, r in zip(proposals, requests, strict=True)) / n
    chance = sum(float(given[r.output_ids[0]][p[0]])
                 for p, r in zip(proposals, requests, strict=True) if p) / n
    assert math.isclose(kept, chance, abs_tol=0.06)  # Leviathan's rule: a proposal d is kept with p(d)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # the latest "1 2 3" first
    assert lookup([5, 6, 7, 8, 6], 3) == [7, 8, 6]
    assert lookup([1, 2, 3], 2) == []
    assert lookup([4, 8, 8, 8, 8, 8, 8, 8], 3) == [8, 8, 8]  # in a repetition: a match far enough back
    assert lookup([4, 8, 8, 8, 8], 3) == [8]  # the longest continuation the longest suffix has


class Fixed:
    name = "fixed"

    def propose(self, requests, counts):
        return [[0] * k for k in counts]


def test_proposals_adapt_pause_and_back_off_under_load(tiny_model):
    model, tokenizer = tiny_model
    engine = Engine(model, tokenizer, max_batch=40)
    requests = [engine.add_request("hello", GenerationOptions(max_new_tokens=50)) for _ in range(40)]
    for r in requests:
        r.row = requests.index(r)
    speculation = Speculation(Fixed(), max_tokens=5)
    assert speculation.propose(requests[:1], 1024) == {}  # the first step runs plain, to time one
    speculation.timed_plain(0.010, 1)
    assert [len(d) for d in speculation.propose(requests[:1], 1024).values()] == [5]
    assert [len(d) for d in speculation.propose(requests[:16], 1024).values()] == [1] * 16  # 32 / 16 - 1
    assert speculation.propose(requests, 1024) == {}  # 40 rows: a batch already reuses the weights
    one, state = requests[0], speculation.adaptive[requests[0].request_id]
    speculation.cost = 0.1  # a proposal costs a tenth of a step
    speculation.verified(one, 5, 5)
    assert state.tokens == 5
    speculation.verified(one, 5, 1)
    assert state.tokens == 5 and math.isclose(state.acceptance, 0.7 + 0.3 * 0.5)
    speculation.verified(one, 5, 0)
    assert state.tokens == 3  # kept with chance 0.6: 1 + .6 + .36 + .22 tokens in 1.3 steps, the best
    while not state.paused:
        speculation.verified(one, 1, 0)
    assert state.paused == PAUSE_STEPS and state.acceptance < 0.16  # (1 + a) / 1.1 > 1.05 no more
    for _ in range(PAUSE_STEPS):
        assert one not in speculation.propose([one], 1024)
    assert len(speculation.propose([one], 1024)[one]) == 1  # then one, to see
    speculation.verified(one, 1, 0)
    assert state.paused == 2 * PAUSE_STEPS  # longer each time in a row


@pytest.mark.parametrize(("acceptance", "cost", "best"), [(1.0, 0.1, 5), (0.6, 0.1, 3), (0.9, 0.0, 5),
                                                           (0.3, 0.5, 0), (0.02, 0.0, 0), (0.5, 0.2, 1)])
def test_the_number_proposed_is_the_one_with_the_most_tokens_a_second(acceptance, cost, best):
    speculation = Speculation(Fixed(), max_tokens=5)
    speculation.cost = cost
    gains = [sum(acceptance**i for i in range(k + 1)) / (1 + k * cost) for k in range(6)]
    assert speculation.best_count(acceptance) == best
    assert best == 0 or (gains[best] == max(gains) and gains[best] > 1.05)


def test_a_proposal_costs_its_proposing_and_its_verification_row(tiny_model):
    """Against a 10 ms plain step, a proposal that takes 1 ms to make and adds 2 ms of verifying
    costs 0.3 steps: a request whose proposals are not kept pauses; one whose first is kept half the
    time goes on with one (1.5 tokens for 1.3 steps)."""
    model, tokenizer = tiny_model
    engine = Engine(model, tokenizer, max_batch=2)
    low, high = (engine.add_request("hello", GenerationOptions(max_new_tokens=50)) for _ in range(2))
    speculation = Speculation(Fixed(), max_tokens=4)
    speculation.timed_plain(0.010, 2)
    for _ in range(40):
        speculation.timed(0.004, 4, 0.018, 6)  # 4 proposals: 1 ms each, and 8 ms more than the plain step
    assert math.isclose(speculation.cost, 0.3, rel_tol=1e-3)
    speculation.propose([low, high], 1024)
    for _ in range(10):
        speculation.verified(low, 2, 0)
        speculation.verified(high, 2, 1)
    assert speculation.adaptive[low.request_id].paused and not speculation.adaptive[high.request_id].paused
    assert speculation.adaptive[high.request_id].tokens == 1


def test_bad_speculation_settings(tiny_model, make_checkpoint):
    model, tokenizer = tiny_model
    with pytest.raises(GPT2EngineError, match=r"speculative tokens must be an integer in \[1, 64\]"):
        Engine(model, tokenizer, speculative="ngram", speculative_tokens=0)
    other_vocabulary = GPT2.from_pretrained(make_checkpoint(n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                                            vocab_size=50300))
    with pytest.raises(GPT2EngineError, match="a draft must share the model's vocabulary"):
        Engine(model, tokenizer, speculative=other_vocabulary)
    short = GPT2.from_pretrained(make_checkpoint(n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                                 vocab_size=50257))
    with pytest.raises(GPT2EngineError, match="context of 64 is shorter than the engine's rows of 128"):
        Engine(model, tokenizer, speculative=short)
    with pytest.raises(GPT2EngineError, match="speculative is 'ngram' or a draft model"):
        Engine(model, tokenizer, speculative=3)  # type: ignore[arg-type]


def test_a_draft_folder_with_another_tokenizer_is_refused(tiny_model, copy_of):
    model, tokenizer = tiny_model
    folder = copy_of()
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]  # the same tokens, two of them numbered otherwise
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(GPT2EngineError, match="vocabulary differs from the model's"):
        Engine(model, tokenizer, speculative=str(folder))
    assert Engine(model, tokenizer, speculative=str(copy_of())).speculation.stats.proposer == "draft"


def test_reference_still_agrees(tiny_model):
    """The greedy continuation with speculation is transformers' own."""
    model, tokenizer = tiny_model
    hf = hf_model(**TINY_GPT2)
    ids = tokenizer.encode(REPEATING)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(model, tokenizer, speculative="ngram")
    options = GenerationOptions(max_new_tokens=20, sampling=SamplingParams(temperature=0), ignore_eos=True)
    request = engine.add_request(ids, options)
    for _ in engine.run([request]):
        pass
    assert request.output_ids == expected and request.accepted_tokens > 0
