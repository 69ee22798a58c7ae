"""loading/training.py: nanoGPT's ckpt.pt and llm.c's .bin, built here from their documented
layouts out of a random transformers model, give transformers' logits; the bundled GPT-2
tokenizer serves them offline; hostile files are refused in one line."""

import json
import re
import struct

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, hf_model, run_gpt2
from gpt2engine import GPT2, GPT2EngineError, Tokenizer
from gpt2engine.tokenizer import GPT2_VOCABULARY

CONFIG = dict(n_embd=48, n_layer=2, n_head=3, n_positions=64, vocab_size=50257)
PADDED = 50304  # nanoGPT's and llm.c's vocabulary, padded to a multiple of 64 / 128
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLMC_ORDER = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]
IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])


def linear_state(reference) -> dict[str, torch.Tensor]:
    """transformers' state dict as nanoGPT and llm.c keep it: nn.Linear (out, in) matrices."""
    return {
        key: value.t().contiguous() if key.endswith(CONV1D) else value.clone()
        for key, value in reference.state_dict().items()
        if not key.endswith((".attn.bias", "masked_bias"))
    }


def padded(wte: torch.Tensor) -> torch.Tensor:
    return F.pad(wte, (0, 0, 0, PADDED - wte.shape[0]))


def write_nanogpt(path, reference, bias: bool = True, compiled: bool = True) -> None:
    """train.py's checkpoint: model_args, the model's state dict (torch.compile's prefix), optimizer."""
    state = linear_state(reference)
    state["transformer.wte.weight"] = padded(state["transformer.wte.weight"])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    if not bias:
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    prefix = "_orig_mod." if compiled else ""
    c = reference.config
    torch.save(
        {
            "model": {prefix + k: v for k, v in state.items()},
            "model_args": {
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_embd": c.n_embd,
                "block_size": c.n_positions,
                "bias": bias,
                "vocab_size": PADDED,
                "dropout": 0.0,
            },
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 6e-4}]},
            "iter_num": 5000,
            "best_val_loss": torch.tensor(2.85),
            "config": {"dataset": "openwebtext"},
        },
        path,
    )


def write_llmc(path, reference, dtype: str = "float32", lie: dict | None = None) -> None:
    """train_gpt2.py's write_model: a header of 256 int32s, then every tensor, layers stacked."""
    c, state = reference.config, linear_state(reference)
    header = [
        20240326,
        {"float32": 3, "bfloat16": 5}[dtype],
        c.n_positions,
        c.vocab_size,
        c.n_layer,
        c.n_head,
        c.n_embd,
        PADDED,
    ] + [0] * 248
    for index, value in (lie or {}).items():
        header[index] = value
    tensors = [padded(state["transformer.wte.weight"]), state["transformer.wpe.weight"]]
    tensors += [
        torch.stack([state[f"transformer.h.{i}.{name}"] for i in range(c.n_layer)]) for name in LLMC_ORDER
    ]
    tensors += [state["transformer.ln_f.weight"], state["transformer.ln_f.bias"]]
    with open(path, "wb") as file:
        file.write(struct.pack("<256i", *header))
        for tensor in tensors:
            as_type = tensor.to(getattr(torch, dtype)).contiguous()
            file.write(as_type.view(torch.int16 if dtype == "bfloat16" else torch.int32).numpy().tobytes())


@pytest.fixture(scope="module")
def reference():
    return hf_model(**CONFIG, activation_function="gelu_new")


@pytest.fixture(scope="module")
def exact_gelu_reference():
    return hf_model(**CONFIG, activation_function="gelu")  # nanoGPT's MLP: nn.GELU(), exact


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)[..., : CONFIG["vocab_size"]]


@pytest.mark.parametrize(("bias", "compiled"), [(True, True), (False, False)])
def test_a_nanogpt_checkpoint_gives_transformers_logits(tmp_path, exact_gelu_reference, bias, compiled):
    reference = exact_gelu_reference
    if not bias:  # a bias=False model: transformers' with every bias zero
        reference = hf_model(**CONFIG, activation_function="gelu")
        with torch.no_grad():
            for name, parameter in reference.named_parameters():
                if name.endswith(".bias"):
                    parameter.zero_()
    write_nanogpt(tmp_path / "ckpt.pt", reference, bias=bias, compiled=compiled)
    ours = GPT2.from_pretrained(tmp_path / "ckpt.pt")
    assert ours.config.vocab_size == PADDED and ours.config.activation_function == "gelu"
    with torch.inference_mode():
        assert (logits(ours) - reference(IDS).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_llmc_checkpoint_gives_transformers_logits(tmp_path, reference, dtype):
    write_llmc(tmp_path / "gpt2_bf16.bin", reference, dtype)
    expected = reference
    if dtype == "bfloat16":  # the reference with the file's rounding
        expected = hf_model(**CONFIG, activation_function="gelu_new")
        with torch.no_grad():
            for parameter in expected.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).float())
    ours = GPT2.from_pretrained(tmp_path / "gpt2_bf16.bin")
    assert ours.config.vocab_size == PADDED and ours.config.n_positions == CONFIG["n_positions"]
    with torch.inference_mode():
        assert (logits(ours) - expected(IDS).logits).abs().max() <= 1e-4
    assert GPT2.from_pretrained(tmp_path / "gpt2_bf16.bin", dtype="int8").config == ours.config


@pytest.mark.slow
def test_the_command_runs_them_offline_with_gpt2s_tokenizer_and_exports_them(
    tmp_path, reference, monkeypatch
):
    write_llmc(tmp_path / "gpt2_124M.bin", reference)
    done = run_gpt2(
        "generate",
        "The quick brown fox",
        "--model",
        str(tmp_path / "gpt2_124M.bin"),
        "--quiet",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_pretrained(GPT2_VOCABULARY)
    from gpt2engine.generate import GenerationOptions, complete
    from gpt2engine.sampling_params import SamplingParams

    options = GenerationOptions(max_new_tokens=8, sampling=SamplingParams(temperature=0), ignore_eos=True)
    model = GPT2.from_pretrained(tmp_path / "gpt2_124M.bin")
    assert (
        json.loads(done.stdout)["text"]
        == complete(model, tokenizer, ["The quick brown fox"], options)[0].text
    )
    out = tmp_path / "hf"
    done = run_gpt2("export", str(out), "--model", str(tmp_path / "gpt2_124M.bin"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "vocab.json",
    ]
    from conftest import quiet_transformers

    exported = quiet_transformers().GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.inference_mode():
        assert (exported(IDS).logits[..., : CONFIG["vocab_size"]] - reference(IDS).logits).abs().max() <= 1e-4
    gguf = run_gpt2(
        "export", str(tmp_path / "m.gguf"), "--model", str(tmp_path / "gpt2_124M.bin"), "--format", "gguf"
    )
    assert gguf.returncode == 0, gguf.stderr
    import gguf as gguf_package

    [embedding] = [
        t for t in gguf_package.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "token_embd.weight"
    ]
    assert embedding.n_elements == CONFIG["vocab_size"] * CONFIG["n_embd"]  # the padding left out
    write_nanogpt(tmp_path / "ckpt.pt", reference)  # nanoGPT's exact GELU: exported, and said
    nanogpt = run_gpt2(
        "export", str(tmp_path / "n.gguf"), "--model", str(tmp_path / "ckpt.pt"), "--format", "gguf"
    )
    assert (
        nanogpt.returncode == 0
        and "warning: llama.cpp's gpt2 computes GELU's tanh approximation" in nanogpt.stderr
    )


def test_a_tokenizer_from_elsewhere(tmp_path, reference, tiny_checkpoint):
    from gpt2engine.loading.runtime import load_pretrained

    write_nanogpt(tmp_path / "ckpt.pt", reference)
    _, bundled = load_pretrained(str(tmp_path / "ckpt.pt"))
    _, chosen = load_pretrained(str(tmp_path / "ckpt.pt"), tokenizer=str(tiny_checkpoint))
    assert bundled.folder == GPT2_VOCABULARY and chosen.folder == tiny_checkpoint
    assert bundled.encode("Hello world") == chosen.encode("Hello world") == [15496, 995]


class RunsCode:
    """Pickled into a checkpoint: unpickling it would call print (weights_only never does)."""

    def __reduce__(self):
        return (print, ("this ran",))


HOSTILE_LLMC = [
    ({3: 50257, 7: 50000}, "padded vocabulary 50000 is below 50257"),
    ({1: 4}, "llm.c checkpoint version 4 is not one we read"),
    ({4: 3}, "the llm.c header describes"),  # one layer more than the file holds
    ({6: 50}, "n_embd (50) must be divisible by n_head (3)"),
    ({4: 10**6}, "n_layer must be an integer in"),
]


@pytest.mark.parametrize(("lie", "message"), HOSTILE_LLMC)
def test_an_llmc_header_that_lies_is_refused_before_allocating(tmp_path, reference, lie, message):
    write_llmc(tmp_path / "model.bin", reference, lie=lie)
    with pytest.raises(GPT2EngineError, match=re.escape(message)):
        GPT2.from_pretrained(tmp_path / "model.bin")


def test_truncated_and_hostile_files_are_one_line(tmp_path, reference):
    write_llmc(tmp_path / "model.bin", reference)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-10])
    (tmp_path / "header.bin").write_bytes(data[:500])
    write_nanogpt(tmp_path / "ckpt.pt", reference)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes()[:5000])
    torch.save({"model_args": {"n_layer": 1}, "model": {"x": RunsCode()}}, tmp_path / "code.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cases = [
        ("short.bin", "describes"),
        ("header.bin", "an llm.c header is 1024 bytes"),
        ("cut.pt", "is a file, but not a nanoGPT"),
        ("code.pt", "not a readable nanoGPT checkpoint"),
        ("other.pt", "not a nanoGPT checkpoint (no 'model_args' and 'model')"),
        ("notes.txt", "is a file, but not a nanoGPT"),
    ]
    for name, message in cases:
        with pytest.raises(GPT2EngineError, match=re.escape(message)):
            GPT2.from_pretrained(tmp_path / name)


@pytest.mark.slow
def test_a_hostile_checkpoint_through_the_command_is_one_line(tmp_path, reference):
    write_llmc(tmp_path / "model.bin", reference, lie={4: 3})
    done = run_gpt2("generate", "Hi", "--model", str(tmp_path / "model.bin"), "--quiet")
    assert_one_line_error(done, 1, "the llm.c header describes")
