"""GGUF export read back with the gguf package's own reader: metadata, vocabulary, every tensor."""

import json
import subprocess

import gguf
import numpy as np
import pytest

from conftest import GPT2_COMMAND, TINY_CONFIGS
from gpt2engine import GPT2, GPT2EngineError
from gpt2engine.gguf_export import export_gguf, gguf_name

pytestmark = pytest.mark.slow



def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("weight_type", ["f32", "q8_0", "f16"])
def test_export_reads_back(tiny_checkpoint, tiny_model, tmp_path, weight_type):
    model, tokenizer = tiny_model
    out = tmp_path / "model.gguf"
    done = subprocess.run([GPT2_COMMAND, "export", str(out), "--model", str(tiny_checkpoint),
                           "--format", "gguf", "--gguf-type", weight_type], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(out)
    c = model.config
    assert field(reader, "general.architecture") == "gpt2"
    assert [field(reader, f"gpt2.{k}") for k in ("context_length", "embedding_length", "block_count",
                                                  "feed_forward_length", "attention.head_count")] == [
        c.n_positions, c.n_embd, c.n_layer, c.mlp_width, c.n_head]
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[tokenizer.encode(" world")[0]] == "Ġworld"
    assert field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.merges")[0] == "Ġ t"
    stored = {t.name: t for t in reader.tensors}
    ours = model.state_dict()
    assert set(stored) == {gguf_name(name) for name in ours}
    for name, tensor in ours.items():
        t = stored[gguf_name(name)]
        expected = tensor.float().numpy()
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            data = np.asarray(t.data).reshape(expected.shape)
            assert np.array_equal(data, expected), name
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
            tolerance = np.abs(expected).max() / (127 if weight_type == "q8_0" else 1000)
            assert np.abs(data - expected).max() <= tolerance, name
            assert tensor.ndim == 2  # only matrices are quantized


def test_export_refuses_what_llama_cpp_cannot_run_and_never_overwrites(make_checkpoint, tiny_model, tmp_path):
    _, tokenizer = tiny_model
    scaled = GPT2.from_pretrained(make_checkpoint(**{**TINY_CONFIGS["scaled-by-layer"], "vocab_size": 50257}))
    with pytest.raises(GPT2EngineError, match="scale_attn_by_inverse_layer_idx"):
        export_gguf(scaled, tokenizer, tmp_path / "a.gguf")
    small_vocab = GPT2.from_pretrained(make_checkpoint(**TINY_CONFIGS["odd-heads"]))
    with pytest.raises(GPT2EngineError, match="tokenizer has 50257 tokens and the model only 97"):
        export_gguf(small_vocab, tokenizer, tmp_path / "b.gguf")
    existing = tmp_path / "c.gguf"
    existing.write_bytes(b"keep me")
    model, _ = tiny_model
    with pytest.raises(GPT2EngineError, match="refusing to overwrite"):
        export_gguf(model, tokenizer, existing)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]  # no half files left behind


def test_tokenizer_round_trip_through_gguf_vocabulary(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    assert export_gguf(model, tokenizer, tmp_path / "m.gguf") == []  # nothing approximate
    tokens = field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.tokens")
    vocab = json.loads((tokenizer.folder / "vocab.json").read_text(encoding="utf-8"))
    assert tokens == sorted(vocab, key=vocab.get)
