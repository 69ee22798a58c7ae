"""Evaluation against log-likelihoods computed with transformers on the same checkpoint and text."""

import copy
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import GPT2_COMMAND
from gpt2engine import GPT2EngineError
from gpt2engine.engine import Engine
from gpt2engine.evaluation import (
    Span,
    lambada,
    loglikelihood,
    loglikelihood_rolling,
    multiple_choice,
    perplexity,
    read_choices,
    read_lambada,
    score_in_engine,
    score_spans,
    shared_beginnings,
    sliding_windows,
    split_request,
)
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
LAMBADA = ROOT / "examples" / "lambada.jsonl"
TEMPEST = (ROOT / "tests" / "data" / "tempest.txt").read_text()
PROSE = TEMPEST[:12000]  # about 3,500 tokens of the play: ~55 windows of the 128-token model
RELATIVE = 1e-4


@torch.inference_mode()
def reference_perplexity(reference, ids, max_length, stride):
    """Hugging Face's "perplexity of fixed-length models" loop, with exact token counts."""
    nll, counted, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        logits = reference(window).logits
        nll += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        counted += int((labels[0, 1:] != -100).sum())
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll / counted), counted


@torch.inference_mode()
def reference_loglikelihood(reference, context_ids, continuation_ids):
    ids = torch.tensor([(context_ids + continuation_ids)[-129:][:-1]])
    logprobs = reference(ids).logits[0].log_softmax(-1)[-len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    return logprobs[torch.arange(len(targets)), targets].sum().item(), bool(
        (logprobs.argmax(-1) == targets).all())


@pytest.mark.parametrize(("n", "length", "stride"), [(10, 4, 2), (10, 4, 4), (9, 4, 3), (3, 8, 4),
                                                     (1000, 128, 64), (1000, 128, 1)])
def test_windows_score_every_token_after_the_first_once(n, length, stride):
    scored = [t for begin, end, first in sliding_windows(n, length, stride) for t in range(first, end)]
    starts = {begin for begin, _, _ in sliding_windows(n, length, stride)}
    if stride < length:
        assert scored == list(range(1, n))
    else:  # no overlap: a window's first token has no context inside its window
        assert scored == [t for t in range(1, n) if t not in starts]
    assert all(end - begin <= length for begin, end, _ in sliding_windows(n, length, stride))


@pytest.mark.parametrize(("max_length", "stride"), [(128, 64), (128, 128), (100, 37), (16, 8)])
def test_perplexity_matches_transformers_on_prose(tiny_model, reference, max_length, stride):
    model, tokenizer = tiny_model
    result = perplexity(model, tokenizer, PROSE, max_length, stride, batch_size=4)
    expected, counted = reference_perplexity(reference, tokenizer.encode(PROSE), max_length, stride)
    assert result.tokens == counted
    assert result.perplexity == pytest.approx(expected, rel=RELATIVE)
    scored_bytes = len(PROSE.encode()) - len(tokenizer.token_bytes[tokenizer.encode(PROSE)[0]])
    if stride < max_length:
        assert result.bytes == scored_bytes
        assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / scored_bytes)


@pytest.mark.slow
def test_batched_perplexity_equals_unbatched(tiny_model):
    model, tokenizer = tiny_model
    one = perplexity(model, tokenizer, PROSE, 100, 30, batch_size=1)
    for batch_size in (3, 8):
        batched = perplexity(model, tokenizer, PROSE, 100, 30, batch_size=batch_size)
        assert batched.tokens == one.tokens
        assert batched.nll == pytest.approx(one.nll, rel=1e-6)


def test_text_shorter_than_one_window_is_one_window(tiny_model, reference):
    model, tokenizer = tiny_model
    text = "Full fathom five thy father lies."
    result = perplexity(model, tokenizer, text)
    expected, counted = reference_perplexity(reference, tokenizer.encode(text), 128, 64)
    assert result.tokens == counted == len(tokenizer.encode(text)) - 1
    assert result.perplexity == pytest.approx(expected, rel=RELATIVE)


REQUESTS = [
    ("The quick brown fox jumps over the lazy", " dog"),
    ("To be, or not to be, that is the ", "question"),  # trailing space moves to the continuation
    ("", "An empty context starts from end of text."),
    (TEMPEST[:3000], " and the rest is silence"),  # longer than the context: cut on the left
    ("Numbers: 1, 2, 3,", " 4, 5, 6"),
]


def test_loglikelihood_matches_transformers(tiny_model, reference):
    model, tokenizer = tiny_model
    ours = loglikelihood(model, tokenizer, REQUESTS, batch_size=3)
    for (context, continuation), score in zip(REQUESTS, ours, strict=True):
        ids = split_request(tokenizer, context, continuation)
        expected, greedy = reference_loglikelihood(reference, *ids)
        assert score.logprob == pytest.approx(expected, rel=RELATIVE)
        assert score.greedy == greedy
    assert split_request(tokenizer, "", "Hi")[0] == [tokenizer.eot_id]
    assert split_request(tokenizer, "to the ", "question") == (tokenizer.encode("to the"),
                                                               tokenizer.encode(" question"))


def test_continuations_of_one_context_share_its_prefill_with_the_same_bits(tiny_model):
    """Scored in the engine: with the prefix cache, the endings after one context prefill it once."""
    model, tokenizer = tiny_model
    context = tokenizer.encode(PROSE[:400])[:70]
    spans = [Span(context + tokenizer.encode(ending), len(context))
             for ending in (" and so to bed", " the rest is silence", " sea-change", " and so to bed")]
    engines = [Engine(model, tokenizer, max_batch=2, prefill_chunk=16, prefix_cache_mib=mib)
               for mib in (8, 0)]
    cached, plain = (score_in_engine(engine, spans) for engine in engines)
    assert cached == plain  # bit for bit
    assert engines[0].prefix_cache.stats.hit_tokens >= 3 * 64  # the context's 4 whole blocks, 3 times
    for ours, forward in zip(cached, score_spans(model, spans), strict=True):
        assert ours.logprob == pytest.approx(forward.logprob, rel=RELATIVE) and ours.greedy == forward.greedy


def test_only_requests_that_share_a_whole_chunk_go_through_the_engine():
    spans = [Span([1, 2, 3, 4, 5, 6], 5), Span([1, 2, 3, 4, 9, 9, 9], 5), Span([1, 2, 3, 4], 3),
             Span([7, 7, 7, 7, 7], 4), Span([1, 2, 3, 4, *range(20)], 20)]
    # the third is no longer than a block, the fourth shares nothing, the last would not fit a row
    assert shared_beginnings(spans, block=4, context=16) == {0, 1}


def test_greedy_flag_is_true_for_what_greedy_decoding_produces(tiny_model):
    model, tokenizer = tiny_model
    options = GenerationOptions(max_new_tokens=5, sampling=SamplingParams(temperature=0), ignore_eos=True)
    [result] = complete(model, tokenizer, ["The storm"], options)
    context_ids = tokenizer.encode("The storm")
    [score] = score_spans(model, [Span(context_ids + result.token_ids, len(context_ids))])
    assert score.greedy


def test_rolling_loglikelihood_scores_every_token(tiny_model, reference):
    model, tokenizer = tiny_model
    text = "Our revels now are ended. These our actors, as I foretold you, were all spirits."
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    with torch.inference_mode():
        logprobs = reference(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    assert loglikelihood_rolling(model, tokenizer, text) == pytest.approx(expected, rel=RELATIVE)
    long = loglikelihood_rolling(model, tokenizer, PROSE[:4000], max_length=128, stride=64)
    with_eot = perplexity(model, tokenizer, "<|endoftext|>" + PROSE[:4000], 128, 64)
    assert long == pytest.approx(-with_eot.nll, rel=RELATIVE)


def test_scoring_from_no_context_needs_an_end_of_text_token(tiny_model):
    model, tokenizer = tiny_model
    without = copy.copy(tokenizer)
    without.eot_id = None  # a tokenizer.json with no <|endoftext|>
    for score in (lambda: loglikelihood_rolling(model, without, "Some text"),
                  lambda: split_request(without, "", " an answer")):
        with pytest.raises(GPT2EngineError, match=re.escape("has no <|endoftext|> to score")):
            score()


def greedy_word_passages(model, tokenizer, contexts) -> list[tuple[str, str]]:
    """Passages whose last word is the model's own greedy next token (a space and letters), so
    that accuracy on them is not 0 on a random-weight model, and the test can tell."""
    passages = []
    for context in contexts:
        with torch.inference_mode():
            token = int(model(torch.tensor([tokenizer.encode(context)]))[0, -1].argmax())
        word = tokenizer.decode([token])
        if word.startswith(" ") and word[1:].isalpha():
            passages.append((context, word))
    assert len(passages) >= 2
    return passages


def test_lambada_matches_transformers(tiny_model, reference):
    model, tokenizer = tiny_model
    contexts = [f"{w} {v} and then" for w in ("The storm", "A quiet night", "Her keys", "He ran", "We sang")
                for v in ("came", "fell", "rose", "went")]
    requests = read_lambada(LAMBADA) + greedy_word_passages(model, tokenizer, contexts)
    assert requests[0][1] == " door"
    result = lambada(model, tokenizer, requests, batch_size=2)
    expected = [reference_loglikelihood(reference, *split_request(tokenizer, c, w)) for c, w in requests]
    n = len(requests)
    assert result["examples"] == n and 0 < result["accuracy"] < 1
    assert result["accuracy"] == sum(greedy for _, greedy in expected) / n
    assert result["perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in expected) / n), rel=RELATIVE)


def test_multiple_choice_matches_transformers(tiny_model, reference):
    model, tokenizer = tiny_model
    records = read_choices(ROOT / "examples" / "choice.jsonl")
    result = multiple_choice(model, tokenizer, records, batch_size=5)
    correct = correct_norm = 0
    for record in records:
        lls = [reference_loglikelihood(reference, *split_request(tokenizer, record["context"], e))[0]
               for e in record["endings"]]
        norm = [ll / len(e) for ll, e in zip(lls, record["endings"], strict=True)]
        correct += lls.index(max(lls)) == record["label"]
        correct_norm += norm.index(max(norm)) == record["label"]
    assert (result["accuracy"], result["accuracy_norm"]) == (correct / 4, correct_norm / 4)


def run(*args):
    return subprocess.run([GPT2_COMMAND, "eval", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_perplexity_json_and_text(tiny_model, tiny_checkpoint, tmp_path):
    model, tokenizer = tiny_model
    second = tmp_path / "second.txt"
    second.write_text(TEMPEST[20000:24000])
    files = [str(ROOT / "tests" / "data" / "tempest.txt"), str(second)]
    result = run("perplexity", *files, "--model", str(tiny_checkpoint), "--json", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    whole = perplexity(model, tokenizer, TEMPEST) + perplexity(model, tokenizer, second.read_text())
    assert report["tokens"] == whole.tokens
    assert report["perplexity"] == pytest.approx(whole.perplexity, rel=RELATIVE)
    assert report["bits_per_byte"] == pytest.approx(whole.bits_per_byte, rel=RELATIVE)
    assert [f["file"] for f in report["files"]] == files
    text = run("perplexity", str(second), "--model", str(tiny_checkpoint), "--max-length", "64",
               "--stride", "64")
    assert text.returncode == 0 and text.stdout.startswith(f"{second}: perplexity ")
    assert "tokens scored" in text.stdout


@pytest.mark.slow
def test_cli_lambada_and_choice(tiny_model, tiny_checkpoint):
    model, tokenizer = tiny_model
    result = run("lambada", str(LAMBADA), "--model", str(tiny_checkpoint), "--json")
    expected = lambada(model, tokenizer, read_lambada(LAMBADA))
    assert json.loads(result.stdout) == pytest.approx(expected, rel=RELATIVE)
    result = run("choice", str(ROOT / "examples" / "choice.jsonl"), "--model", str(tiny_checkpoint))
    assert result.returncode == 0 and result.stdout.startswith("accuracy ")
    assert "accuracy_norm " in result.stdout and "examples 4" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("command", "content", "message"), [
    ("perplexity", b"", "empty"),
    ("perplexity", b"   \n\n", "empty"),
    ("perplexity", b"caf\xe9 latin-1", "not UTF-8 text (byte 3)"),
    ("perplexity", b"Hi", "text of 1 token(s): perplexity needs at least 2"),
    ("lambada", b'{"text": "one two"}\n{"text": broken}\n', ":2: not valid JSON"),
    ("lambada", b'{"text": "one two"}\n\n{"words": "x"}\n', ":3: field 'text' missing or not str"),
    ("lambada", b'{"text": "single"}\n', ":1: a single word, nothing to predict it from"),
    ("lambada", b'["a list"]\n', ":1: expected a JSON object"),
    ("choice", b'{"context": "c", "endings": ["a", "b"], "label": 2}\n', ":1: label 2 is out of range"),
    ("choice", b'{"context": "c", "endings": ["a"], "label": 0}\n', ":1: 'endings' must be 2 or more"),
])
def test_bad_input_is_one_line_and_exit_1(tiny_checkpoint, tmp_path, command, content, message):
    path = tmp_path / "input"
    path.write_bytes(content)
    result = run(command, str(path), "--model", str(tiny_checkpoint), "--quiet")
    assert result.returncode == 1
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


@pytest.mark.slow
def test_bad_window_settings(tiny_model, tiny_checkpoint, tmp_path):
    model, tokenizer = tiny_model
    with pytest.raises(GPT2EngineError, match=r"max length must be in \[2, 128\]"):
        perplexity(model, tokenizer, PROSE, max_length=129)
    with pytest.raises(GPT2EngineError, match=r"stride must be in \[1, max length = 64\], got 65"):
        perplexity(model, tokenizer, PROSE, max_length=64, stride=65)
    result = run("perplexity", str(tmp_path / "missing.txt"), "--model", str(tiny_checkpoint))
    assert result.returncode == 1 and "missing.txt: no such file" in result.stderr
    result = run("perplexity", "x.txt", "--stride", "0")
    assert result.returncode == 2 and "must be a positive integer" in result.stderr
