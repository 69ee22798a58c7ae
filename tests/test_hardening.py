"""Hostile and careless input, class by class (the hardening issue): through the CLI, one line on
stderr, the documented exit code, no traceback, bounded time; through the API, GPT2EngineError."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import GPT2_COMMAND, TINY_GPT2
from gpt2engine import GPT2, GPT2EngineError, Tokenizer
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.loading.weights import read_tensors
from gpt2engine.sampling_params import SamplingParams


def gpt2(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run([GPT2_COMMAND, *args], input=stdin, capture_output=True, timeout=timeout)
    done.elapsed = time.monotonic() - started
    done.out, done.err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    return done


def assert_one_line_error(done, code: int, message: str) -> None:
    assert done.returncode == code, done.err
    assert "Traceback" not in done.err
    errors = [line for line in done.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.err


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path):
    def make(**config_changes) -> Path:
        folder = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_checkpoint, folder)
        if config_changes:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
        return folder

    return make


# 1. Resource exhaustion from tiny files
@pytest.mark.slow
@pytest.mark.parametrize("huge", [{"n_layer": 1024}, {"n_embd": 65536, "n_head": 4}, {"n_positions": 131072}])
def test_a_tiny_config_asking_for_a_huge_model(copy_of, huge):
    done = gpt2("generate", "Hi", "--model", str(copy_of(**huge)), "--quiet")
    assert_one_line_error(done, 1, "does not fit")  # the files' size, or a tensor's shape
    assert done.elapsed < 30  # python + torch start-up; the refusal itself is instant


@pytest.mark.parametrize("vocab", [{"a": 10**12}, {"a": 2**22}, {}])
def test_a_tiny_vocabulary_with_a_huge_id_or_none(copy_of, vocab):
    folder = copy_of()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    done = gpt2("generate", "Hi", "--model", str(folder))
    assert_one_line_error(done, 1, "vocabulary")
    with pytest.raises(GPT2EngineError, match="vocabulary"):
        Tokenizer.from_pretrained(folder)


# 2. Invalid UTF-8 and lone surrogates
@pytest.mark.slow
@pytest.mark.parametrize("data", [b"\xff\xfe", b"caf\xe9", b"ok \xed\xa0\x80 surrogate bytes"])
def test_invalid_utf8_on_stdin_and_in_argv(tiny_checkpoint, data):
    from_stdin = gpt2("generate", "-", "--model", str(tiny_checkpoint), "--quiet", stdin=data)
    assert_one_line_error(from_stdin, 1, "stdin: not UTF-8 text")
    in_argv = subprocess.run([GPT2_COMMAND.encode(), b"generate", data, b"--model",
                              str(tiny_checkpoint).encode(), b"--quiet"], capture_output=True, timeout=120)
    in_argv.err = in_argv.stderr.decode(errors="replace")
    assert_one_line_error(in_argv, 1, "text is not valid Unicode: lone surrogate")


@pytest.mark.parametrize("prompt", ["\ud800", "fine \udcff then", "\udfff"])
def test_lone_surrogates_through_the_api(engine, prompt):
    with pytest.raises(GPT2EngineError, match="lone surrogate"):
        complete(*engine, [prompt])


@pytest.mark.slow
def test_the_repl_survives_bad_bytes(tiny_checkpoint):
    import pexpect

    from gpt2engine.cli.repl import PROMPT

    child = pexpect.spawn(GPT2_COMMAND, ["--model", str(tiny_checkpoint), "--max-new-tokens", "3", "--quiet"],
                          timeout=60)
    child.expect_exact(PROMPT.encode())
    child.sendline(b"\xff\xfe")
    child.expect(rb"error: text is not valid Unicode: lone surrogate")
    child.expect_exact(PROMPT.encode())
    for line in (b"caf\xe9 au lait", b"\xed\xa0\x80", b"\x80"):  # readline may drop some bytes
        child.sendline(line)
        child.expect_exact(PROMPT.encode())
    child.sendline(b"Hello")  # still answering
    child.expect_exact(PROMPT.encode())
    child.sendline(b"quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and b"Traceback" not in child.before


# 3. Silent garbage
@pytest.mark.slow
@pytest.mark.parametrize(("bad", "key", "dtype"), [
    (float("nan"), "transformer.h.0.mlp.c_fc.weight", "float32"),  # converted: transposed
    (float("inf"), "transformer.wte.weight", "int8"),  # converted: encoded
    (-float("inf"), "transformer.wpe.weight", "float32"),  # used as it is in the file
])
def test_non_finite_weights_are_refused_at_load(copy_of, bad, key, dtype):
    folder = copy_of()
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    tensors[key][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    done = gpt2("generate", "Hi", "--model", str(folder), "--quiet", "--dtype", dtype)
    assert_one_line_error(done, 1, f"{key} holds NaN or infinite values")


@pytest.mark.slow
@pytest.mark.parametrize("eps", [float("nan"), -1e-5, 0, "1e-5"])
def test_bad_layer_norm_epsilon(copy_of, eps):
    done = gpt2("generate", "Hi", "--model", str(copy_of(layer_norm_epsilon=eps)), "--quiet")
    assert_one_line_error(done, 1, "layer_norm_epsilon must be a number")


def test_tiny_temperatures_are_greedy_not_garbage(engine):
    greedy = GenerationOptions(max_new_tokens=10, sampling=SamplingParams(temperature=0), ignore_eos=True)
    expected = complete(*engine, ["Once upon"], greedy)[0].token_ids
    for temperature in (1e-40, 1e-30, 1e-6):
        options = GenerationOptions(max_new_tokens=10, ignore_eos=True,
                                    sampling=SamplingParams(temperature=temperature, seed=1))
        assert complete(*engine, ["Once upon"], options)[0].token_ids == expected


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_extreme_legal_repetition_penalties_stay_finite(engine, penalty):
    for sampling in (SamplingParams(temperature=0, repetition_penalty=penalty),
                     SamplingParams(repetition_penalty=penalty, seed=3)):
        options = GenerationOptions(max_new_tokens=20, sampling=sampling, ignore_eos=True)
        tokens = complete(*engine, ["the the the the"], options)[0].token_ids
        assert len(tokens) == 20 and len(set(tokens)) > 1  # not token 0 repeated


# 4. Model and tokenizer vocabularies
@pytest.mark.slow
def test_a_tokenizer_larger_than_the_model_is_refused(make_checkpoint):
    small = make_checkpoint(**{**TINY_GPT2, "vocab_size": 50000})
    done = gpt2("generate", "Hi", "--model", str(small), "--quiet")
    assert_one_line_error(done, 1, "the tokenizer has 50257 tokens but the model only 50000")


# 5. Export: all files or none; never through links
@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_a_retry_works(engine, tmp_path, tiny_checkpoint):
    model, _ = engine
    out = tmp_path / "out"
    not_a_file = tmp_path / "merges.txt"
    not_a_file.mkdir()  # copying it fails after the weights are written
    with pytest.raises(GPT2EngineError, match="cannot write the checkpoint"):
        model.save_pretrained(out, extra_files=(tiny_checkpoint / "vocab.json", not_a_file))
    assert list(out.iterdir()) == []
    done = gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert done.returncode == 0, done.err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "vocab.json"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["config.json", "vocab.json"])
def test_export_never_writes_through_a_dangling_link(tiny_checkpoint, tmp_path, target):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / target).symlink_to(outside / "stolen")
    done = gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert_one_line_error(done, 1, "already exists; refusing to overwrite it")
    assert list(outside.iterdir()) == [] and [p.name for p in out.iterdir()] == [target]


# 6. Legitimate files
@pytest.mark.slow
def test_an_old_format_pytorch_model_bin_loads(copy_of, engine):
    from safetensors.torch import load_file

    folder = copy_of()
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (folder / "model.safetensors").unlink()
    model, _ = engine
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(GPT2.from_pretrained(folder)(ids), model(ids))


# 7. Malformed checkpoints
@pytest.mark.slow
def test_a_nested_state_dict_loads_and_non_tensors_are_refused(copy_of, engine):
    from safetensors.torch import load_file

    folder = copy_of()
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({"state_dict": tensors, "epoch": 3}, folder / "pytorch_model.bin")
    model, _ = engine
    with torch.inference_mode():
        assert torch.equal(GPT2.from_pretrained(folder)(torch.tensor([[5]])), model(torch.tensor([[5]])))
    for bad in ({**tensors, "transformer.extra": [1.0, 2.0]}, [tensors]):
        torch.save(bad, folder / "pytorch_model.bin")
        done = gpt2("generate", "Hi", "--model", str(folder), "--quiet")
        assert_one_line_error(done, 1, "pytorch_model.bin: not a readable weight file")


# 8. Unbounded reads
@pytest.mark.slow
@pytest.mark.parametrize("command", [["eval", "perplexity", "/dev/zero"], ["generate", "-"]])
def test_endless_input_is_cut_off_in_one_line(tiny_checkpoint, command):
    with open("/dev/zero", "rb") as zeros:
        done = subprocess.run([GPT2_COMMAND, *command, "--model", str(tiny_checkpoint), "--quiet"],
                              stdin=zeros, capture_output=True, timeout=120, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "MiB" in done.stderr and done.stderr.count("\n") == 1


# 9. Validation gaps (bad flag values: tests/test_cli_flags.py)
@pytest.mark.slow
def test_a_shard_index_naming_a_file_outside_the_folder(copy_of, tmp_path):
    folder = copy_of()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    for name in ("../secret.safetensors", "/etc/passwd", "sub/model.safetensors"):
        index = {"weight_map": {"transformer.wte.weight": name}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        done = gpt2("generate", "Hi", "--model", str(folder), "--quiet")
        assert_one_line_error(done, 1, "is not a plain file name")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_and_boolean_weights_are_refused(copy_of, dtype):
    from safetensors.torch import load_file

    folder = copy_of()
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"].to(dtype)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(GPT2EngineError, match=r"transformer.ln_f.bias has dtype .*must be floating point"):
        GPT2.from_pretrained(folder)


# 10. The Python API checks what the CLI checks
@pytest.mark.parametrize(("call", "message"), [
    (lambda m, t: complete(m, t, []), "prompts must be a non-empty list"),
    (lambda m, t: complete(m, t, "abc"), "prompts must be a non-empty list"),
    (lambda m, t: GenerationOptions(max_new_tokens=1.5), "max_new_tokens must be an integer"),
    (lambda m, t: SamplingParams(seed="abc"), "seed must be an integer"),
    (lambda m, t: GenerationOptions(stop="xyz"), "stop must be a tuple of strings"),
    (lambda m, t: t.decode([-1]), "token id -1 is not in the vocabulary"),
    (lambda m, t: t.decode([1.5]), "token id 1.5 is not in the vocabulary"),
    (lambda m, t: GPT2.from_pretrained("x", device="nonsense"), "device must be"),
    (lambda m, t: GPT2.from_pretrained("x", dtype="int4"), "dtype must be one of"),
    (lambda m, t: t.encode(b"bytes"), "text must be a string"),
])
def test_the_api_refuses_what_the_cli_refuses(engine, call, message):
    with pytest.raises(GPT2EngineError, match=message):
        call(*engine)


def test_from_pretrained_takes_dtype_names(tiny_checkpoint):
    assert GPT2.from_pretrained(tiny_checkpoint, dtype="bfloat16").wte.weight.dtype == torch.bfloat16
    assert GPT2.from_pretrained(tiny_checkpoint, dtype="float32").wte.weight.dtype == torch.float32


# 12, 13. Start-up: no NumPy warning; what is loading is said on stderr, quiet with --quiet
@pytest.mark.slow
def test_loading_is_announced_on_stderr_and_quiet_says_nothing(tiny_checkpoint):
    loud = gpt2("generate", "Hi", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--seed", "4")
    assert loud.returncode == 0 and "NumPy" not in loud.err
    assert f"Loading weights from {tiny_checkpoint} on cpu, float32..." in loud.err
    assert "Weights loaded successfully" in loud.err and "Loading" not in loud.out
    quiet = gpt2("generate", "Hi", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--seed", "4",
                 "--quiet")
    assert quiet.returncode == 0 and quiet.err == "" and quiet.out == loud.out


# Property tests
@given(st.text())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_text_round_trips_or_is_refused(engine, text):
    _, tokenizer = engine
    try:
        ids = tokenizer.encode(text)
    except GPT2EngineError as error:
        assert "lone surrogate" in str(error)
        return
    assert tokenizer.decode(ids) == text


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_round_trip_when_utf8_and_are_refused_when_not(engine, data):
    _, tokenizer = engine
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        ids = tokenizer.encode(text)
    except GPT2EngineError:
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        return
    assert tokenizer.decode(ids).encode("utf-8") == data


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a": torch.randn(4, 3), "b": torch.arange(5.0), "c": torch.ones(2, 2, 2)}, path)
    return path.read_bytes()


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**6))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_safetensors_are_read_or_refused_in_one_line(small_safetensors, tmp_path_factory, edits, cut):
    data = bytearray(small_safetensors)
    for position, value in edits:
        data[position % len(data)] = value
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    path.write_bytes(bytes(data[: max(1, len(data) - cut % 64)]))
    try:
        tensors = {key: tensor for key, tensor, _ in read_tensors([path])}
    except GPT2EngineError as error:
        assert "\n" not in str(error) and "not a readable weight file" in str(error)
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= os.path.getsize(path)


INTERRUPTED_INSIDE_TORCH = """
import builtins, os, signal, sys
from gpt2engine.cli import main
real_import = builtins.__import__

def interrupt_inside_torch(name, *args, **kwargs):
    if name.startswith("torch.") and "torch.nn" not in sys.modules:  # torch/__init__ is running
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered at the next bytecode
    return real_import(name, *args, **kwargs)

builtins.__import__ = interrupt_inside_torch
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_while_torch_is_still_importing_is_quiet(tiny_checkpoint):
    # the interrupt lands inside torch's own import, wherever that is on the clock
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_INSIDE_TORCH, "generate", "Hi", "--model",
                           str(tiny_checkpoint)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and "Traceback" not in done.stderr and done.stdout == ""
