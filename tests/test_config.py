import json

import pytest

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
     ({"n_layer": 0}, "n_layer must be a positive integer"),
     ({"model_type": "gpt_neo"}, "model_type is 'gpt_neo', not a GPT-2 checkpoint")],
)
def test_unsupported_values_are_clear_errors(raw, message):
    with pytest.raises(GPT2EngineError, match=message):
        GPT2Config.from_dict(raw)


@pytest.mark.parametrize(("content", "message"), [("{not json", "not a readable JSON config"),
                                                  ("[1, 2]", "expected a JSON object")])
def test_broken_config_file(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(GPT2EngineError, match=message):
        GPT2Config.from_json_file(tmp_path / "config.json")
