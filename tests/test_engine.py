"""The continuous-batching engine: requests that arrive and leave at any step get exactly what
they get alone; admission, chunked prefill, abort, the bounded queue, per-request failures."""

import pytest
import torch

from conftest import TINY_GPT2
from gpt2engine import GPT2, GPT2EngineError
from gpt2engine.engine import Engine, GenerationOptions, QueueFull
from gpt2engine.evaluation import Span, score_spans
from gpt2engine.generate import complete
from gpt2engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Hello world, this is",
    "The",
    "A longer prompt, with quite a few more tokens in it than the rest, so that it is prefilled "
    "in several chunks while the other requests keep decoding beside it",
    "Once upon a time",
    "import torch\n\ndef main():",
    "1, 2, 3, 4,",
]
MIXED = [  # each request its own settings in one batch
    GREEDY,
    SamplingParams(top_k=40, top_p=0.9, seed=3),
    GREEDY,
    SamplingParams(temperature=0.7, min_p=0.05, seed=11, repetition_penalty=1.3),
    SamplingParams(temperature=1.2, presence_penalty=0.5, frequency_penalty=0.4, seed=5),
    SamplingParams(temperature=0, logit_bias={11: 5.0}),
]


def options(i: int, **extra) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=8 + 3 * i, sampling=MIXED[i], ignore_eos=True, **extra)


def alone(engine_pair, i: int) -> list[int]:
    model, tokenizer = engine_pair
    return complete(model, tokenizer, [PROMPTS[i]], options(i))[0].token_ids


def test_staggered_arrivals_each_get_their_solo_output(tiny_model):
    """Fewer rows than requests, a small prefill chunk, requests joining every other step."""
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=3, prefill_chunk=8)
    requests, outputs, step = [], [], 0
    while len(requests) < len(PROMPTS) or core.has_work():
        if step % 2 == 0 and len(requests) < len(PROMPTS):
            i = len(requests)
            requests.append(core.add_request(PROMPTS[i], options(i)))
        outputs += core.step()
        step += 1
        assert step < 500
    assert core.scheduler.rows_in_use == 0
    for i, request in enumerate(requests):
        assert request.finish_reason == "length"
        assert request.output_ids == alone(tiny_model, i), f"request {i} differs from its solo output"
        streamed = [o.token_id for o in outputs if o.request is request and o.token_id is not None]
        assert streamed == request.output_ids
        assert "".join(o.text for o in outputs if o.request is request) == request.result().text


@pytest.mark.slow
def test_batch_invariance_on_the_124m_config(gpt2_124m_checkpoint, tiny_model):
    _, tokenizer = tiny_model
    model = GPT2.from_pretrained(gpt2_124m_checkpoint)
    pair = (model, tokenizer)
    core = Engine(model, tokenizer, max_batch=4, prefill_chunk=16)
    greedy = GenerationOptions(max_new_tokens=10, sampling=GREEDY, ignore_eos=True)
    requests = []
    for i, prompt in enumerate(PROMPTS[:4]):
        requests.append(core.add_request(prompt, greedy))
        for _ in range(i + 1):
            core.step()
    while core.has_work():
        core.step()
    for prompt, request in zip(PROMPTS, requests, strict=False):
        assert request.output_ids == complete(*pair, [prompt], greedy)[0].token_ids


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(tiny_model):
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=2, prefill_chunk=4)
    running = core.add_request("Hi", GenerationOptions(max_new_tokens=60, sampling=GREEDY, ignore_eos=True))
    core.step()
    long = core.add_request(PROMPTS[2], GenerationOptions(max_new_tokens=2, sampling=GREEDY))
    chunks = -(-len(long.prompt_ids) // 4)
    for _ in range(chunks):
        before = len(running.output_ids)
        core.step()
        assert len(running.output_ids) == before + 1  # one token every step, never stalled
    assert long.prefilled == len(long.prompt_ids) and len(long.output_ids) == 1


@pytest.mark.parametrize(("budget", "per_step"), [(None, [2, 2]), (200, [4]), (40, [1, 1, 1, 1])])
def test_a_burst_of_prompts_is_prefilled_together_up_to_the_step_budget(tiny_model, budget, per_step):
    """Four 30-token prompts arrive at once: the default budget (a 64-token piece and a token per
    row: 68) takes two a step, 200 all four, 40 one (a piece always goes)."""
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=4, prefill_chunk=64, max_batched_tokens=budget)
    requests = [core.add_request(list(range(100 + i, 130 + i)), GenerationOptions(max_new_tokens=3))
                for i in range(4)]
    chunks = recorded_prefills(core)
    while any(r.prefilled < len(r.prompt_ids) for r in requests):
        core.step()
        assert len(chunks) < 10
    assert [len(step) for step in chunks] == per_step


def test_decoding_rows_count_in_the_step_budget(tiny_model):
    """With three rows decoding, a budget of 64 leaves 61 tokens: one 30-token prompt, and the
    second in the next step; the decoding rows get a token every step."""
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=5, prefill_chunk=64, max_batched_tokens=62)
    running = [core.add_request("Hi", GenerationOptions(max_new_tokens=50, ignore_eos=True))
               for _ in range(3)]
    core.step()
    new = [core.add_request(list(range(200 + i, 230 + i)), GenerationOptions(max_new_tokens=3))
           for i in range(2)]
    chunks = recorded_prefills(core)
    for _ in range(2):
        before = [len(r.output_ids) for r in running]
        core.step()
        assert [len(r.output_ids) for r in running] == [n + 1 for n in before]
    assert chunks == [new[:1], new[1:]]  # 62 - 3 = 59 < 2 x 30


def recorded_prefills(core: Engine) -> list[list]:
    """The requests whose prompt pieces each later step of `core` computes."""
    steps: list[list] = []
    schedule = core.scheduler.schedule

    def recording():
        planned = schedule()
        steps.append([chunk.request for chunk in planned.prefill])
        return planned

    core.scheduler.schedule = recording
    return steps


def test_the_step_budget_changes_no_output(tiny_model):
    """Every request's tokens are the same whatever the budget: a prompt's pieces are computed alike."""
    model, tokenizer = tiny_model
    outputs = []
    for budget in (1, 40, 10_000):
        core = Engine(model, tokenizer, max_batch=3, prefill_chunk=8, max_batched_tokens=budget)
        requests = [core.add_request(PROMPTS[i], options(i)) for i in range(len(PROMPTS))]
        for _ in core.run(requests):
            pass
        outputs.append([r.output_ids for r in requests])
    assert outputs[0] == outputs[1] == outputs[2]


def test_abort_frees_the_row_for_the_next_request(tiny_model):
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=1)
    first = core.add_request("Hello", GenerationOptions(max_new_tokens=50, ignore_eos=True))
    second = core.add_request("World", GenerationOptions(max_new_tokens=3, sampling=GREEDY, ignore_eos=True))
    core.step()
    assert first.row == 0 and second.row is None
    core.abort(first.request_id)
    [ended] = [o for o in core.step() if o.request is first]
    assert ended.finished and first.finish_reason == "abort"
    assert second.row == 0  # admitted in the same step the row was freed
    while core.has_work():
        core.step()
    assert second.output_ids == complete(model, tokenizer, ["World"], second.options)[0].token_ids


def test_the_waiting_queue_is_bounded(tiny_model):
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=1, max_queue=1)
    core.add_request("a")  # takes the free row at the next step
    core.add_request("b")  # waits
    with pytest.raises(QueueFull, match="1 waiting"):
        core.add_request("c")


def test_a_failing_request_fails_alone(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    core = Engine(model, tokenizer, max_batch=3)
    prefill = core.runner.prefill

    def broken(chunk):
        if chunk.request.request_id == "bad":
            raise RuntimeError("boom")
        return prefill(chunk)

    monkeypatch.setattr(core.runner, "prefill", broken)
    good = [core.add_request(PROMPTS[i], options(i)) for i in (0, 2)]
    bad = core.add_request("x", request_id="bad")
    while core.has_work():
        core.step()
    assert bad.finish_reason == "error" and "boom" in bad.error
    assert [r.output_ids for r in good] == [alone(tiny_model, 0), alone(tiny_model, 2)]


def test_non_finite_logits_are_an_error_not_a_token(tiny_checkpoint, tiny_model):
    _, tokenizer = tiny_model
    model = GPT2.from_pretrained(tiny_checkpoint)
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.clone(), requires_grad=False)
    poisoned = tokenizer.encode(" zebra")[0]
    model.wte.weight[poisoned] = float("nan")  # only a request that reads the token is poisoned
    core = Engine(model, tokenizer, max_batch=2)
    bad = core.add_request("a zebra", GenerationOptions(max_new_tokens=4))
    good = core.add_request("Hello", GenerationOptions(max_new_tokens=4, sampling=GREEDY, ignore_eos=True))
    while core.has_work():
        core.step()
    assert bad.finish_reason == "error" and "non-finite logits" in bad.error and not bad.output_ids
    assert good.finish_reason == "length" and len(good.output_ids) == 4
    with pytest.raises(GPT2EngineError, match="non-finite logits"):
        complete(model, tokenizer, ["a zebra"])


def test_a_padded_vocabulary_never_yields_ids_the_tokenizer_lacks(make_checkpoint, tiny_model):
    _, tokenizer = tiny_model
    model = GPT2.from_pretrained(make_checkpoint(**{**TINY_GPT2, "vocab_size": 50304}))
    model.wte.weight[50257:] *= 100  # the padding rows would win every argmax
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]]))[0, -1].argmax() >= 50257
    for sampling in (GREEDY, SamplingParams(seed=0)):
        options = GenerationOptions(max_new_tokens=8, sampling=sampling, ignore_eos=True)
        [result] = complete(model, tokenizer, ["Hello"], options)
        assert all(t < 50257 for t in result.token_ids) and len(result.token_ids) == 8


def test_logprobs_are_the_models_own(tiny_model):
    """Prompt logprobs equal the evaluation module's scores; a generated token's logprob is its
    log-softmax, and the top-N are the N likeliest."""
    model, tokenizer = tiny_model
    prompt = tokenizer.encode(PROMPTS[2])
    core = Engine(model, tokenizer, max_batch=2, prefill_chunk=5)
    request = core.add_request(prompt, GenerationOptions(max_new_tokens=3, sampling=GREEDY,
                                                         ignore_eos=True, logprobs=2, prompt_logprobs=3))
    outputs = [o for _ in range(20) for o in core.step()]
    expected = score_spans(model, [Span(prompt, i) for i in range(1, len(prompt))])
    ours = [lp.logprob for lp in request.prompt_logprobs]
    assert len(ours) == len(prompt) - 1
    # score_spans sums from token i on: differences give each token's own logprob
    singles = [expected[i].logprob - (expected[i + 1].logprob if i + 1 < len(expected) else 0.0)
               for i in range(len(expected))]
    assert max(abs(a - b) for a, b in zip(ours, singles, strict=True)) < 1e-4
    assert all(len(lp.top) == 3 for lp in request.prompt_logprobs)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + request.output_ids]))[0, len(prompt) - 1 : -1]
    logprobs = logits.log_softmax(-1)
    generated = [o.logprob for o in outputs if o.token_id is not None]
    for step, lp in enumerate(generated):
        token = request.output_ids[step]
        assert abs(lp.logprob - float(logprobs[step, token])) < 1e-4
        assert list(lp.top) == logprobs[step].topk(2).indices.tolist()
        assert lp.logprob == max(lp.top.values())  # greedy: the chosen token is the likeliest


@pytest.mark.parametrize(("prompt", "message"), [([5, -1], "token id -1 is out of range"),
                                                 ([50257], "token id 50257 is out of range"),
                                                 ([1, "a"], "a string or a list of integer token ids"),
                                                 (None, "a string or a list of integer token ids")])
def test_bad_prompts_are_refused(tiny_model, prompt, message):
    with pytest.raises(GPT2EngineError, match=message):
        Engine(*tiny_model).add_request(prompt)
