"""`gpt2 activations` (activation_dataset.py): the shards hold the model's activations of every row
of the corpus, an interrupted run resumes to the same files, and no output is ever overwritten."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TEMPEST, assert_one_line_error, run_gpt2
from gpt2engine import GPT2EngineError
from gpt2engine.activation_dataset import MANIFEST, read_documents, read_shard, token_rows, write_activations

HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
DOCUMENTS = [TEMPEST.read_text()[:3000], TEMPEST.read_text()[5000:7000]]


def write(tiny_model, out, **overrides):
    model, tokenizer = tiny_model
    options = dict(context=32, model_name="tiny", input_sha256="0" * 64, batch_size=3, shard_mib=0.05)
    return write_activations(model, tokenizer, overrides.pop("documents", DOCUMENTS),
                             overrides.pop("hooks", HOOKS), out, **(options | overrides))


def test_the_shards_hold_the_models_activations_of_every_row(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    manifest = write(tiny_model, tmp_path / "out")
    rows = token_rows(tokenizer, DOCUMENTS, 32, prepend_eot=True)
    stream = [*tokenizer.encode(DOCUMENTS[0]), tokenizer.eot_id, *tokenizer.encode(DOCUMENTS[1])]
    assert torch.equal(rows[:, 1:].flatten(), torch.tensor(stream[: rows.shape[0] * 31]))
    assert (rows[:, 0] == tokenizer.eot_id).all()
    assert manifest["complete"] and len(manifest["shards"]) > 2 and manifest["tokens"] == rows.numel()
    assert manifest["hooks"] == {HOOKS[0]: [32], HOOKS[1]: [4, 8], HOOKS[2]: [128]}
    shards = [read_shard(tmp_path / "out" / s["file"]) for s in manifest["shards"]]
    _, expected = model.run_with_cache(rows, HOOKS)
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]), rows.to(torch.int32))
    for name in HOOKS:  # batches of 3 rows against all rows in one: products of other lengths
        assert (torch.cat([s[name] for s in shards]) - expected[name]).abs().max() < 1e-5, name
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == manifest


def test_an_interrupted_run_resumes_to_the_same_files(tiny_model, tmp_path, monkeypatch):
    from gpt2engine import activation_dataset

    whole = write(tiny_model, tmp_path / "whole")
    save, saved = activation_dataset.save_shard, []

    def interrupted(out, index, values, token_ids):
        if index == 2:
            raise KeyboardInterrupt
        saved.append(index)
        save(out, index, values, token_ids)

    monkeypatch.setattr(activation_dataset, "save_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(tiny_model, tmp_path / "resumed")
    assert saved == [0, 1] and not json.loads((tmp_path / "resumed" / MANIFEST).read_text())["complete"]
    monkeypatch.setattr(activation_dataset, "save_shard", save)
    resumed = write(tiny_model, tmp_path / "resumed")
    assert resumed == whole
    for shard in whole["shards"]:
        theirs = read_shard(tmp_path / "whole" / shard["file"])
        ours = read_shard(tmp_path / "resumed" / shard["file"])
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_no_output_is_ever_overwritten(tiny_model, tmp_path):
    done = tmp_path / "done"
    write(tiny_model, done)
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(GPT2EngineError, match="already holds this complete dataset; nothing was written"):
        write(tiny_model, done)
    with pytest.raises(GPT2EngineError, match=r"other settings \(hooks, shard_rows differ\)"):
        write(tiny_model, done, hooks=HOOKS[:1])
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    (foreign := tmp_path / "foreign").mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GPT2EngineError, match="exists and is not an activation dataset"):
        write(tiny_model, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(hooks=["blocks.0.attn.hook_pattern"]), "per pair of positions, not per token"),
    (dict(hooks=["blocks.7.hook_resid_pre"]), "layer 7 is out of range"),
    (dict(hooks=[]), "name at least one hook point"),
    (dict(context=129), "--context must be in [2, 128]"),
    (dict(documents=["short"]), "fewer than one row of 31"),
    (dict(format="parquet"), "format must be one of safetensors, saelens"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny_model, tmp_path, overrides, message):
    with pytest.raises(GPT2EngineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write(tiny_model, tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


def test_saelens_format_is_the_dataset_its_activation_store_reads(tiny_model, tmp_path):
    datasets = pytest.importorskip("datasets")  # a test dependency (lm-eval's), not the engine's
    manifest = write(tiny_model, tmp_path / "out", format="saelens")
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "saelens"))
    # what SAELens' ActivationsStore.load_cached_activation_dataset checks of it
    assert dataset.features[HOOKS[1]].shape == (32, 32) and dataset.features[HOOKS[0]].shape == (32, 32)
    assert len(dataset) == manifest["rows"]
    dataset.set_format(type="torch", columns=[HOOKS[1], "token_ids"])
    first = read_shard(tmp_path / "out" / manifest["shards"][0]["file"])
    assert torch.equal(dataset[0][HOOKS[1]], first[HOOKS[1]][0].reshape(32, 32))
    assert torch.equal(dataset[0]["token_ids"].to(torch.int32), first["token_ids"][0])


def test_documents_from_json_lines_and_their_errors(tmp_path):
    lines = tmp_path / "corpus.jsonl"
    lines.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_documents(lines) == ["one", "two"]
    lines.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(GPT2EngineError, match="corpus.jsonl:2: field 'text' missing or not str"):
        read_documents(lines)
    lines.write_text('{"text": "one"\n')
    with pytest.raises(GPT2EngineError, match="corpus.jsonl:1: not valid JSON"):
        read_documents(lines)


@pytest.mark.slow
def test_the_command_writes_a_dataset_and_says_mistakes_in_one_line(tiny_checkpoint, tiny_model, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    args = ["activations", "--model", str(tiny_checkpoint), "--hooks", ",".join(HOOKS),
            "--input", str(corpus), "--context", "32", "--out", str(tmp_path / "out")]
    done = run_gpt2(*args)
    assert done.returncode == 0, done.stderr
    assert "tokens/s" in done.stderr and "wrote" in done.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    model, tokenizer = tiny_model
    rows = token_rows(tokenizer, DOCUMENTS, 32, prepend_eot=True)
    shard = read_shard(tmp_path / "out" / manifest["shards"][0]["file"])
    _, expected = model.run_with_cache(rows[: len(shard["token_ids"])], HOOKS[:1])
    assert (shard[HOOKS[0]] - expected[HOOKS[0]]).abs().max() < 1e-5
    assert_one_line_error(run_gpt2(*args), 1, "already holds this complete dataset")
    assert_one_line_error(run_gpt2(*args[:-1], str(tmp_path / "new"), "--hooks", "blocks.0.hook_q"), 1,
                          "is not a hook point")
    assert_one_line_error(run_gpt2(*args[:5], "--input", str(tmp_path / "none.txt"), *args[7:]), 1,
                          "none.txt: no such file")
