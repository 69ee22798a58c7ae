"""Hook points (hooks.py, model.py): every name against TransformerLens and transformers on the
same weights, the names' checks, and steering at the model level."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, TINY_GPT2, hf_model
from gpt2engine import GPT2, GPT2EngineError
from gpt2engine.hooks import (
    Hooks,
    Steering,
    capture_bytes,
    check_hook,
    check_hooks,
    hook_names,
    position_shape,
)

TOLERANCE = 1e-4  # float32, as the logits


@pytest.fixture(scope="module", params=["tiny-gpt2", "odd-heads"])
def pair(request, make_checkpoint):
    """(our model, transformers' model, the folder) with the same weights."""
    config = TINY_GPT2 if request.param == "tiny-gpt2" else TINY_CONFIGS["odd-heads"]
    folder = make_checkpoint(seed=3, **config)
    return GPT2.from_pretrained(folder), hf_model(3, **config), folder


def ids_for(model: GPT2, batch: int = 2, length: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def test_every_hook_matches_transformer_lens(pair):
    from transformer_lens.model_bridge import TransformerBridge

    ours, _, folder = pair
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    ids = ids_for(ours)
    logits, cache = ours.run_with_cache(ids)
    with torch.no_grad():
        their_logits, theirs = bridge.run_with_cache(ids)
    assert (logits - their_logits).abs().max() < TOLERANCE
    assert set(cache) == set(hook_names(ours.config.n_layer))
    for name, value in cache.items():
        assert value.shape == theirs[name].shape, name
        assert (value - theirs[name]).abs().max() < TOLERANCE, name


def test_every_hook_matches_transformers_forward_hooks(pair):
    ours, hf, _ = pair
    hf.set_attn_implementation("eager")  # the one that returns the attention weights
    ids = ids_for(ours)
    c = ours.config
    B, T, nh, hs = *ids.shape, c.n_head, c.head_dim
    seen: dict[str, torch.Tensor] = {}

    def keep(name, index=None, inputs=False):
        def hook(module, args, output):
            value = args[0] if inputs else (output[0] if isinstance(output, tuple) else output)
            if index is not None:  # q, k or v of the fused product
                value = value.split(c.n_embd, dim=-1)[index].reshape(B, T, nh, hs)
            seen[name] = value
        return hook

    handles = []
    for layer, block in enumerate(hf.transformer.h):
        p = f"blocks.{layer}."
        for index, short in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
            handles.append(block.attn.c_attn.register_forward_hook(keep(p + short, index)))
        handles += [block.attn.c_proj.register_forward_hook(keep(p + "attn.hook_z", inputs=True)),
                    block.attn.register_forward_hook(keep(p + "hook_attn_out")),
                    block.ln_2.register_forward_hook(keep(p + "ln_2_in", inputs=True)),
                    block.mlp.c_fc.register_forward_hook(keep(p + "mlp.hook_pre")),
                    block.mlp.act.register_forward_hook(keep(p + "mlp.hook_post")),
                    block.mlp.register_forward_hook(keep(p + "hook_mlp_out"))]
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
    for handle in handles:
        handle.remove()
    _, cache = ours.run_with_cache(ids)
    expected = {"hook_embed": hf.transformer.wte(ids),
                "hook_pos_embed": hf.transformer.wpe(torch.arange(T)).expand(B, T, -1),
                "ln_final.hook_normalized": out.hidden_states[-1]}
    for layer in range(c.n_layer):
        p = f"blocks.{layer}."
        expected |= {p + "hook_resid_pre": out.hidden_states[layer],
                     p + "attn.hook_pattern": out.attentions[layer],
                     p + "hook_resid_mid": seen.pop(p + "ln_2_in"),
                     p + "attn.hook_z": seen[p + "attn.hook_z"].reshape(B, T, nh, hs)}
        if layer + 1 < c.n_layer:  # transformers' last hidden state is after ln_f
            expected[p + "hook_resid_post"] = out.hidden_states[layer + 1]
    expected = seen | expected
    assert len(expected) == len(cache) - 1  # all but the last block's resid_post, checked below
    for name, value in expected.items():
        assert (cache[name] - value).abs().max() < TOLERANCE, name
    last = f"blocks.{c.n_layer - 1}."
    assert torch.equal(cache[last + "hook_resid_post"],
                       cache[last + "hook_resid_mid"] + cache[last + "hook_mlp_out"])


def test_hooks_on_a_cached_chunk_match_the_whole_pass(tiny_model):
    """The engine captures a prompt in chunks through the cache (and the CPU attention kernel
    where no pattern is asked for): the same activations as one pass over the whole prompt."""
    model, _ = tiny_model
    ids = ids_for(model, batch=1, length=20)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
    _, whole = model.run_with_cache(ids, names)
    cache = model.make_cache(1, 32)
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start, stop in ((0, 8), (8, 20)):
        hooks = Hooks(names)
        with torch.inference_mode():
            model.hidden_states(ids[:, start:stop], torch.arange(start, stop)[None], cache, stop, hooks)
        for name in names:
            pieces[name].append(hooks.cache[name])
    pattern = torch.zeros_like(whole[names[0]])
    pattern[:, :, :8, :8] = pieces[names[0]][0]
    pattern[:, :, 8:, :20] = pieces[names[0]][1]
    assert (pattern - whole[names[0]]).abs().max() < TOLERANCE
    for name in names[1:]:
        assert (torch.cat(pieces[name], dim=1) - whole[name]).abs().max() < TOLERANCE, name


def test_hook_names_are_checked_with_a_listing_of_what_exists():
    assert check_hook("blocks.11.attn.hook_pattern", 12) == "blocks.11.attn.hook_pattern"
    assert check_hooks(["hook_embed", "hook_embed", "ln_final.hook_normalized"], 2) == (
        "hook_embed", "ln_final.hook_normalized")
    with pytest.raises(GPT2EngineError, match=r"layer 12 is out of range, the model has layers 0..11"):
        check_hook("blocks.12.hook_resid_pre", 12)
    with pytest.raises(GPT2EngineError, match=r"'blocks.0.hook_resid' is not a hook point; hooks are "
                                              r"blocks.\{0..1\}.\{hook_resid_pre, .*hook_embed"):
        check_hook("blocks.0.hook_resid", 2)
    with pytest.raises(GPT2EngineError, match="is not a steerable"):
        check_hook("blocks.0.attn.hook_q", 2, steering=True)
    with pytest.raises(GPT2EngineError, match="a hook name is a string"):
        check_hook(3, 2)


def test_capture_size_is_known_before_any_work(tiny_model):
    model, _ = tiny_model
    ids = ids_for(model, batch=1, length=9)
    names = hook_names(model.config.n_layer)
    _, cache = model.run_with_cache(ids, names)
    assert capture_bytes(names, model.config, 9) == sum(v.numel() * 4 for v in cache.values())
    pattern = cache["blocks.0.attn.hook_pattern"]  # (B, nh, T, T)
    assert position_shape("blocks.0.attn.hook_pattern", model.config, 9) == pattern.shape[1::2]


def test_steering_adds_the_vector_where_asked_and_nowhere_else(tiny_model):
    model, _ = tiny_model
    ids = ids_for(model, batch=1, length=6)
    vector = torch.randn(model.config.n_embd)
    _, plain = model.run_with_cache(ids, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])
    hooks = Hooks(["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"],
                  steer={"blocks.0.hook_resid_post": [2.0 * vector]})
    _, steered = model.run_with_cache(ids, hooks=hooks)
    assert torch.equal(steered["blocks.0.hook_resid_post"], plain["blocks.0.hook_resid_post"] + 2.0 * vector)
    assert torch.equal(steered["blocks.1.hook_resid_pre"], steered["blocks.0.hook_resid_post"])


@pytest.mark.parametrize(("fields", "message"), [
    (dict(vector=[float("nan")] * 4), "list of finite numbers"),
    (dict(vector=[1.0] * 4, coefficient=float("inf")), "coefficient must be a finite number"),
    (dict(vector=[1.0] * 4, start=-1), "start must be an integer >= 0"),
    (dict(vector="abcd"), "list of finite numbers"),
])
def test_bad_steering_is_refused(fields, message):
    with pytest.raises(GPT2EngineError, match=message):
        Steering("blocks.0.hook_resid_pre", **fields)


def test_steering_vector_must_have_the_models_width():
    with pytest.raises(GPT2EngineError, match="has 3 values; the model's residual stream has 32"):
        Steering("blocks.0.hook_resid_pre", [1.0, 2.0, 3.0]).check(2, 32)


def test_stop_at_layer_runs_only_the_blocks_before_it(tiny_model):
    model, _ = tiny_model
    ids = ids_for(model)
    _, whole = model.run_with_cache(ids, ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"])
    residual, early = model.run_with_cache(ids, ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"],
                                           stop_at_layer=1)
    assert torch.equal(residual, whole["blocks.1.hook_resid_pre"])
    assert all(torch.equal(early[name], whole[name]) for name in whole)
    with pytest.raises(GPT2EngineError, match="'blocks.1.hook_mlp_out' comes after stop_at_layer=1"):
        model.run_with_cache(ids, ["blocks.1.hook_mlp_out"], stop_at_layer=1)
