"""Every loading variant of Hugging Face checkpoints, the export round trip, and every error."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import TINY_CONFIGS, TINY_GPT2, assert_one_line_error, hf_model, run_gpt2
from gpt2engine import GPT2, GPT2EngineError
from gpt2engine.loading.weights import read_at, read_tensors

CONFIG = TINY_CONFIGS["odd-heads"]


@pytest.fixture(scope="module")
def reference():
    return hf_model(**CONFIG)


@pytest.fixture
def checkpoint(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    return tmp_path


def hf_tensors(reference, prefix=True, mask_buffers=False):
    """The reference's weights as a checkpoint dict, as old or unprefixed checkpoints hold them."""
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    if mask_buffers:
        for i in range(CONFIG["n_layer"]):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return state


def write_config(folder, **changes):
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", **CONFIG, **changes}))


def assert_same_logits(folder, reference):
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 30))
    with torch.inference_mode():
        assert (GPT2.from_pretrained(folder)(ids) - reference(ids).logits).abs().max() <= 1e-4


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_safetensors(checkpoint, reference):
    assert (checkpoint / "model.safetensors").is_file()
    assert_same_logits(checkpoint, reference)


@pytest.mark.parametrize("prefix", [True, False], ids=["transformer-prefix", "no-prefix"])
def test_pytorch_model_bin_with_mask_buffers(tmp_path, reference, prefix):
    torch.save(hf_tensors(reference, prefix, mask_buffers=True), tmp_path / "pytorch_model.bin")
    write_config(tmp_path)
    assert_same_logits(tmp_path, reference)


def test_safetensors_without_prefix(tmp_path, reference):
    save_file(hf_tensors(reference, prefix=False), tmp_path / "model.safetensors")
    write_config(tmp_path, n_ctx=CONFIG["n_positions"])
    assert_same_logits(tmp_path, reference)


def test_sharded_safetensors(tmp_path, reference):
    reference.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(tmp_path, reference)


def test_sharded_pytorch_model_bin(tmp_path, reference):
    state = hf_tensors(reference)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, tmp_path / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_config(tmp_path)
    assert_same_logits(tmp_path, reference)


def test_untied_lm_head(tmp_path):
    untied = hf_model(seed=3, tie_word_embeddings=False, **CONFIG)
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)
    untied.save_pretrained(tmp_path / "untied")
    model = GPT2.from_pretrained(tmp_path / "untied")
    assert model.lm_head.weight is not model.wte.weight
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 30))
    with torch.inference_mode():
        assert (model(ids) - untied(ids).logits).abs().max() <= 1e-4
    model.save_pretrained(tmp_path / "export")
    import transformers

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, untied(ids).logits)


def test_dtype_and_single_copy_of_weights(checkpoint):
    model = GPT2.from_pretrained(checkpoint, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()}
    # every parameter in its own buffer of exactly its size, the tied head sharing the embedding's
    assert sum(storages.values()) == model.config.parameter_count() * 2
    assert not any(p.is_meta for p in model.parameters())
    assert model.h[0].attn.c_attn.weight.shape == (3 * 42, 42)  # Linear layout after transpose


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_file_is_never_written_and_no_weight_shares_storage(checkpoint, dtype):
    before = (checkpoint / "model.safetensors").read_bytes()
    model = GPT2.from_pretrained(checkpoint, dtype=dtype)
    with torch.no_grad():  # writes to the weights stay in this process (copy-on-write)
        for tensor in model.state_dict().values():
            tensor.zero_()
    assert (checkpoint / "model.safetensors").read_bytes() == before
    fresh = GPT2.from_pretrained(checkpoint)
    assert fresh.wpe.weight.abs().sum() > 0  # a new mapping sees the file, not our writes
    assert fresh.h[0].attn.c_attn.weight.is_contiguous()  # transposed into Linear's layout
    storages = [p.untyped_storage().data_ptr() for p in fresh.parameters()]
    assert len(set(storages)) == len(storages)  # each its own (exports save them one by one)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_on_the_cpu_no_weight_is_a_view_of_the_file(checkpoint, dtype):
    """Every tensor is read from the file, none through its memory map (read_safetensors)."""
    model = GPT2.from_pretrained(checkpoint, dtype=dtype)
    maps = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith("model.safetensors")]
    ranges = [(int(low, 16), int(high, 16)) for low, high in maps]
    assert not [name for name, t in model.state_dict().items()
                if any(low <= t.data_ptr() < high for low, high in ranges)]


def test_save_round_trip_loads_in_transformers(tmp_path, checkpoint, reference):
    import transformers

    GPT2.from_pretrained(checkpoint).save_pretrained(tmp_path / "export")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 30))
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
    assert_same_logits(tmp_path / "export", reference)


def test_save_refuses_to_overwrite(checkpoint):
    before = snapshot(checkpoint)
    with pytest.raises(GPT2EngineError, match=r"config.json already exists; refusing to overwrite"):
        GPT2.from_pretrained(checkpoint).save_pretrained(checkpoint)
    assert snapshot(checkpoint) == before
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith(".")] == []


def test_wrong_shape_names_tensor_expected_and_actual(tmp_path, reference):
    state = hf_tensors(reference)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(42, 100)
    save_file(state, tmp_path / "model.safetensors")
    write_config(tmp_path)
    with pytest.raises(GPT2EngineError, match=r"transformer.h.1.mlp.c_fc.weight: expected shape "
                                              r"\(42, 168\), found \(42, 100\)"):
        GPT2.from_pretrained(tmp_path)


def test_checkpoint_for_another_config(checkpoint):
    write_config(checkpoint, n_layer=3)
    with pytest.raises(GPT2EngineError, match=r"missing tensor transformer.h.2.\S+ \(expected shape"):
        GPT2.from_pretrained(checkpoint)


def test_unexpected_tensor(tmp_path, reference):
    state = hf_tensors(reference) | {"transformer.h.0.attn.rotary": torch.zeros(3)}
    save_file(state, tmp_path / "model.safetensors")
    write_config(tmp_path)
    with pytest.raises(GPT2EngineError, match=r"unexpected tensor transformer.h.0.attn.rotary "
                                              r"of shape \(3,\)"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weight_file(tmp_path, checkpoint, reference, weights):
    torch.save(hf_tensors(reference), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    data = (checkpoint / "pytorch_model.bin").read_bytes()
    cut = len(data) // 3  # the first third, then zeros: the size is right, the content is not
    (checkpoint / weights).write_bytes(data[:cut] + bytes(len(data) - cut))
    with pytest.raises(GPT2EngineError, match=rf"{weights}: not a readable weight file"):
        GPT2.from_pretrained(checkpoint)


def test_truncated_safetensors(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(GPT2EngineError, match=r"model.safetensors: not a readable weight file "
                                              r"\(.* ends past the end of the file \(truncated\?\)\)"):
        GPT2.from_pretrained(checkpoint)


def test_pickled_code_is_refused(tmp_path, reference):
    padding = torch.zeros(60_000)  # big enough to pass the size check and reach the unpickler
    torch.save({"payload": shutil.rmtree, "pad": padding}, tmp_path / "pytorch_model.bin")
    write_config(tmp_path)
    with pytest.raises(GPT2EngineError, match="pytorch_model.bin: not a readable weight file"):
        GPT2.from_pretrained(tmp_path)


def test_missing_shard(tmp_path, reference):
    reference.save_pretrained(tmp_path, max_shard_size="30KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(GPT2EngineError, match=r"shard model-00001-of-\d+.safetensors is missing"):
        GPT2.from_pretrained(tmp_path)


def test_folder_without_weights_or_config(tmp_path):
    write_config(tmp_path)
    with pytest.raises(GPT2EngineError, match="no weights found"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(GPT2EngineError, match=r"config.json: no such file"):
        GPT2.from_pretrained(tmp_path)


def test_missing_folder_and_file_instead_of_folder(tmp_path, checkpoint):
    with pytest.raises(GPT2EngineError, match="no such folder"):
        GPT2.from_pretrained(tmp_path / "nowhere" / "model")
    with pytest.raises(GPT2EngineError, match="is a file, but not a nanoGPT .* pass its folder"):
        GPT2.from_pretrained(checkpoint / "model.safetensors")


def test_read_at_reads_the_file_and_keeps_dtype_and_shape(tmp_path):
    from gpt2engine.loading.weights import read_safetensors

    tensors = {"half": torch.randn(3, 5).to(torch.bfloat16), "none": torch.empty(0, 4, dtype=torch.int32)}
    save_file(tensors, tmp_path / "t.safetensors")
    for key, view, where in read_safetensors(tmp_path / "t.safetensors"):
        copy = read_at(where, view)
        assert copy.dtype == tensors[key].dtype and copy.shape == tensors[key].shape
        assert torch.equal(copy, tensors[key])


@pytest.mark.slow
@pytest.mark.parametrize("huge", [{"n_layer": 1024}, {"n_embd": 65536, "n_head": 4}, {"n_positions": 131072}])
def test_a_tiny_config_asking_for_a_huge_model(copy_of, huge):
    done = run_gpt2("generate", "Hi", "--model", str(copy_of(**huge)), "--quiet")
    assert_one_line_error(done, 1, "does not fit")  # the files' size, or a tensor's shape


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
    done = run_gpt2("generate", "Hi", "--model", str(folder), "--quiet", "--dtype", dtype)
    assert_one_line_error(done, 1, f"{key} holds NaN or infinite values")


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_model_is_refused(make_checkpoint):
    small = make_checkpoint(**{**TINY_GPT2, "vocab_size": 50000})
    done = run_gpt2("generate", "Hi", "--model", str(small), "--quiet")
    assert_one_line_error(done, 1, "the tokenizer has 50257 tokens but the model only 50000")


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_and_a_retry_works(tiny_model, tmp_path, tiny_checkpoint):
    model, _ = tiny_model
    out = tmp_path / "out"
    not_a_file = tmp_path / "merges.txt"
    not_a_file.mkdir()  # copying it fails after the weights are written
    with pytest.raises(GPT2EngineError, match="cannot write the checkpoint"):
        model.save_pretrained(out, extra_files=(tiny_checkpoint / "vocab.json", not_a_file))
    assert list(out.iterdir()) == []
    done = run_gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "vocab.json"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["config.json", "vocab.json"])
def test_export_never_writes_through_a_dangling_link(tiny_checkpoint, tmp_path, target):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / target).symlink_to(outside / "stolen")
    done = run_gpt2("export", str(out), "--model", str(tiny_checkpoint))
    assert_one_line_error(done, 1, "already exists; refusing to overwrite it")
    assert list(outside.iterdir()) == [] and [p.name for p in out.iterdir()] == [target]


@pytest.mark.slow
def test_an_old_format_pytorch_model_bin_loads(copy_of, tiny_model):
    from safetensors.torch import load_file

    folder = copy_of()
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (folder / "model.safetensors").unlink()
    model, _ = tiny_model
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(GPT2.from_pretrained(folder)(ids), model(ids))


@pytest.mark.slow
def test_a_nested_state_dict_loads_and_non_tensors_are_refused(copy_of, tiny_model):
    from safetensors.torch import load_file

    folder = copy_of()
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({"state_dict": tensors, "epoch": 3}, folder / "pytorch_model.bin")
    model, _ = tiny_model
    with torch.inference_mode():
        assert torch.equal(GPT2.from_pretrained(folder)(torch.tensor([[5]])), model(torch.tensor([[5]])))
    for bad in ({**tensors, "transformer.extra": [1.0, 2.0]}, [tensors]):
        torch.save(bad, folder / "pytorch_model.bin")
        done = run_gpt2("generate", "Hi", "--model", str(folder), "--quiet")
        assert_one_line_error(done, 1, "pytorch_model.bin: not a readable weight file")


@pytest.mark.slow
def test_a_shard_index_naming_a_file_outside_the_folder(copy_of, tmp_path):
    folder = copy_of()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    for name in ("../secret.safetensors", "/etc/passwd", "sub/model.safetensors"):
        index = {"weight_map": {"transformer.wte.weight": name}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        done = run_gpt2("generate", "Hi", "--model", str(folder), "--quiet")
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


def test_from_pretrained_takes_dtype_names(tiny_checkpoint):
    assert GPT2.from_pretrained(tiny_checkpoint, dtype="bfloat16").wte.weight.dtype == torch.bfloat16
    assert GPT2.from_pretrained(tiny_checkpoint, dtype="float32").wte.weight.dtype == torch.float32


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
