"""cli/flags.py and cli/parser.py in-process: every bad command line is one line on stderr and exit
code 2, before anything is loaded (the installed command's own: tests/test_cli.py)."""

import pytest

from gpt2engine.cli import main

BAD_COMMAND_LINES = [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be"),
    (["--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be in [1, 131072], got 0"),
    (["--max-new-tokens", str(10**12)], "--max-new-tokens: must be in [1, 131072]"),
    (["--dtype", "int4"], "argument --dtype: invalid choice"),
    (["--device", "nosuchdevice"], "device must be auto, cpu, cuda, cuda:N, mps or xpu"),
    (["--device", "meta"], "device must be auto, cpu"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["generate"], "the following arguments are required: PROMPT"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "inf"], "top_p must be a finite number"),
    (["--repetition-penalty", "1e30"], "repetition_penalty must be in"),
    (["--repetition-penalty", "1e-40"], "repetition_penalty must be in"),
    (["--seed", str(2**64)], "seed must be an integer in"),
    (["--seed", "-1"], "seed must be"),
    (["--prefix-cache-mib", "-1"], "--prefix-cache-mib: must be a finite number >= 0, got -1"),
    (["--prefix-cache-mib", "inf"], "--prefix-cache-mib: must be a finite number >= 0"),
    (["--prefix-cache-mib", "lots"], "--prefix-cache-mib: invalid float value: 'lots'"),
    (["serve", "--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count"),
    (["serve", "--max-batched-tokens", "0"], "--max-batched-tokens: must be a positive integer, got 0"),
    (["serve", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --min-replicas 3"),
]


# each flag after `gpt2` (the REPL) and after `gpt2 generate`; a command line of its own, as it is
CASES = [([*command, *argv], message) for argv, message in BAD_COMMAND_LINES
         for command in ([[]] if argv[0] in ("generate", "serve") else [[], ["generate", "Hi"]])]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--model", "/no/such/model"])
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("gpt2")


COMMANDS = [[], ["generate"], ["serve"], ["export"], ["eval", "perplexity"], ["bench"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help(capsys, command):
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--help"])
    out, err = capsys.readouterr()
    assert stopped.value.code == 0 and err == "" and "usage: gpt2" in out
