"""Prefix caching, on and off in one run, on the CPU and the 124M config (gpt2 bench's checkpoint):

1. lm-evaluation-harness `local-completions` against `gpt2 serve`, on a multiple-choice task built
   here from The Tempest (public domain): Q questions x 4 endings after the same 5-shot prefix
   (lm-eval's `first_n` sampler), each request echo + logprobs as lm-eval sends them. The scores
   must be identical; reported: wall-clock seconds, cache off / on.
2. The same task through `lm_eval --model gpt2engine` (in-process), cache on and off.
3. Time to first token of a request whose 900-token prefix is cached, against the same request
   cold (in-process engine, medians of 5).
4. A workload with no shared prefix (24 requests of 200 random tokens, 32 new each, 8 rows):
   throughput with the cache on / off (medians of 3, alternating).

Run: .venv/bin/python benchmarks/prefix_cache.py [--questions 200] [--prefill-chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gpt2_124m_checkpoint, with_gpt2_vocabulary
from serving import busy, free_port, running

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEMPEST = ROOT / "tests" / "data" / "tempest.txt"
TASK = """\
task: tempest_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nThe line goes on:"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, questions: int) -> Path:
    """Each question: five lines of the play and the first half of the next; the endings: that
    line's second half and three other lines' (a fixed seed)."""
    lines = [line.strip() for line in TEMPEST.read_text().splitlines() if len(line.split()) >= 8]
    rng = random.Random(0)
    docs = []
    step = (len(lines) - 5) // (questions + 5)  # 1,171 lines: up to about 230 questions
    if step < 1:
        raise SystemExit(f"The Tempest has lines for at most {len(lines) - 10} questions")
    for i in range(5, 5 + step * (questions + 5), step):
        words = lines[i].split()
        half = len(words) // 2
        endings = [" " + " ".join(words[half:])]
        endings += [" " + " ".join(lines[j].split()[half:]) for j in rng.sample(range(len(lines)), 3)]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        docs.append({"context": "\n".join(lines[i - 5 : i]) + "\n" + " ".join(words[:half]),
                     "endings": endings, "label": label})
    for name, part in (("train", docs[:5]), ("test", docs[5 : 5 + questions])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    task = TASK.format(train=folder / "train.jsonl", test=folder / "test.jsonl")
    (folder / "tempest_mc.yaml").write_text(task)
    return folder


def lm_eval(folder: Path, model: str, model_args: str, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "lm_eval"), "run", "--model", model, "--model_args", model_args,
                    "--tasks", "tempest_mc", "--include_path", str(folder), "--num_fewshot", "5",
                    "--output_path", str(out), "--batch_size", "8", "--device", "cpu",
                    "--log_samples"], capture_output=True, text=True, env=env, cwd=folder)
    if done.returncode:
        raise RuntimeError(f"lm_eval failed: {done.stderr[-3000:]}")
    elapsed = time.perf_counter() - started
    [results] = out.rglob("results_*.json")
    [samples] = out.rglob("samples_*.jsonl")
    scores = [json.loads(line)["resps"] for line in samples.read_text().splitlines()]
    return elapsed, {"acc": json.loads(results.read_text())["results"]["tempest_mc"]["acc,none"],
                     "loglikelihoods": scores}


def agreement(on: dict, off: dict) -> str:
    """Whether two runs scored the same: identical, or the largest log-likelihood difference."""
    if on == off:
        return "identical scores"
    differences = [abs(a - b) for a, b in zip(numbers(on["loglikelihoods"]), numbers(off["loglikelihoods"]),
                                              strict=True)]
    return f"log-likelihoods within {max(differences):.1e}"


def numbers(value) -> list[float]:
    """Every number in lm-eval's logged responses, in order (flags and labels left out)."""
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    text = str(value)
    numeric = text.lstrip("-").replace(".", "", 1).isdigit()
    if isinstance(value, float) or (isinstance(value, str) and numeric):
        return [float(text)]
    return []


def served(folder: Path, checkpoint: Path, chunk: int, cache: bool, tag: str) -> tuple[float, dict]:
    port = free_port()
    command = [str(BIN / "gpt2"), "serve", "--model", str(checkpoint), "--port", str(port), "--quiet",
               "--served-model-name", "gpt2", "--prefill-chunk", str(chunk), "--max-batch", "4",
               *([] if cache else ["--no-prefix-cache"])]
    with running(command, port, dict(os.environ)) as url:
        args = (f"base_url={url}/v1/completions,model=gpt2,tokenizer_backend=remote,"
                "tokenized_requests=True,num_concurrent=2,max_retries=1")
        return lm_eval(folder, "local-completions", args, folder / f"out-{tag}")


def in_process(folder: Path, checkpoint: Path, chunk: int, cache: bool, tag: str) -> tuple[float, dict]:
    args = f"pretrained={checkpoint},prefill_chunk={chunk},prefix_cache_mib={1024 if cache else 0}"
    return lm_eval(folder, "gpt2engine", args, folder / f"out-{tag}")


ENGINE_CODE = """
import json, random, statistics, sys, time
from gpt2engine import GPT2, Tokenizer
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.sampling_params import SamplingParams

folder, chunk = sys.argv[1], int(sys.argv[2])
model, tokenizer = GPT2.from_pretrained(folder), Tokenizer.from_pretrained(folder)
rng = random.Random(0)
greedy = SamplingParams(temperature=0)

def ttft(engine, prompt):
    started = time.perf_counter()
    options = GenerationOptions(max_new_tokens=1, sampling=greedy, ignore_eos=True)
    request = engine.add_request(prompt, options)
    while not request.output_ids:
        engine.step()
    elapsed = time.perf_counter() - started
    while engine.has_work():
        engine.step()
    return elapsed

cached = Engine(model, tokenizer, prefill_chunk=chunk)
cold = Engine(model, tokenizer, prefill_chunk=chunk, prefix_cache_mib=0)
ttfts = {"cold": [], "cached": []}
for _ in range(5):
    prefix = [rng.randrange(50000) for _ in range(900)]
    ttft(cached, prefix + [rng.randrange(50000) for _ in range(16)])  # fills the cache
    suffix = [rng.randrange(50000) for _ in range(16)]
    ttfts["cached"].append(ttft(cached, prefix + suffix))
    ttfts["cold"].append(ttft(cold, prefix + suffix))

def throughput(engine):
    prompts = [[rng.randrange(50000) for _ in range(200)] for _ in range(24)]
    options = GenerationOptions(max_new_tokens=32, sampling=greedy, ignore_eos=True)
    started = time.perf_counter()
    requests = [engine.add_request(p, options) for p in prompts]
    for _ in engine.run(requests):
        pass
    return 24 * 32 / (time.perf_counter() - started)

engines = {"on": Engine(model, tokenizer, max_batch=8, prefill_chunk=chunk),
           "off": Engine(model, tokenizer, max_batch=8, prefill_chunk=chunk, prefix_cache_mib=0)}
speeds = {"on": [], "off": []}
for _ in range(3):
    for name, engine in engines.items():
        speeds[name].append(throughput(engine))
print(json.dumps({"ttft": {k: statistics.median(v) for k, v in ttfts.items()},
                  "tok_s": {k: statistics.median(v) for k, v in speeds.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--parts", default="served,in-process,engine",
                        help="which to run: served (1), in-process (2), engine (3 and 4)")
    args = parser.parse_args()
    checkpoint = with_gpt2_vocabulary(gpt2_124m_checkpoint())
    print(f"machine busy {busy():.2f} (1-minute load per core); chunk {args.prefill_chunk}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_task(Path(scratch), args.questions)
        parts = args.parts.split(",")
        for part, label, run in (("served", "local-completions against gpt2 serve", served),
                                 ("in-process", "lm_eval --model gpt2engine (in-process)", in_process)):
            if part in parts:
                times, results = {}, {}
                for cache in (True, False):
                    tag = f"{run.__name__}-{'on' if cache else 'off'}"
                    times[cache], results[cache] = run(folder, checkpoint, args.prefill_chunk, cache, tag)
                print(f"{label}, {args.questions} questions x 4: cache on {times[True]:.1f} s, off "
                      f"{times[False]:.1f} s: {times[False] / times[True]:.2f}x; acc "
                      f"{results[True]['acc']:.4f} on, {results[False]['acc']:.4f} off; "
                      f"{agreement(results[True], results[False])}", flush=True)
        if "engine" not in parts:
            return
        code = subprocess.run([sys.executable, "-c", ENGINE_CODE, str(checkpoint), str(args.prefill_chunk)],
                              check=True, capture_output=True, text=True).stdout
        numbers = json.loads(code)
        ttft, speed = numbers["ttft"], numbers["tok_s"]
        print(f"time to first token, 900 cached + 16 new tokens: {1000 * ttft['cached']:.0f} ms against "
              f"{1000 * ttft['cold']:.0f} ms cold: {ttft['cached'] / ttft['cold']:.0%}")
        print(f"no shared prefix, 24 x (200 + 32 tokens), 8 rows: {speed['on']:.1f} tokens/s on, "
              f"{speed['off']:.1f} off: {speed['on'] / speed['off']:.3f}x")
    print(f"machine busy {busy():.2f} after", flush=True)


if __name__ == "__main__":
    main()
