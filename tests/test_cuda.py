"""The GPU path, on a machine with CUDA (benchmarks/gpu.sh runs these on one; elsewhere they are
skipped, saying so): float32 logits against transformers, the CUDA graphs' greedy tokens equal
to the eager step's, batch invariance, the server's concurrent clients, and the CLI."""

import subprocess

import openai
import pytest
import test_server
import torch
from test_engine import MIXED
from test_graphs import PROMPTS, staggered

from conftest import GPT2_124M, hf_model
from gpt2engine import GPT2, Tokenizer
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.generate import complete
from gpt2engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def long_context(make_checkpoint):
    return make_checkpoint(n_embd=64, n_layer=3, n_head=4, n_positions=300, vocab_size=50257)


@pytest.mark.parametrize("config", [dict(n_embd=42, n_layer=2, n_head=3, n_positions=64, vocab_size=97),
                                    GPT2_124M], ids=["odd-heads", "124M"])
def test_float32_logits_match_transformers(make_checkpoint, config):
    folder = make_checkpoint(initializer_range=0.02, **config)
    ours = GPT2.from_pretrained(folder, device="cuda")
    reference = hf_model(initializer_range=0.02, **config).cuda()
    ids = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        expected = reference(ids).logits
        assert (ours(ids) - expected).abs().max() < 1e-4
        cache = ours.make_cache(2, 40)  # prefill 30 tokens, then one token at a time
        steps = [ours(ids[:, :30], None, cache, 30)]
        for t in range(30, 40):
            steps.append(ours(ids[:, t : t + 1], torch.full((2, 1), t, device="cuda"), cache, t + 1))
        assert (torch.cat(steps, dim=1) - expected).abs().max() < 1e-4


@pytest.mark.parametrize(("dtype", "settings"), [("float32", MIXED), ("float16", [GREEDY] * len(MIXED)),
                                                ("bfloat16", [GREEDY] * len(MIXED))])
def test_cuda_graphs_give_the_eager_steps_tokens(long_context, dtype, settings):
    """Each request its own settings in float32; greedy in the half formats, where the graphs'
    padded rows and slots round differently (a sampled draw could tip, an argmax does not)."""
    model = GPT2.from_pretrained(long_context, device="cuda", dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(long_context)
    graphed = Engine(model, tokenizer, max_batch=5, prefill_chunk=64)
    eager = Engine(model, tokenizer, max_batch=5, prefill_chunk=64, cuda_graphs=False)
    assert graphed.runner.graphed is not None and eager.runner.graphed is None
    assert staggered(graphed, settings) == staggered(eager, settings)


def test_batch_invariance_and_the_cpus_tokens(long_context):
    """float32 on CUDA: each staggered request gets its solo output, and the CPU's greedy tokens."""
    tokenizer = Tokenizer.from_pretrained(long_context)
    model = GPT2.from_pretrained(long_context, device="cuda")
    options = [GenerationOptions(max_new_tokens=12 + 3 * i, sampling=GREEDY, ignore_eos=True)
               for i in range(len(PROMPTS))]
    core = Engine(model, tokenizer, max_batch=3, prefill_chunk=64)
    requests = [core.add_request(p, o) for p, o in zip(PROMPTS, options, strict=True)]
    list(core.run(requests))
    alone = [complete(model, tokenizer, [p], o)[0].token_ids for p, o in zip(PROMPTS, options, strict=True)]
    cpu = GPT2.from_pretrained(long_context)
    on_cpu = [complete(cpu, tokenizer, [p], o)[0].token_ids for p, o in zip(PROMPTS, options, strict=True)]
    assert [r.output_ids for r in requests] == alone == on_cpu


def test_a_failed_capture_falls_back_to_eager_with_a_warning(long_context, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused\nsecond line")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)
    model = GPT2.from_pretrained(long_context, device="cuda")
    core = Engine(model, Tokenizer.from_pretrained(long_context))
    assert core.runner.graphed is None
    assert capsys.readouterr().err == "warning: CUDA graphs unavailable, decoding eagerly (capture refused)\n"
    [request] = [core.add_request("Hello", GenerationOptions(max_new_tokens=5, sampling=GREEDY))]
    list(core.run([request]))
    assert len(request.output_ids) == 5


def test_sixteen_clients_on_cuda(tiny_checkpoint, tiny_model):
    server = test_server.Server(tiny_checkpoint, "--device", "cuda", "--dtype", "float32", "--max-batch", "4")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        test_server.test_sixteen_staggered_clients_each_get_their_solo_output(server, client, tiny_model)
    finally:
        code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err


def test_the_repl_on_cuda(tiny_checkpoint, tiny_model):
    model, tokenizer = tiny_model
    expected = complete(model, tokenizer, ["Hello there"],
                        GenerationOptions(max_new_tokens=6, sampling=GREEDY))[0].text
    done = subprocess.run([test_server.GPT2_COMMAND, "--model", str(tiny_checkpoint), "--device", "cuda",
                           "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6"],
                          input="Hello there\nexit\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "GPT-2 Inference Engine Ready" in done.stdout and expected in done.stdout


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_prefix_cache_on_cuda_gives_the_same_bits(tiny_checkpoint, tiny_model, dtype):
    import test_prefix_cache as prefix

    model = GPT2.from_pretrained(tiny_checkpoint, device="cuda", dtype=dtype)
    work = [(2 * i, prefix.SHARED + prefix.ENDINGS[i % 5], prefix.options(i)) for i in range(6)]
    cached, plain = prefix.engines((model, tiny_model[1]), 64)
    with_cache = prefix.run(cached, work)
    assert [prefix.outcome(r) for r in with_cache] == [prefix.outcome(r) for r in prefix.run(plain, work)]
    assert sum(r.cached_tokens for r in with_cache) > 0


def test_hooked_requests_beside_graphed_ones(long_context):
    """Under CUDA graphs a capturing and steering request runs eagerly in its row: its activations
    are the model's, and the graphed requests beside it get the tokens they get without it."""
    from gpt2engine import Steering

    tokenizer = Tokenizer.from_pretrained(long_context)
    model = GPT2.from_pretrained(long_context, device="cuda")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3)).tolist()
    hooked = GenerationOptions(max_new_tokens=10, sampling=GREEDY, ignore_eos=True,
                               capture=("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"),
                               steer=(Steering("blocks.2.hook_resid_pre", vector, 2.0),))
    plain = [GenerationOptions(max_new_tokens=12, sampling=GREEDY, ignore_eos=True)] * 2

    def run(with_hooked: bool):
        engine = Engine(model, tokenizer, max_batch=3, prefill_chunk=64)
        assert engine.runner.graphed is not None
        requests = [engine.add_request(p, o) for p, o in zip(PROMPTS[:2], plain, strict=True)]
        extra = [engine.add_request(PROMPTS[2], hooked)] if with_hooked else []
        list(engine.run(requests + extra))
        return [r.output_ids for r in requests], extra

    beside, [request] = run(True)
    assert beside == run(False)[0]
    result = request.result()
    steered = GPT2.from_pretrained(long_context)  # the CPU's steered tokens: the same
    [on_cpu] = complete(steered, tokenizer, [PROMPTS[2]], hooked)
    assert result.token_ids == on_cpu.token_ids
    for name, values in result.activations.items():
        assert (values - on_cpu.activations[name]).abs().max() < 1e-4, name


def test_speculation_beside_cuda_graphs(long_context):
    """On CUDA a request with proposals feeds them in one eager forward of its row while the others
    replay the graphs: greedy tokens as without speculation."""
    tokenizer = Tokenizer.from_pretrained(long_context)
    model = GPT2.from_pretrained(long_context, device="cuda")
    options = [GenerationOptions(max_new_tokens=20, sampling=GREEDY, ignore_eos=True)] * 3
    prompts = [p + p for p in PROMPTS[:3]]  # repeated, so that prompt lookup finds matches

    def run(speculative):
        engine = Engine(model, tokenizer, max_batch=3, prefill_chunk=64, speculative=speculative)
        requests = [engine.add_request(p, o) for p, o in zip(prompts, options, strict=True)]
        list(engine.run(requests))
        return [r.output_ids for r in requests], engine

    (speculated, engine), (plain, _) = run("ngram"), run(None)
    assert engine.runner.graphed is not None and engine.speculation.stats.proposed > 0
    assert speculated == plain
