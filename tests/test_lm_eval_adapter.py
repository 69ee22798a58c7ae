"""`--model gpt2engine` inside lm-evaluation-harness, on a local task over local files, against
lm-evaluation-harness's own transformers model (`--model hf`) on the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import GPT2_COMMAND
from gpt2engine import GPT2, Tokenizer
from gpt2engine.evaluation import loglikelihood_rolling
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_COMMAND = str(Path(sys.executable).parent / "lm_eval")
TASK = """\
task: tiny_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def harness(command, model, checkpoint, tmp_path, model_args=None):
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tiny_lambada.yaml").write_text(TASK.format(data=ROOT / "examples" / "lambada.jsonl"))
    out = tmp_path / model
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [*command, "run", "--model", model, "--model_args", model_args or f"pretrained={checkpoint}",
         "--tasks", "tiny_lambada", "--include_path", str(tasks), "--output_path", str(out),
         "--batch_size", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]["tiny_lambada"]


def test_lm_eval_scores_like_its_own_transformers_model(tiny_checkpoint, tmp_path):
    """The plain `lm_eval` command finds --model gpt2engine, and keeps its own models."""
    ours = harness([LM_EVAL_COMMAND], "gpt2engine", tiny_checkpoint, tmp_path)
    theirs = harness([LM_EVAL_COMMAND], "hf", tiny_checkpoint, tmp_path)
    assert ours["acc,none"] == theirs["acc,none"]
    assert ours["perplexity,none"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)


def test_rolling_and_generation_requests(tiny_checkpoint):
    from gpt2engine.lm_eval_adapter import GPT2EngineLM

    adapter = GPT2EngineLM(pretrained=str(tiny_checkpoint), device="cuda:0", batch_size="auto:4")
    model, tokenizer = GPT2.from_pretrained(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint)
    text = "Be not afeard; the isle is full of noises."
    [rolling] = adapter.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert rolling == pytest.approx(loglikelihood_rolling(model, tokenizer, text), rel=1e-6)
    free = complete(model, tokenizer, ["The isle"], GenerationOptions(
        max_new_tokens=12, sampling=SamplingParams(temperature=0)))[0].text
    stop = free[4:7]
    [generated] = adapter.generate_until([SimpleNamespace(
        args=("The isle", {"until": [stop], "max_gen_toks": 12, "do_sample": False}))])
    assert generated == free[: free.index(stop)]


def test_gpt2_eval_harness_is_lm_eval_with_the_model_registered(tiny_checkpoint, tmp_path):
    from gpt2engine.evaluation import lambada, read_lambada

    ours = harness([GPT2_COMMAND, "eval", "harness"], "gpt2engine", tiny_checkpoint, tmp_path)
    model, tokenizer = GPT2.from_pretrained(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint)
    library = lambada(model, tokenizer, read_lambada(ROOT / "examples" / "lambada.jsonl"))
    assert ours["acc,none"] == library["accuracy"]
    assert ours["perplexity,none"] == pytest.approx(library["perplexity"], rel=1e-4)


def test_harness_help_is_lm_evals_own():
    done = subprocess.run([GPT2_COMMAND, "eval", "harness", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Language Model Evaluation Harness" in done.stdout


def test_the_wheel_installs_the_lm_eval_hook(tmp_path):
    """`pip install gpt2engine` puts gpt2engine-lm-eval.pth into site-packages (the wheel's root)."""
    import shutil
    import zipfile

    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "wheel").glob("gpt2engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpt2engine-lm-eval.pth" in names
    assert "gpt2engine/lm_eval_adapter.py" in names
