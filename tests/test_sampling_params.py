"""sampling_params.py: each per-row sampling parameter is declared once, and the CLI, the server's
requests and the engine's row tensors all follow that declaration."""

import pytest

from gpt2engine import GPT2EngineError, SamplingParams
from gpt2engine.cli.flags import CLI_SAMPLING_DEFAULTS
from gpt2engine.cli.parser import parse
from gpt2engine.engine.runner import Runner
from gpt2engine.sampling_params import ROW_DEFAULTS, ROW_PARAMS
from gpt2engine.server.protocol import CompletionRequest, options_for

# A legal value other than the default, and an illegal one, for every declared parameter
LEGAL = {"temperature": 0.7, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "repetition_penalty": 1.3,
         "presence_penalty": 0.4, "frequency_penalty": -0.6}
ILLEGAL = {"temperature": -1.0, "top_k": -2, "top_p": 1.5, "min_p": 2.0, "repetition_penalty": 0.0,
           "presence_penalty": 3.0, "frequency_penalty": -3.0}


def test_the_tables_cover_every_declared_parameter():
    assert set(LEGAL) == set(ILLEGAL) == set(ROW_PARAMS) == set(ROW_DEFAULTS)


@pytest.mark.parametrize("name", sorted(ROW_PARAMS))
def test_each_parameter_is_checked_by_its_rule(name):
    assert getattr(SamplingParams(**{name: LEGAL[name]}), name) == LEGAL[name]
    with pytest.raises(GPT2EngineError) as refused:
        SamplingParams(**{name: ILLEGAL[name]})
    assert str(refused.value) == f"{name} {ROW_PARAMS[name].rule}"


@pytest.mark.parametrize("name", sorted(ROW_PARAMS))
def test_each_parameter_is_a_cli_flag_that_reaches_the_request(name):
    flag = f"--{name.replace('_', '-')}"
    for command in ([], ["generate", "Hi"]):
        args = parse([*command, flag, str(LEGAL[name])])
        assert getattr(args.options.sampling, name) == LEGAL[name]
    default = parse([]).options.sampling
    assert getattr(default, name) == CLI_SAMPLING_DEFAULTS.get(name, ROW_DEFAULTS[name])


@pytest.mark.parametrize("name", sorted(ROW_PARAMS))
def test_each_parameter_is_a_request_field_that_reaches_the_request(name):
    body = CompletionRequest.model_validate({"prompt": "Hi", name: LEGAL[name]})
    assert getattr(options_for(body, 2, 100, 0).sampling, name) == LEGAL[name]
    defaults = options_for(CompletionRequest.model_validate({"prompt": "Hi"}), 2, 100, 0).sampling
    assert getattr(defaults, name) == ROW_DEFAULTS[name]  # OpenAI's top_k -1 ("off") is our 0


def test_the_engine_keeps_a_row_tensor_per_parameter(tiny_model):
    model, tokenizer = tiny_model
    runner = Runner(model, max_batch=3, max_len=16, vocab_limit=tokenizer.vocab_size)
    assert set(runner.row_params) == set(ROW_PARAMS)
    assert all(column.shape == (3,) for column in runner.row_params.values())
