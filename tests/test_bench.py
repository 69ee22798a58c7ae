"""`gpt2 bench`: every engine and mode in its own process, the JSON it prints, the table and its
ratios, and a peer that is not installed reported as missing. (Speed itself is never asserted.)"""

import json
import os
import subprocess
import sys

import pytest

from gpt2engine import bench
from gpt2engine.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

GPT2 = [sys.executable, "-m", "gpt2engine.cli"]


@pytest.fixture(scope="module")
def measured(tiny_checkpoint, tmp_path_factory):
    done = subprocess.run([*GPT2, "bench", "--model", str(tiny_checkpoint), "--engines",
                           "gpt2engine,transformers,ctranslate2", "--new-tokens", "8", "--repeats", "1",
                           "--threads", "1", "--json"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GPT2ENGINE_CACHE": str(tmp_path_factory.mktemp("cache"))})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_engine_and_mode_reports_both_batch_sizes(measured):
    expected = {("gpt2engine", m) for m in bench.MODES["gpt2engine"]} | {("transformers", "float32")} | {
        ("ctranslate2", m) for m in bench.MODES["ctranslate2"]}
    assert {(r["engine"], r["dtype"]) for r in measured} == expected
    for row in measured:
        assert "failed" not in row and "missing" not in row, row
        assert row["batch"] in (1, 8) and row["threads"] == 1
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 0
    assert len(measured) == 2 * len(expected)


def test_the_table_shows_each_engine_and_its_ratios(measured, tiny_checkpoint):
    work = bench.Workload(threads=1, new_tokens=8, repeats=1, prefill_tokens=127)
    table = bench.report(measured, tiny_checkpoint, work, 0.0)
    assert "Ratios, decode, batch 1" in table and "Ratios, prefill" in table
    ours = next(r for r in measured
                if r["engine"] == "gpt2engine" and r["dtype"] == "int8" and r["batch"] == 8)
    peer = next(r for r in measured if r["engine"] == "transformers" and r["batch"] == 8)
    row = next(line for line in table.split("Ratios, decode, batch 8")[1].splitlines()
               if line.startswith("gpt2engine int8"))
    assert f"{ours['decode_tok_s'] / peer['decode_tok_s']:.2f}x" in row


def test_a_peer_that_is_not_installed_is_reported_missing(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(bench.NEEDS, "llama.cpp", (("no_such_module_here",), "pip install it"))
    rows = bench.run(["llama.cpp"], tiny_checkpoint, bench.Workload(threads=1), lambda message: None)
    assert [r["dtype"] for r in rows] == list(bench.MODES["llama.cpp"])
    assert all("no_such_module_here" in r["missing"] and "pip install it" in r["missing"] for r in rows)


def test_the_default_vocabulary_is_a_working_byte_level_bpe(tmp_path):
    bench.synthetic_vocabulary(tmp_path, 1000)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.vocab_size == 1000 and tokenizer.eot_id == 999
    text = "Any text at all: ünïcödé, tabs\t and <|endoftext|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_engines_and_workloads_that_do_not_fit_fail_in_one_line(tiny_checkpoint):
    for flags, message in ((["--engines", "vllm"], "unknown engine 'vllm'"),
                           (["--new-tokens", "120"], "do not fit in the model's context of 128")):
        done = subprocess.run([*GPT2, "bench", "--model", str(tiny_checkpoint), *flags],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
