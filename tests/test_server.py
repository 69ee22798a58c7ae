"""`gpt2 serve` as clients use it: a real server on loopback, started and stopped here, driven by
the official openai client, lm-evaluation-harness, raw HTTP and signals. Every wait is bounded."""

import base64
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from test_lm_eval_adapter import LM_EVAL_COMMAND, harness

from conftest import GPT2_COMMAND
from gpt2engine import Steering
from gpt2engine.evaluation import Span, score_spans
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

NAME = "tiny-gpt2"
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *flags: str, ready_within: float = 60) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [GPT2_COMMAND, "serve", "--model", str(checkpoint), "--served-model-name", NAME,
             "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def post(self, path: str, body=None, headers=None) -> httpx.Response:
        # json.dumps escapes lone surrogates ("\ud800"), as a hostile client may send them
        return httpx.post(f"{self.url}{path}", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json", **(headers or {})})

    def metric(self, name: str, **kwargs) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10, **kwargs).text
        [value] = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        return float(value)

    def stop(self, signalled: bool = False) -> tuple[int, str]:
        if not signalled and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = Server(tiny_checkpoint, "--max-batch", "4", "--max-body-bytes", "100000")
    yield running
    code, err = running.stop()
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def long_context(make_checkpoint):
    """Generation long enough (thousands of tokens) to still run while a test acts on it."""
    return make_checkpoint(n_embd=32, n_layer=2, n_head=4, n_positions=4096, vocab_size=50257)


GREEDY = SamplingParams(temperature=0)


def library(tiny_model, prompt, max_tokens=12, sampling=GREEDY, **options):
    model, tokenizer = tiny_model
    options = GenerationOptions(max_new_tokens=max_tokens, sampling=sampling, **options)
    return complete(model, tokenizer, [prompt], options)[0]


def test_completion_through_the_openai_client(client, tiny_model):
    result = client.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0)
    expected = library(tiny_model, "Hello there")
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (2, expected.completion_tokens)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streamed_completion_with_usage(client, tiny_model):
    chunks = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    expected = library(tiny_model, "Once upon a time", max_tokens=20)
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason


def test_token_id_prompts_and_several_prompts(client, tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer.encode("The isle is full of noises")
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == library(tiny_model, "The isle is full of noises", max_tokens=10).text
    prompts = ["First prompt", "Second"]
    several = client.completions.create(model=NAME, prompt=[tokenizer.encode(p) for p in prompts],
                                        max_tokens=6, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [
        library(tiny_model, p, max_tokens=6).text for p in prompts]


def test_n_choices_are_seeded_and_distinct(client, tiny_model):
    result = client.completions.create(model=NAME, prompt="Be not afeard", max_tokens=12, n=3, seed=7,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    seeded = library(tiny_model, "Be not afeard", sampling=SamplingParams(seed=7), ignore_eos=True)
    assert texts[0] == seeded.text
    again = client.completions.create(model=NAME, prompt="Be not afeard", max_tokens=12, n=3, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert result.usage.completion_tokens == 36


def test_logprobs_and_echo_equal_the_library_loglikelihoods(client, tiny_model):
    model, tokenizer = tiny_model
    prompt = "The quality of mercy is not strained"
    result = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0,
                                       logprobs=3, echo=True)
    ids = tokenizer.encode(prompt)
    logprobs = result.choices[0].logprobs
    assert result.choices[0].text.startswith(prompt)
    assert logprobs.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    scores = score_spans(model, [Span(ids[: i + 1], i) for i in range(1, len(ids))])
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx([s.logprob for s in scores], abs=1e-4)
    assert all(len(top) == 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[: len(ids)] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert len(logprobs.tokens) == len(ids) + 2  # the prompt, then the two generated tokens


def decoded(activation: dict) -> torch.Tensor:
    assert activation["dtype"] == "float32"
    values = np.frombuffer(base64.b64decode(activation["data"]), dtype="<f4")
    return torch.from_numpy(values.copy()).view(activation["shape"])


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_captured_activations_are_the_librarys(server, tiny_model, echo, stream):
    prompt, names = "Our revels now are ended", ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "capture": names, "echo": echo,
            "stream": stream, "ignore_eos": True}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        assert [("activations" in c["choices"][0]) for c in chunks] == [False] * (len(chunks) - 1) + [True]
        choice = chunks[-1]["choices"][0]
    else:
        choice = response.json()["choices"][0]
    expected = library(tiny_model, prompt, max_tokens=5, capture=tuple(names), ignore_eos=True).activations
    skip = 0 if echo else len(tiny_model[1].encode(prompt))
    resid = decoded(choice["activations"][names[0]])
    assert torch.equal(resid, expected[names[0]][skip:])
    assert torch.equal(decoded(choice["activations"][names[1]]), expected[names[1]][:, skip:])
    assert "activations" not in server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()[
        "choices"][0]


def test_steering_through_the_server_is_the_librarys(server, tiny_model):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4)).tolist()
    steer = [{"hook": "blocks.1.hook_resid_pre", "vector": vector, "coefficient": 3.0},
             {"hook": "blocks.0.hook_resid_mid", "from_prompts": ["Love", "Hate"], "coefficient": 2.0}]
    body = {"prompt": "Be not afeard", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    steered = server.post("/v1/completions", body | {"steer": steer}).json()["choices"][0]["text"]
    expected = library(tiny_model, "Be not afeard", max_tokens=10, ignore_eos=True, steer=(
        Steering("blocks.1.hook_resid_pre", vector, 3.0),
        Steering("blocks.0.hook_resid_mid", coefficient=2.0, from_prompts=("Love", "Hate"))))
    assert steered == expected.text
    assert steered != server.post("/v1/completions", body).json()["choices"][0]["text"]


def test_speculation_through_the_server_gives_the_same_and_counts(server, tiny_checkpoint):
    speculating = Server(tiny_checkpoint, "--speculative", "ngram", "--max-batch", "4")
    try:
        body = {"prompt": "the cat sat on the mat and the cat sat on the mat and the cat sat on",
                "max_tokens": 20, "ignore_eos": True, "logprobs": 2}
        for settings in ({"temperature": 0}, {"temperature": 0.7, "seed": 5, "n": 3}):
            theirs = server.post("/v1/completions", body | settings).json()
            ours = speculating.post("/v1/completions", body | settings).json()
            assert [c["text"] for c in ours["choices"]] == [c["text"] for c in theirs["choices"]]
            assert [c["logprobs"] for c in ours["choices"]] == [c["logprobs"] for c in theirs["choices"]]
        proposed = speculating.metric('gpt2engine_spec_decode_proposed_tokens_total{proposer="ngram"}')
        accepted = speculating.metric('gpt2engine_spec_decode_accepted_tokens_total{proposer="ngram"}')
        assert 0 < accepted <= proposed
    finally:
        assert speculating.stop()[0] == 0


def test_echoed_logprobs_come_from_the_prefix_cache_the_same(tiny_checkpoint):
    """lm-eval's request shape: echo + logprobs, the same context before different answers."""
    context = "Full fathom five thy father lies; of his bones are coral made; " * 3
    bodies = [{"prompt": context + answer, "max_tokens": 1, "temperature": 0, "logprobs": 1,
               "echo": True} for answer in (" those are pearls", " nothing of him", " those are pearls")]
    answers = {}
    for flags in (["--prefill-chunk", "16"], ["--prefill-chunk", "16", "--no-prefix-cache"]):
        server = Server(tiny_checkpoint, *flags)
        try:
            answers[len(flags)] = [server.post("/v1/completions", body).json() for body in bodies]
            cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers[len(flags)]]
            if len(flags) == 2:
                assert cached[0] == 0 and cached[1] >= 32 and cached[2] > cached[1]
                assert server.metric("gpt2engine_prefix_cache_hits_total") == sum(cached)
                assert server.metric("gpt2engine_prefix_cache_queries_total") == sum(
                    a["usage"]["prompt_tokens"] for a in answers[2])
                assert server.metric("gpt2engine_prefix_cache_bytes") > 0
            else:
                assert cached == [0, 0, 0]
                assert "gpt2engine_prefix_cache" not in httpx.get(f"{server.url}/metrics").text
        finally:
            server.stop()
    on, off = ([a["choices"][0]["logprobs"] for a in answers[n]] for n in (2, 3))
    assert on == off  # every token, logprob and top entry, bit for bit


def test_lm_eval_local_completions_scores_like_the_library(server, tiny_checkpoint, tmp_path):
    args = (f"base_url={server.url}/v1/completions,model={NAME},tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=2,max_retries=1")
    served = harness([LM_EVAL_COMMAND], "local-completions", tiny_checkpoint, tmp_path, model_args=args)
    ours = harness([LM_EVAL_COMMAND], "gpt2engine", tiny_checkpoint, tmp_path)
    assert served["acc,none"] == ours["acc,none"]
    assert served["perplexity,none"] == pytest.approx(ours["perplexity,none"], rel=1e-4)


def test_sixteen_staggered_clients_each_get_their_solo_output(server, client, tiny_model):
    prompts = [f"Client {i} says" + " hello" * (i % 5) for i in range(16)]
    expected = [library(tiny_model, p, max_tokens=8 + i, ignore_eos=True).text for i, p in enumerate(prompts)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        time.sleep(0.03 * i)
        result = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8 + i, temperature=0,
                                           extra_body={"ignore_eos": True}, stream=i % 2 == 1)
        results[i] = result.choices[0].text if i % 2 == 0 else "".join(c.choices[0].text for c in result)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results.get(i) for i in range(16)] == expected
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.metric("gpt2engine_requests_running") == 0


BAD_REQUESTS = [
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "n": True}, 400, "n"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, -3]}, 400, "prompt"),
    ({"prompt": [[1, 2], [99999999]]}, 400, "prompt"),
    ({"prompt": "\ud800 lone surrogate"}, 400, "prompt"),
    ({"prompt": "word " * 200}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ({}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "capture": ["blocks.9.hook_resid_pre"]}, 400, "capture"),
    ({"prompt": "hi", "capture": "hook_embed"}, 400, "capture"),
    ({"prompt": ["hi"] * 16, "n": 16, "capture": ["blocks.0.attn.hook_pattern"] * 1
      + [f"blocks.{i % 2}.mlp.hook_{p}" for i in range(2) for p in ("pre", "post")], "max_tokens": 100},
     400, "capture"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.hook_resid_pre", "vector": [1.0]}]}, 400, "steer"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.attn.hook_q", "vector": [1.0] * 32}]}, 400, "steer"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.hook_resid_pre", "vector": [float("nan")] * 32}]},
     400, "steer"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.hook_resid_pre", "vector": [1.0] * 32,
                                 "coefficient": float("inf")}]}, 400, "steer"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.hook_resid_pre"}]}, 400, "steer"),
    ({"prompt": "hi", "steer": [{"hook": "blocks.0.hook_resid_pre", "from_prompts": ["a"]}]}, 400, "steer"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    response = server.post("/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_prompt_too_long_names_both_lengths(server):
    body = {"prompt": "word" + " word" * 199, "max_tokens": 5}
    error = server.post("/v1/completions", body).json()["error"]
    assert "200 tokens" in error["message"] and "context of 128" in error["message"]


@pytest.mark.parametrize(("content", "status", "kind"), [
    (b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "body"),
    (b'{"prompt": "' + b"a" * 200_000 + b'"}', 413, "over the limit"),
    (b"\xff\xfe", 400, "not valid JSON"),
])
def test_malformed_and_oversized_bodies(server, content, status, kind):
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status and kind in response.json()["error"]["message"]


def test_other_routes(server, tiny_model):
    _, tokenizer = tiny_model
    chat = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    message = chat.json()["error"]["message"]  # GPT-2 has no chat template: how to give one
    assert chat.status_code == 400 and "--chat-template" in message and "/v1/completions" in message
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    tokens = server.post("/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["tokens"] == tokenizer.encode("Hello world") and tokens["count"] == 2
    assert server.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert server.post("/detokenize", {"tokens": [10**9]}).status_code == 400
    surrogate = server.post("/tokenize", {"prompt": "\udc80"}).json()["error"]["message"]
    assert surrogate.startswith("text is not valid Unicode")
    assert "/v1/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("gpt2engine_time_to_first_token_seconds_bucket", "gpt2engine_inter_token_latency_seconds",
                 "gpt2engine_e2e_request_latency_seconds", "gpt2engine_prompt_tokens_total",
                 "gpt2engine_generation_tokens_total", "gpt2engine_requests_aborted_total",
                 "gpt2engine_requests_waiting", "gpt2engine_cache_rows_in_use"):
        assert name in metrics


def wait_until(condition, seconds=30.0, what="the condition", poll=0.05) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(poll)


class OpenStream:
    """A streamed completion read on a thread of its own until closed."""

    def __init__(self, server: Server, body: dict) -> None:
        self.started, self.leave = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.run, args=(f"{server.url}/v1/completions", body))
        self.thread.start()

    def run(self, url: str, body: dict) -> None:
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for _ in response.iter_lines():  # leaving the loop closes the connection
                self.started.set()
                if self.leave.is_set():
                    break

    def close(self) -> None:  # the client goes away mid-stream
        self.leave.set()
        self.thread.join(timeout=30)


def test_a_full_queue_answers_503_at_once_and_a_disconnect_frees_the_row(long_context):
    server = Server(long_context, "--max-batch", "1", "--max-queue", "1")
    long = {"prompt": "Go", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        running = OpenStream(server, long)
        assert running.started.wait(30)
        waiting = OpenStream(server, long)
        wait_until(lambda: server.metric("gpt2engine_requests_waiting") == 1)
        refused = server.post("/v1/completions", {"prompt": "Hi"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert server.metric("gpt2engine_requests_running") == 1  # refused, not kept until a row freed
        assert "try again later" in refused.json()["error"]["message"]
        running.close()  # its row goes to the waiting request within a step
        assert waiting.started.wait(30)
        assert server.metric("gpt2engine_requests_aborted_total") == 1
        waiting.close()
        wait_until(lambda: server.metric("gpt2engine_cache_rows_in_use") == 0)
        assert server.metric("gpt2engine_requests_aborted_total") == 2
    finally:
        assert server.stop()[0] == 0


def test_api_key(tiny_checkpoint):
    server = Server(tiny_checkpoint, "--api-key", KEY)
    try:
        body = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = server.post("/v1/completions", body, headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        assert keyed.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        assert server.stop()[0] == 0


def sigterm_mid_stream(server: Server, max_tokens: int, while_draining=lambda: None) -> list[str]:
    """Start a streamed completion, send SIGTERM after its first line, run `while_draining`, and
    return the finish reasons of the rest of the stream (which must end in [DONE])."""
    body = {"prompt": "Go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGTERM)
        while_draining()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    return [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]


def test_sigterm_drains_then_exits_0(long_context):
    server = Server(long_context, "--shutdown-timeout", "60")

    def refuses_new_work() -> None:
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503)
        assert server.post("/v1/completions", {"prompt": "Hi"}).status_code == 503

    finishes = sigterm_mid_stream(server, 300, refuses_new_work)
    assert finishes[-1] == "length"  # finished in full, within the shutdown timeout
    code, err = server.stop(signalled=True)
    assert code == 0 and "Traceback" not in err


def test_sigterm_aborts_what_outlives_the_timeout(long_context):
    server = Server(long_context, "--shutdown-timeout", "0.5")
    assert sigterm_mid_stream(server, 4000)[-1] == "abort"
    code, err = server.stop(signalled=True)
    assert code == 0 and "aborting 1 request" in err


def test_serve_errors_are_one_line(tiny_checkpoint, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run([GPT2_COMMAND, "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
                               capture_output=True, text=True, timeout=60)
    missing = subprocess.run([GPT2_COMMAND, "serve", "--model", str(tmp_path / "none"), "--port", "0"],
                             capture_output=True, text=True, timeout=60)
    for result, message in ((taken, "cannot listen on"), (missing, "no such folder")):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.startswith("gpt2: error:")]
        assert message in line
    for flags in (["--port", "70000"], ["--shutdown-timeout", "-1"], ["--shutdown-timeout", "nan"],
                  ["--api-key", ""], ["--max-batch", "0"]):
        bad_flag = subprocess.run([GPT2_COMMAND, "serve", *flags], capture_output=True, text=True)
        assert bad_flag.returncode == 2 and bad_flag.stderr.count("\n") == 1, flags



def test_every_route_answers_503_while_the_weights_load(tiny_model):
    """The real app in-process, with a loader that waits until the test lets it finish."""
    from fastapi.testclient import TestClient

    from gpt2engine.engine import Engine
    from gpt2engine.server.app import create_app
    from gpt2engine.server.settings import Settings

    release = threading.Event()

    def load() -> Engine:
        assert release.wait(30)
        return Engine(*tiny_model, max_batch=2)

    app = create_app(Settings(model_name=NAME), load, on_load_error=lambda message: None)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        busy = client.post("/v1/completions", json={"prompt": "Hi"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        release.set()
        wait_until(lambda: client.get("/health").status_code == 200)
        done = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert done.json()["choices"][0]["text"] == library(tiny_model, "Hi", max_tokens=3).text


def test_listening_beyond_loopback_without_a_key_warns(tiny_checkpoint):
    # 192.0.2.1 is a documentation address that is not on this machine: the warning comes first,
    # then binding fails here, so nothing is ever sent anywhere.
    done = subprocess.run([GPT2_COMMAND, "serve", "--model", str(tiny_checkpoint), "--host", "192.0.2.1",
                           "--port", "8000"], capture_output=True, text=True, timeout=60)
    assert "warning: listening on 192.0.2.1 without an API key" in done.stderr
    assert done.returncode == 1 and "cannot listen on 192.0.2.1:8000" in done.stderr
    keyed = subprocess.run([GPT2_COMMAND, "serve", "--model", str(tiny_checkpoint), "--host", "192.0.2.1",
                            "--port", "8000", "--api-key", KEY], capture_output=True, text=True, timeout=60)
    assert "warning" not in keyed.stderr and keyed.returncode == 1


DIALOGPT = "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "user", "content": "Does money buy happiness?"},
                {"role": "assistant", "content": "Depends how much money you spend on it."},
                {"role": "user", "content": "What is the best way to buy happiness?"}]


@pytest.fixture(scope="module")
def chat_servers(tiny_checkpoint, tmp_path_factory):
    """One server with the checkpoint's own template (DialoGPT's turns, in tokenizer_config.json),
    one given ChatML by --chat-template."""
    import shutil

    own = tmp_path_factory.mktemp("dialogpt") / "ckpt"
    shutil.copytree(tiny_checkpoint, own)
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": DIALOGPT}))
    servers = {"dialogpt": Server(own), "chatml": Server(tiny_checkpoint, "--chat-template", CHATML)}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize(("template", "rendered"), [
    ("dialogpt", "".join(m["content"] + "<|endoftext|>" for m in CONVERSATION)),
    ("chatml", "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
     + "<|im_start|>assistant\n"),
])
def test_chat_through_the_openai_client_plain_and_streamed(chat_servers, tiny_model, template, rendered):
    server = chat_servers[template]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    expected = library(tiny_model, rendered, max_tokens=10, ignore_eos=True)
    assert expected.text
    result = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=2)
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and len(choice.logprobs.content) == 10
    tokens = choice.logprobs.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in tokens)
    assert result.usage.prompt_tokens == len(tiny_model[1].encode(rendered))
    chunks = list(client.chat.completions.create(
        model=NAME, messages=CONVERSATION, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    tokens = server.post("/tokenize", {"messages": CONVERSATION}).json()
    assert tokens["tokens"] == tiny_model[1].encode(rendered)


REQUIRES_SYSTEM = ("{% if messages[0].role != 'system' %}{{ raise_exception('a system message first') }}"
                   "{% endif %}")


def test_chat_template_switches_and_errors(chat_servers, server, tiny_model, tiny_checkpoint):
    chatml = chat_servers["chatml"]
    body = {"messages": [*CONVERSATION, {"role": "assistant", "content": "Buy a"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "add_generation_prompt": False,
            "continue_final_message": True}
    went_on = chatml.post("/v1/chat/completions", body).json()
    prefix = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    expected = library(tiny_model, prefix + "<|im_start|>assistant\nBuy a", max_tokens=4, ignore_eos=True)
    assert went_on["choices"][0]["message"]["content"] == expected.text
    vector = torch.randn(32, generator=torch.Generator().manual_seed(4)).tolist()
    steered = chatml.post("/v1/chat/completions", {**body, "steer": [
        {"hook": "blocks.1.hook_resid_pre", "vector": vector, "coefficient": 3.0}]}).json()
    expected = library(tiny_model, prefix + "<|im_start|>assistant\nBuy a", max_tokens=4, ignore_eos=True,
                       steer=(Steering("blocks.1.hook_resid_pre", vector, 3.0),))
    content = steered["choices"][0]["message"]["content"]
    assert content == expected.text != went_on["choices"][0]["message"]["content"]
    both = chatml.post("/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert both.status_code == 400 and "cannot both be true" in both.json()["error"]["message"]
    none = server.post("/v1/chat/completions", {"messages": CONVERSATION})  # a checkpoint without one
    assert none.status_code == 400 and "--chat-template" in none.json()["error"]["message"]
    failing = Server(tiny_checkpoint, "--chat-template", REQUIRES_SYSTEM)
    try:
        refused = failing.post("/v1/chat/completions", {"messages": CONVERSATION})
        assert refused.status_code == 400 and "a system message first" in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "messages"
        bad = failing.post("/v1/chat/completions", {"messages": [{"content": "no role"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    finally:
        failing.stop()


def test_a_broken_chat_template_stops_the_start_in_one_line(tiny_checkpoint):
    done = subprocess.run([GPT2_COMMAND, "serve", "--model", str(tiny_checkpoint), "--port", str(free_port()),
                           "--chat-template", "{% for m in messages %}{{ m.content }"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "chat template line 1" in done.stderr
