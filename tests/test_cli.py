"""The `gpt2` command as a user runs it: the REPL through a real pseudo-terminal, one-shot
mode, export, and every mistake giving one line and a non-zero exit."""

import json
import shutil
import subprocess
import sys

import pexpect
import pytest
import torch

from conftest import GPT2_COMMAND, assert_one_line_error, run_gpt2
from gpt2engine.cli.repl import BANNER, PROMPT
from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY_FLAGS = ["--temperature", "0", "--max-new-tokens", "12", "--ignore-eos"]


def expected_text(tiny_model, prompt, **options):
    model, tokenizer = tiny_model
    options = GenerationOptions(**{"max_new_tokens": 12, "ignore_eos": True,
                                   "sampling": SamplingParams(temperature=0), **options})
    return complete(model, tokenizer, [prompt], options)[0]


@pytest.fixture
def repl(tiny_checkpoint):
    child = pexpect.spawn(GPT2_COMMAND, ["--model", str(tiny_checkpoint), *GREEDY_FLAGS],
                          encoding="utf-8", timeout=60, dimensions=(40, 500))
    child.expect_exact(BANNER)
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def assert_exits_cleanly(child):
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before


def test_repl_streams_the_answer_then_asks_again(repl, tiny_model):
    answer = expected_text(tiny_model, "Hello there").text
    assert answer.strip()  # a non-empty answer, so the check below can fail
    repl.sendline("Hello there")
    repl.expect_exact(PROMPT)
    assert repl.before == "Hello there\r\n" + answer.replace("\n", "\r\n") + "\r\n"
    repl.sendline("")  # an empty prompt is ignored
    repl.expect_exact(PROMPT)
    assert repl.before.strip() == ""
    repl.sendline("exit")
    assert_exits_cleanly(repl)


@pytest.mark.parametrize("leave", ["quit", "exit", "  quit  ", "ctrl-d", "ctrl-c"])
def test_repl_leaves_cleanly(repl, leave):
    if leave == "ctrl-d":
        repl.sendeof()
    elif leave == "ctrl-c":
        repl.sendintr()
    else:
        repl.sendline(leave)
    assert_exits_cleanly(repl)


def test_ctrl_c_during_an_answer_stops_only_that_answer(make_checkpoint):
    long_context = make_checkpoint(n_embd=32, n_layer=2, n_head=4, n_positions=4096, vocab_size=50257)
    child = pexpect.spawn(GPT2_COMMAND, ["--model", str(long_context), "--max-new-tokens", "4000",
                                         "--ignore-eos", "--seed", "0"],
                          encoding="utf-8", timeout=60)
    child.expect_exact(PROMPT)
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story\r\n")  # the terminal's echo of the typed line
    child.expect(r"\S{3}")  # the answer has started streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    child.sendline("quit")
    assert_exits_cleanly(child)


def test_repl_reports_a_prompt_that_is_too_long_and_goes_on(repl):
    repl.sendline("word" + " word" * 130)
    repl.expect_exact("exceeds the model's context of 128")
    repl.expect_exact(PROMPT)
    repl.sendline("quit")
    assert_exits_cleanly(repl)


@pytest.mark.parametrize("flags_first", [False, True], ids=["flags-after", "flags-before-command"])
def test_generate_prints_the_continuation(tiny_checkpoint, tiny_model, flags_first):
    flags = ["--model", str(tiny_checkpoint), *GREEDY_FLAGS]
    args = [*flags, "generate", "Hello there"] if flags_first else ["generate", "Hello there", *flags]
    result = run_gpt2(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(tiny_model, "Hello there").text + "\n"


@pytest.mark.parametrize(("flags", "expected"), [
    ([], (True, DEFAULT_PREFIX_CACHE_MIB)), (["--no-cuda-graphs"], (False, DEFAULT_PREFIX_CACHE_MIB)),
    (["--cuda-graphs", "--prefix-cache-mib", "12.5"], (True, 12.5)),
    (["--prefix-cache-mib", "64", "--no-prefix-cache"], (True, 0)),
])
def test_the_engine_flags_reach_the_engine(tiny_checkpoint, monkeypatch, capsys, flags, expected):
    from gpt2engine import cli
    from gpt2engine.engine import Engine

    seen, build = [], Engine.__init__

    def recording(self, *args, **kwargs):
        seen.append((kwargs["cuda_graphs"], kwargs["prefix_cache_mib"]))
        build(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", recording)
    assert cli.main(["generate", "Hi", "--model", str(tiny_checkpoint), "--quiet", "--max-new-tokens", "2",
                     *flags]) == 0
    assert seen == [expected] and capsys.readouterr().out


@pytest.mark.parametrize(("flags", "budget"), [([], 256 + 8), (["--max-batched-tokens", "1000"], 1000)])
def test_serve_builds_its_engine_with_the_step_budget(tiny_checkpoint, monkeypatch, flags, budget):
    from gpt2engine import cli
    from gpt2engine.server import serve

    built = []
    monkeypatch.setattr(serve, "serve", lambda build, *args, **kwargs: built.append(build()) or 0)
    assert cli.main(["serve", "--model", str(tiny_checkpoint), "--max-batch", "8", *flags]) == 0
    assert [engine.scheduler.max_batched_tokens for engine in built] == [budget]


def test_generate_reads_stdin_and_prints_json(tiny_checkpoint, tiny_model):
    result = run_gpt2("generate", "-", "--json", "--model", str(tiny_checkpoint), *GREEDY_FLAGS,
                 stdin="A prompt from a pipe\n")
    expected = expected_text(tiny_model, "A prompt from a pipe\n")
    assert json.loads(result.stdout) == {
        "model": str(tiny_checkpoint), "text": expected.text, "finish_reason": "length",
        "prompt_tokens": expected.prompt_tokens, "completion_tokens": 12,
    }


def test_generate_stop_string_and_stats(tiny_checkpoint, tiny_model):
    free = expected_text(tiny_model, "Hello").text
    stop = free[5:9]
    result = run_gpt2("generate", "Hello", "--model", str(tiny_checkpoint), *GREEDY_FLAGS,
                 "--stop", stop, "--stats")
    assert result.stdout == free[: free.index(stop)] + "\n"
    assert "tokens/s, first token after" in result.stderr


def test_generate_steers_as_the_library_does(tiny_checkpoint, tiny_model, tmp_path):
    from gpt2engine import Steering

    vector = torch.randn(32, generator=torch.Generator().manual_seed(6)).tolist()
    (tmp_path / "vector.json").write_text(json.dumps(vector))
    (tmp_path / "vector.txt").write_text("\n".join(map(repr, vector)))
    expected = expected_text(tiny_model, "Hello there", steer=(
        Steering("blocks.1.hook_resid_pre", vector, 3.0, start=2),
        Steering("blocks.0.hook_resid_mid", coefficient=-2.5, start=2, from_prompts=("Love", "Hate"))))
    assert expected.text != expected_text(tiny_model, "Hello there").text
    for file in ("vector.json", "vector.txt"):
        result = run_gpt2("generate", "Hello there", "--model", str(tiny_checkpoint), *GREEDY_FLAGS,
                          "--steer", "blocks.1.hook_resid_pre", "3", str(tmp_path / file),
                          "--steer-start", "2",
                          "--steer-prompts", "blocks.0.hook_resid_mid", "-2.5", "Love", "Hate")
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected.text + "\n"


@pytest.mark.parametrize(("steer", "message"), [
    (["--steer", "blocks.2.hook_resid_pre", "1", "VECTOR"], "layer 2 is out of range, the model has layers"),
    (["--steer", "blocks.0.mlp.hook_pre", "1", "VECTOR"], "is not a steerable (residual) hook"),
    (["--steer", "blocks.0.hook_resid_pre", "1", "SHORT"], "has 3 values; the model's residual stream has"),
    (["--steer", "blocks.0.hook_resid_pre", "inf", "VECTOR"], "coefficient must be a finite number"),
    (["--steer", "blocks.0.hook_resid_pre", "1", "NAN"], "a steering vector is a list of finite numbers"),
    (["--steer", "blocks.0.hook_resid_pre", "1", "MISSING"], "No such file or directory"),
    (["--steer", "blocks.0.hook_resid_pre", "1", "WORDS"], "not a JSON list or whitespace-separated numbers"),
    (["--steer-prompts", "blocks.0.hook_resid_pre", "x", "Love", "Hate"], "coefficient must be a number"),
])
def test_bad_steering_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, steer, message):
    files = {"VECTOR": "[" + ", ".join(["0.5"] * 32) + "]", "SHORT": "[1, 2, 3]",
             "NAN": "[NaN" + ", 1" * 31 + "]", "WORDS": "one two"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    steer = [str(tmp_path / a) if a in (*files, "MISSING") else a for a in steer]
    assert_one_line_error(run_gpt2("generate", "Hi", "--model", str(tiny_checkpoint), "--quiet", *steer),
                          2, message)


def test_generate_with_speculation_prints_the_same_and_its_acceptance(tiny_checkpoint):
    prompt = "the cat sat on the mat and the cat sat on the mat and the cat sat on"
    plain = run_gpt2("generate", prompt, "--model", str(tiny_checkpoint), *GREEDY_FLAGS, "--json")
    speculating = run_gpt2("generate", prompt, "--model", str(tiny_checkpoint), *GREEDY_FLAGS, "--json",
                           "--stats", "--speculative", "ngram", "--speculative-tokens", "3")
    assert speculating.returncode == 0, speculating.stderr
    shown, expected = json.loads(speculating.stdout), json.loads(plain.stdout)
    speculative = shown.pop("speculative")
    assert shown == expected and "speculative" not in expected
    accepted, proposed = speculative["accepted_tokens"], speculative["proposed_tokens"]
    assert speculative["proposer"] == "ngram" and 0 < accepted <= proposed
    assert speculative["acceptance_rate"] == accepted / proposed
    assert f"speculative: {accepted}/{proposed}" in speculating.stderr
    model = ["--model", str(tiny_checkpoint), "--quiet"]
    zero = run_gpt2("generate", "Hi", *model, "--speculative-tokens", "0")
    assert_one_line_error(zero, 2, "--speculative-tokens")
    absent = run_gpt2("generate", "Hi", *model, "--speculative", str(tiny_checkpoint / "absent"))
    assert_one_line_error(absent, 1, "absent")


def test_a_bad_flag_through_the_installed_command_is_one_line_and_exit_2():
    # every bad command line, in-process: tests/test_cli_flags.py
    result = run_gpt2("generate", "Hi", "--top-p", "1.5")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "top_p must be in (0, 1]" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong-shape", "too-long", "absent-device",
                                  "offline", "absent-device-offline"])
def test_user_errors_are_one_line_and_exit_1(tiny_checkpoint, tmp_path, case, monkeypatch):
    model, prompt, extra, expected = str(tiny_checkpoint), "Hello", [], "gpt2: error: "
    if case == "missing":
        model = str(tmp_path / "no-model")
    elif case == "corrupt":
        for name in ("config.json", "vocab.json", "merges.txt"):
            (tmp_path / name).write_bytes((tiny_checkpoint / name).read_bytes())
        (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
        model = str(tmp_path)
    elif case == "wrong-shape":
        shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
        config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
        model, expected = str(tmp_path / "ckpt"), "c_attn.bias: expected shape (192,), found (96,)"
    elif case == "too-long":
        prompt = "word" + " word" * 200
    elif case == "absent-device":  # a valid name, but no such device here
        extra, expected = ["--device", "cuda:7"], "device 'cuda:7' is not usable"
    else:  # offline, and not in the cache; with an absent device, that fails first (no download)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        model = "gpt2"
        if case == "absent-device-offline":
            extra, expected = ["--device", "cuda:7"], "device 'cuda:7' is not usable"
    result = run_gpt2("generate", prompt, "--model", model, "--max-new-tokens", "5", "--quiet", *extra)
    assert result.returncode == 1
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr and result.stdout == ""


def test_export_round_trips_through_transformers(tiny_checkpoint, tmp_path):
    import transformers

    out = tmp_path / "exported"
    result = run_gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt",
                                                      "model.safetensors", "vocab.json"]
    ids = torch.randint(0, 50257, (1, 20))
    with torch.inference_mode():
        exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits
        original = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()(ids).logits
        assert torch.equal(exported, original)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_importing_the_engine_does_not_import_transformers_and_help_skips_torch():
    code = ("import sys, gpt2engine, gpt2engine.cli, gpt2engine.generate, gpt2engine.loading.weights; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    help_only = ("import sys, contextlib, gpt2engine.cli as cli\n"
                 "with contextlib.suppress(SystemExit): cli.main(['--help'])\n"
                 "assert 'torch' not in sys.modules, 'torch imported for --help'")
    subprocess.run([sys.executable, "-c", help_only], check=True, capture_output=True)


def test_flags_are_checked_and_the_tokenizer_parsed_before_torch_is_imported(tiny_checkpoint):
    """Python's memory that the tokenizer's parse frees is refilled by torch's import only when
    the parse comes first (4 MiB of an int8 model's peak)."""
    code = ("import sys, gpt2engine.tokenizer as t\n"
            "from gpt2engine.cli import load as loading, parser as cli\n"
            "args = cli.parse(['--temperature', '0.5', '--stop', 'x', '--model', sys.argv[1]])\n"
            "assert 'torch' not in sys.modules, 'torch imported to check the flags'\n"
            "parse = t.Tokenizer.from_pretrained.__func__\n"
            "def checked(cls, folder):\n"
            "    assert 'torch' not in sys.modules, 'torch imported before the tokenizer'\n"
            "    return parse(cls, folder)\n"
            "t.Tokenizer.from_pretrained = classmethod(checked)\n"
            "loading.load(args)\n"
            "assert 'torch' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("data", [b"\xff\xfe", b"caf\xe9", b"ok \xed\xa0\x80 surrogate bytes"])
def test_invalid_utf8_on_stdin_and_in_argv(tiny_checkpoint, data):
    from_stdin = run_gpt2("generate", "-", "--model", str(tiny_checkpoint), "--quiet", stdin=data)
    assert_one_line_error(from_stdin, 1, "stdin: not UTF-8 text")
    in_argv = run_gpt2("generate", data, "--model", str(tiny_checkpoint), "--quiet")
    assert_one_line_error(in_argv, 1, "text is not valid Unicode: lone surrogate")


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


@pytest.mark.slow
@pytest.mark.parametrize("command", [["eval", "perplexity", "/dev/zero"], ["generate", "-"]])
def test_endless_input_is_cut_off_in_one_line(tiny_checkpoint, command):
    with open("/dev/zero", "rb") as zeros:
        done = subprocess.run([GPT2_COMMAND, *command, "--model", str(tiny_checkpoint), "--quiet"],
                              stdin=zeros, capture_output=True, timeout=120, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "MiB" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_loading_is_announced_on_stderr_and_quiet_says_nothing(tiny_checkpoint):
    loud = run_gpt2("generate", "Hi", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--seed", "4")
    assert loud.returncode == 0 and "NumPy" not in loud.stderr
    assert f"Loading weights from {tiny_checkpoint} on cpu, float32..." in loud.stderr
    assert "Weights loaded successfully" in loud.stderr and "Loading" not in loud.stdout
    quiet = run_gpt2("generate", "Hi", "--model", str(tiny_checkpoint), "--max-new-tokens", "2",
                     "--seed", "4", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout


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
