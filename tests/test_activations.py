"""Capture and steering in the engine (engine/activations.py): a request's activations are the
model's over its prompt and output, steering matches transformers with the same vector added by
a hook, and the requests beside a hooked one keep their bits."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_GPT2, hf_model
from gpt2engine import GPT2EngineError, Steering
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.hooks import hook_names
from gpt2engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPT = "Full fathom five thy father lies; of his bones are coral made"
RESIDUAL = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
            "ln_final.hook_normalized")  # the fused CPU step taps these


def engine_for(tiny_model, fused: bool = True, **kwargs) -> Engine:
    model, tokenizer = tiny_model
    engine = Engine(model, tokenizer, max_batch=kwargs.pop("max_batch", 4), prefill_chunk=8, **kwargs)
    if not fused:  # torch's path for every decode step, as where the kernels are not built
        engine.runner.fused_step = None
    return engine


def generate(engine: Engine, prompt: str, **options):
    options = {"max_new_tokens": 7, "sampling": GREEDY, **options}
    request = engine.add_request(prompt, GenerationOptions(**options))
    for _ in engine.run([request]):
        pass
    return request.result()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "torch"])
@pytest.mark.parametrize("names", [RESIDUAL, tuple(hook_names(2))], ids=["residual", "every-hook"])
def test_captured_activations_are_the_models_over_prompt_and_output(tiny_model, fused, names):
    model, _ = tiny_model
    engine = engine_for(tiny_model, fused)
    assert (engine.runner.fused_step is not None) == fused
    result = generate(engine, PROMPT, capture=names, ignore_eos=True)
    assert result.token_ids == generate(engine, PROMPT, ignore_eos=True).token_ids  # capture changes nothing
    ids = torch.tensor([engine.prompt_ids(PROMPT) + result.token_ids])
    _, expected = model.run_with_cache(ids, list(names))
    assert set(result.activations) == set(names)
    for name in names:
        assert result.activations[name].shape == expected[name][0].shape, name
        assert (result.activations[name] - expected[name][0]).abs().max() < 1e-4, name


def test_a_request_ending_on_endoftext_covers_the_tokens_it_returns(tiny_model):
    _, tokenizer = tiny_model
    engine = engine_for(tiny_model)
    eot = tokenizer.eot_id
    result = generate(engine, PROMPT, capture=("blocks.1.hook_resid_post",),
                      sampling=SamplingParams(temperature=0, logit_bias={eot: 100.0}))
    assert result.finish_reason == "stop" and result.token_ids == []
    assert result.activations["blocks.1.hook_resid_post"].shape[0] == len(engine.prompt_ids(PROMPT))


def steered_reference(prompt_ids: list[int], steering: Steering, n: int) -> list[int]:
    """transformers' greedy continuation with the vector added by a forward hook, recomputed from
    scratch each token (no cache: nothing shared with our engine)."""
    hf = hf_model(**TINY_GPT2)
    layer, point = int(steering.hook.split(".")[1]), steering.hook.split(".")[2]
    block = hf.transformer.h[layer]
    add = steering.coefficient * torch.tensor(steering.vector, dtype=torch.float32)

    def steer(x: torch.Tensor) -> torch.Tensor:
        return x + add * (torch.arange(x.shape[1]) >= steering.start)[:, None]

    def before(module, args, kwargs):
        if args:
            return (steer(args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": steer(kwargs["hidden_states"])}

    def after(module, args, output):
        return (steer(output[0]), *output[1:]) if isinstance(output, tuple) else steer(output)

    handle = (block.register_forward_pre_hook(before, with_kwargs=True) if point == "hook_resid_pre"
              else block.register_forward_hook(after))
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    handle.remove()
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "torch"])
@pytest.mark.parametrize(("hook", "start"), [("blocks.1.hook_resid_pre", 0), ("blocks.0.hook_resid_post", 9),
                                             ("blocks.1.hook_resid_post", 15)])
def test_steered_greedy_output_equals_transformers_with_a_hook(tiny_model, fused, hook, start):
    engine = engine_for(tiny_model, fused)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5)).tolist()
    steering = Steering(hook, vector, coefficient=4.0, start=start)
    steered = generate(engine, PROMPT, steer=(steering,), ignore_eos=True, max_new_tokens=10)
    expected = steered_reference(engine.prompt_ids(PROMPT), steering, 10)
    assert steered.token_ids == expected
    assert steered.token_ids != generate(engine, PROMPT, ignore_eos=True, max_new_tokens=10).token_ids


def test_steering_from_two_prompts_is_the_difference_at_their_last_tokens(tiny_model):
    model, _ = tiny_model
    engine = engine_for(tiny_model)
    steering = engine.steering_from_prompts("blocks.1.hook_resid_pre", "Love", "I hate", coefficient=5.0)
    _, love = model.run_with_cache(torch.tensor([engine.prompt_ids("Love")]), ["blocks.1.hook_resid_pre"])
    _, hate = model.run_with_cache(torch.tensor([engine.prompt_ids("I hate")]), ["blocks.1.hook_resid_pre"])
    difference = love["blocks.1.hook_resid_pre"][0, -1] - hate["blocks.1.hook_resid_pre"][0, -1]
    assert torch.equal(torch.tensor(steering.vector), difference)
    assert steering.coefficient == 5.0
    with pytest.raises(GPT2EngineError, match="is not a steerable"):
        engine.steering_from_prompts("blocks.1.mlp.hook_pre", "Love", "Hate")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "torch"])
def test_plain_requests_keep_their_bits_beside_hooked_and_steered_ones(tiny_model, fused):
    """Staggered arrivals with mixed sampling and logprobs: the requests that neither capture nor
    steer get the same tokens and logprobs as in an engine where the hooked ones never ran; the
    same bits on the fused CPU step, which computes each row alone. (torch's path, as without
    hooks, computes a batch in one product whose length is the batch's: there, within 1e-5.)"""
    vector = torch.randn(32, generator=torch.Generator().manual_seed(2)).tolist()
    hooked = [GenerationOptions(max_new_tokens=9, capture=RESIDUAL),
              GenerationOptions(max_new_tokens=6, steer=(Steering("blocks.1.hook_resid_mid", vector, 3.0),)),
              GenerationOptions(max_new_tokens=8, capture=("blocks.0.attn.hook_pattern",),
                                steer=(Steering("blocks.0.hook_resid_pre", vector, -2.0, start=12),))]
    plain = [GenerationOptions(max_new_tokens=10, logprobs=3, sampling=SamplingParams(top_k=20, seed=i),
                               ignore_eos=True) if i % 2 else
             GenerationOptions(max_new_tokens=8, logprobs=2, sampling=GREEDY, ignore_eos=True)
             for i in range(4)]
    prompts = [PROMPT, "Those are pearls that were his eyes", "Nothing of him that doth fade", "Sea-nymphs"]

    def run(with_hooked: bool):
        engine = engine_for(tiny_model, fused, max_batch=4)
        requests, hooked_requests, seen, step = [], [], {}, 0
        while step < 4 or engine.has_work():
            if step < 4:
                requests.append(engine.add_request(prompts[step], plain[step]))
                if with_hooked and step < 3:
                    hooked_requests.append(engine.add_request(prompts[step - 1], hooked[step]))
            for output in engine.step():
                seen.setdefault(output.request.request_id, []).append((output.token_id, output.logprob))
            step += 1
        assert all(r.finish_reason != "error" for r in requests + hooked_requests)
        return [seen[r.request_id] for r in requests]

    beside, alone = run(True), run(False)
    if fused:
        assert beside == alone
    tokens = [[token for token, _ in outputs] for outputs in beside]
    assert tokens == [[token for token, _ in outputs] for outputs in alone]
    for outputs, others in zip(beside, alone, strict=True):
        for (_, logprob), (_, other) in zip(outputs, others, strict=True):
            assert abs(logprob.logprob - other.logprob) < 1e-5


@pytest.mark.parametrize(("options", "message"), [
    (dict(capture=("blocks.2.hook_resid_pre",)), "layer 2 is out of range, the model has layers 0..1"),
    (dict(capture=("blocks.0.resid",)), "is not a hook point; hooks are"),
    (dict(steer=(Steering("blocks.0.hook_resid_pre", [1.0] * 31),)),
     "has 31 values; the model's residual stream has 32"),
    (dict(steer=(Steering("hook_embed", [1.0] * 32),)), "is not a steerable"),
])
def test_bad_hooks_are_refused_when_the_request_is_added(tiny_model, options, message):
    with pytest.raises(GPT2EngineError, match=message):
        engine_for(tiny_model).add_request(PROMPT, GenerationOptions(**options))


def test_hooked_requests_pass_by_the_prefix_cache(tiny_model):
    engine = engine_for(tiny_model, prefix_cache_mib=16)
    long_prompt = PROMPT + " and " + PROMPT
    generate(engine, long_prompt)
    plain_again = engine.add_request(long_prompt, GenerationOptions(max_new_tokens=2))
    captured = engine.add_request(long_prompt, GenerationOptions(max_new_tokens=2, capture=RESIDUAL[:1]))
    for _ in engine.run([plain_again, captured]):
        pass
    assert plain_again.cached_tokens > 0 and captured.cached_tokens == 0
    assert captured.result().activations[RESIDUAL[0]].shape[0] == len(captured.prompt_ids) + 2
