import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, run_gpt2
from gpt2engine import GPT2Config, GPT2EngineError


@pytest.mark.parametrize(
    ("name", "n_embd", "n_layer", "n_head"),
    [("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20),
     ("gpt2-xl", 1600, 48, 25), ("distilgpt2", 768, 6, 12), ("openai-community/gpt2-xl", 1600, 48, 25)],
)
def test_presets_match_the_released_sizes(name, n_embd, n_layer, n_head):
    config = GPT2Config.from_preset(name)
    assert (config.n_embd, config.n_layer, config.n_head) == (n_embd, n_layer, n_head)
    assert (config.vocab_size, config.n_positions) == (50257, 1024)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(GPT2EngineError, match="unknown preset 'gpt3'.*gpt2-medium"):
        GPT2Config.from_preset("gpt3")


def test_reads_config_json_with_n_ctx_and_ignores_unrelated_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_ctx": 77,
        "vocab_size": 123, "layer_norm_epsilon": 1e-6, "activation_function": "gelu_new",
        "task_specific_params": {"text-generation": {"max_length": 50}},
    }))
    config = GPT2Config.from_json_file(path)
    assert (config.n_positions, config.vocab_size, config.head_dim) == (77, 123, 16)
    assert config.layer_norm_epsilon == 1e-6


@pytest.mark.parametrize(
    ("raw", "message"),
    [({"activation_function": "swish"}, "activation_function 'swish' is not supported"),
     ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
     ({"n_layer": 0}, r"n_layer must be an integer in \[1, 1024\], got 0"),
     ({"model_type": "gpt_neo"}, "model_type is 'gpt_neo', not a GPT-2 checkpoint"),
     # wrong types and ranges: a clear error, never a traceback or a silent cast
     ({"activation_function": ["gelu"]}, r"activation_function \['gelu'\] is not supported"),
     ({"n_inner": -4}, "n_inner must be an integer"), ({"n_inner": "3072"}, "n_inner must be an integer"),
     ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a number"),
     ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be a number in"),
     ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon must be a number in"),
     ({"layer_norm_epsilon": True}, "layer_norm_epsilon must be a number"),
     ({"n_embd": True}, "n_embd must be an integer"), ({"n_embd": 768.0}, "n_embd must be an integer"),
     ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false"),
     ({"n_layer": 10**30}, "n_layer must be an integer in"),
     ({"vocab_size": 2**40}, "vocab_size must be an integer in"),
     ({"model_type": ["gpt2"]}, "not a GPT-2 checkpoint")],
)
def test_unsupported_values_are_clear_errors(raw, message):
    with pytest.raises(GPT2EngineError, match=message):
        GPT2Config.from_dict(raw)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not a readable JSON config"), ("[1, 2]", "expected a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"a": "' + "x" * 2**21 + '"}', "larger than"),
])
def test_broken_config_file(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(GPT2EngineError, match=message):
        GPT2Config.from_json_file(tmp_path / "config.json")


def test_a_tiny_config_asking_for_a_huge_model_is_refused_before_anything_is_read(
        tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    from gpt2engine import GPT2
    from gpt2engine.loading import weights

    def read_tensors(*_):
        raise AssertionError("the weights were read before the config was checked against their size")

    monkeypatch.setattr(weights, "read_tensors", read_tensors)
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    for huge in ({"n_layer": 1000}, {"n_embd": 65536, "n_head": 1}, {"vocab_size": 4_000_000}):
        config = json.loads((tiny_checkpoint / "config.json").read_text())
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, **huge}))
        with pytest.raises(GPT2EngineError, match="the config does not fit these weights"):
            GPT2.from_pretrained(tmp_path / "ckpt")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
          "activation_function", "tie_word_embeddings", "scale_attn_weights", "model_type", "n_ctx"]


@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6))
@settings(max_examples=300, deadline=None)
def test_any_json_config_is_accepted_or_refused_with_our_error(raw):
    try:
        config = GPT2Config.from_dict(raw)
    except GPT2EngineError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert config.parameter_count() > 0 and config.n_embd % config.n_head == 0


@pytest.mark.slow
@pytest.mark.parametrize("eps", [float("nan"), -1e-5, 0, "1e-5"])
def test_bad_layer_norm_epsilon(copy_of, eps):
    done = run_gpt2("generate", "Hi", "--model", str(copy_of(layer_norm_epsilon=eps)), "--quiet")
    assert_one_line_error(done, 1, "layer_norm_epsilon must be a number")
