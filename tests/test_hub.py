"""The Hub path: huggingface_hub's cache layout, HF_HOME, HF_HUB_OFFLINE and the errors.

huggingface_hub reads its environment at import, so each case runs in a child process.
The Hub itself is unreachable here: a cache is laid out by hand, exactly as huggingface_hub
writes it, and an endpoint on a closed local port stands in for a Hub that cannot be reached.
"""

import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub.utils import filter_repo_objects

from gpt2engine.loading.hub import CONFIG_AND_TOKENIZER, PYTORCH_WEIGHTS, SAFETENSORS_WEIGHTS

pytestmark = pytest.mark.slow  # each test loads in a child process

COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
LOAD = """
import sys, torch
from gpt2engine import GPT2, GPT2EngineError, Tokenizer
try:
    model = GPT2.from_pretrained(sys.argv[1])
    tokenizer = Tokenizer.from_pretrained(sys.argv[1])
except GPT2EngineError as error:
    sys.exit(f"error: {error}")
print(float(model(torch.tensor([tokenizer.encode("Hello world")])).sum()))
"""
# The files of the real openai-community/gpt2 repository.
GPT2_REPO_FILES = [
    ".gitattributes", "64-8bits.tflite", "64-fp16.tflite", "64.tflite", "README.md",
    "config.json", "flax_model.msgpack", "generation_config.json", "merges.txt",
    "model.safetensors", "onnx/config.json", "onnx/decoder_model.onnx",
    "onnx/decoder_model_merged.onnx", "onnx/decoder_with_past_model.onnx",
    "onnx/generation_config.json", "onnx/merges.txt", "onnx/special_tokens_map.json",
    "onnx/tokenizer.json", "onnx/tokenizer_config.json", "onnx/vocab.json",
    "pytorch_model.bin", "rust_model.ot", "tf_model.h5", "tokenizer.json",
    "tokenizer_config.json", "vocab.json",
]


def cache_repo(hf_home, repo_id, checkpoint, skip=()):
    """Lay `checkpoint` out in the Hub cache under HF_HOME, as snapshot_download leaves it."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.name not in skip:
            shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def load(name, hf_home, **env):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", **env}
    env = {k: v for k, v in env.items() if v is not None}  # None unsets a variable
    return subprocess.run([sys.executable, "-c", LOAD, name], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def hf_home(tmp_path):
    return tmp_path / "hf_home"


def test_offline_loads_from_the_hub_cache(tiny_checkpoint, hf_home):
    cache_repo(hf_home, "openai-community/gpt2", tiny_checkpoint)
    from_cache = load("openai-community/gpt2", hf_home, HF_HUB_OFFLINE="1")
    from_folder = load(str(tiny_checkpoint), hf_home)
    assert from_cache.returncode == 0, from_cache.stderr
    assert from_cache.stdout == from_folder.stdout


def test_unreachable_hub_falls_back_to_the_cache(tiny_checkpoint, hf_home):
    cache_repo(hf_home, "gpt2", tiny_checkpoint)
    result = load("gpt2", hf_home, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr


def test_pytorch_bin_only_repo_loads_offline(tiny_checkpoint, hf_home, tmp_path):
    import torch
    from safetensors.torch import load_file

    bin_checkpoint = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint, bin_checkpoint)
    state = load_file(bin_checkpoint / "model.safetensors")
    torch.save(state, bin_checkpoint / "pytorch_model.bin")
    cache_repo(hf_home, "someone/gpt2-finetune", bin_checkpoint, skip={"model.safetensors"})
    result = load("someone/gpt2-finetune", hf_home, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr


def test_offline_and_not_cached_says_so_in_one_line(hf_home):
    result = load("gpt2-medium", hf_home, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "gpt2-medium is not a local folder and is not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "pass the path of a checkpoint folder" in result.stderr


def test_unreachable_hub_and_not_cached(hf_home):
    result = load("gpt2", hf_home, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 1
    assert "the Hub is unreachable" in result.stderr
    assert result.stderr.count("\n") == 1


def test_only_the_files_we_read_are_fetched():
    fetched = set(filter_repo_objects(GPT2_REPO_FILES,
                                      allow_patterns=CONFIG_AND_TOKENIZER + SAFETENSORS_WEIGHTS))
    assert fetched == {"config.json", "vocab.json", "merges.txt", "tokenizer.json",
                       "model.safetensors"}
    fallback = set(filter_repo_objects(GPT2_REPO_FILES,
                                       allow_patterns=CONFIG_AND_TOKENIZER + PYTORCH_WEIGHTS))
    assert fallback == {"config.json", "vocab.json", "merges.txt", "tokenizer.json",
                        "pytorch_model.bin"}
    sharded = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "onnx/model-00001-of-00002.safetensors"]
    assert set(filter_repo_objects(sharded, allow_patterns=SAFETENSORS_WEIGHTS)) == set(sharded[:3])
