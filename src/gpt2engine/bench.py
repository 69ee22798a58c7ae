"""`gpt2 bench`: our engine in every mode against the CPU engines people pick instead, in one run,
on one checkpoint, at one thread count.

Each (engine, mode) runs in a child process of its own (`python -m gpt2engine.bench child ...`):
an engine's libraries loaded beside another's slow it down (torch in the process costs
CTranslate2's float32 about a quarter). Every child runs the same workload through one small
adapter, `load()` and `generate(prompts, new_tokens) -> (seconds to the first token, seconds in
all)`, greedy, the end-of-text token never stopping it:
- decode tokens/s at batch 1 and 8: batch * (new_tokens - 1) / (time after the first token),
- prefill tokens/s: a 512-token prompt over its time to the first token (the median of three),
- time to first token of a 16-token prompt at batch 1, load time, peak RSS,
each child doing one run after a warm-up (a batch of short prompts, then one long prompt: the
first touch of a long prompt's cache and buffers is a one-time cost, 10-20% of our first
prefill's time), in `repeats` rounds that go over every engine and mode
in turn (so a slow stretch of the shared machine falls on all of them alike); the table has the
medians and the spread (max - min) / median of the rounds. Ours runs through the Engine that the
CLI and the server use. The peers are optional (`pip install 'gpt2engine[bench]'`); one that is
not installed is reported as missing, with what to install.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from gpt2engine.errors import GPT2EngineError

MODES = {
    "gpt2engine": ("float32", "bfloat16", "int8"),
    "transformers": ("float32",),
    "ctranslate2": ("float32", "int8"),
    "llama.cpp": ("f32", "bf16", "q8_0"),
}
NEEDS = {  # engine -> modules its child imports, and what provides them
    "transformers": (("transformers", "torch"), "pip install 'gpt2engine[bench]'"),
    "ctranslate2": (("ctranslate2", "transformers"), "pip install 'gpt2engine[bench]'"),
    "llama.cpp": (("llama_cpp", "gguf"), "pip install 'gpt2engine[bench]' (llama-cpp-python builds "
                                         "llama.cpp from source: about 10 minutes)"),
}
CONFIG_124M: dict[str, Any] = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


@dataclass(frozen=True)
class Workload:
    threads: int
    prompt_tokens: int = 16
    new_tokens: int = 64
    prefill_tokens: int = 512
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3


# --- the checkpoint and what the peers read -------------------------------------------------------

def synthetic_vocabulary(folder: Path, size: int) -> None:
    """A byte-level BPE vocabulary of `size` tokens (GPT-2's format: 256 byte symbols, merges of
    pairs of them, <|endoftext|> last). Speed does not depend on which strings the ids stand for,
    and this needs no download."""
    from gpt2engine.tokenizer import END_OF_TEXT, byte_to_unicode

    symbols = byte_to_unicode()  # in byte order
    pairs = [(a, b) for a in symbols for b in symbols][: size - len(symbols) - 1]
    vocab = {s: i for i, s in enumerate([*symbols, *(a + b for a, b in pairs), END_OF_TEXT])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")


def default_checkpoint() -> Path:
    """GPT-2 124M's architecture with random weights, built once into the cache (the Hub may be out
    of reach, and speed does not depend on the weights' values)."""
    import torch

    from gpt2engine.config import GPT2Config
    from gpt2engine.loading.pretrained import GPT2
    from gpt2engine.native import cache_dir

    folder = cache_dir() / "bench" / "gpt2-124m-random"
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    staging = folder.parent / f".{folder.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "vocab").mkdir(parents=True)
    synthetic_vocabulary(staging / "vocab", CONFIG_124M["vocab_size"])
    GPT2(GPT2Config(**CONFIG_124M)).save_pretrained(
        staging / "model", extra_files=(staging / "vocab" / "vocab.json", staging / "vocab" / "merges.txt"))
    shutil.rmtree(folder, ignore_errors=True)  # a partial folder of an earlier, interrupted build
    os.replace(staging / "model", folder)
    shutil.rmtree(staging)
    return folder


def artifacts_dir(checkpoint: Path) -> Path:
    """Where the peers' copies of a checkpoint go: keyed by its path and its weights' size and age."""
    from gpt2engine.loading.weights import weight_files
    from gpt2engine.native import cache_dir

    stamp = [str(checkpoint.resolve())] + [f"{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                           for f in weight_files(checkpoint)]
    return cache_dir() / "bench" / hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]


def prepare(engine: str, mode: str, checkpoint: Path) -> Path:
    """The file or folder `engine` loads in `mode`: our checkpoint itself, a GGUF export of it for
    llama.cpp, a CTranslate2 conversion of it (in a child: the converter imports transformers)."""
    out = artifacts_dir(checkpoint)
    if engine in ("gpt2engine", "transformers"):
        return checkpoint
    if engine == "llama.cpp":
        path = out / f"model-{mode}.gguf"
        if not path.is_file():
            from gpt2engine.gguf_export import export_gguf
            from gpt2engine.loading.pretrained import GPT2
            from gpt2engine.tokenizer import Tokenizer

            path.unlink(missing_ok=True)
            export_gguf(GPT2.from_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint), path, mode)
        return path
    path = out / f"ctranslate2-{mode}"
    if not (path / "model.bin").is_file():
        code = ("import sys, ctranslate2\n"
                "ctranslate2.converters.TransformersConverter(sys.argv[1]).convert("
                "sys.argv[2], quantization=sys.argv[3], force=True)")
        subprocess.run([sys.executable, "-c", code, str(checkpoint), str(path), mode], check=True,
                       capture_output=True, timeout=600)
    return path


# --- the adapters, one per engine, each run inside its child ---------------------------------------

class Ours:
    def __init__(self, path: str, mode: str, work: Workload) -> None:
        from gpt2engine.engine import Engine
        from gpt2engine.loading.runtime import load_pretrained

        model, tokenizer = load_pretrained(path, device="cpu", dtype=mode)
        rows = max(work.prefill_tokens + 1, work.prompt_tokens + work.new_tokens)  # as the peers size theirs
        self.engine = Engine(model, tokenizer, max_batch=max(work.batches), max_len=rows)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        from gpt2engine.engine import GenerationOptions
        from gpt2engine.sampling_params import SamplingParams

        options = GenerationOptions(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=0),
                                    ignore_eos=True)
        started, first = time.perf_counter(), None
        requests = [self.engine.add_request(p, options) for p in prompts]
        for _ in self.engine.run(requests):
            if first is None and all(r.output_ids for r in requests):
                first = time.perf_counter()
        assert first is not None  # every request makes a token: max_new_tokens >= 1, ignore_eos
        return first - started, time.perf_counter() - started


class Transformers:
    def __init__(self, path: str, mode: str, work: Workload) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=getattr(torch, mode)).eval()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        import transformers

        times: list[float] = []

        class Clock(transformers.LogitsProcessor):  # called before each token is chosen
            def __call__(self, input_ids, scores):
                times.append(time.perf_counter())
                return scores

        started = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(self.torch.tensor(prompts), do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=0,
                                logits_processor=transformers.LogitsProcessorList([Clock()]))
        return times[0] - started, time.perf_counter() - started


class CTranslate2:
    def __init__(self, path: str, mode: str, work: Workload) -> None:
        import ctranslate2

        self.generator = ctranslate2.Generator(path, device="cpu", compute_type=mode,
                                               intra_threads=work.threads, inter_threads=1)
        folder = Path(path)  # the token strings in id order, as the converter wrote them
        if (folder / "vocabulary.json").is_file():
            self.tokens = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
        else:
            self.tokens = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        times: list[float] = []
        started = time.perf_counter()
        self.generator.generate_batch(
            [[self.tokens[t] for t in p] for p in prompts], max_length=new_tokens, min_length=new_tokens,
            sampling_topk=1, include_prompt_in_result=False,
            callback=lambda step: times.append(time.perf_counter()))
        return times[0] - started, time.perf_counter() - started


class LlamaCpp:
    """llama.cpp through llama-cpp-python's bindings of its C API: one sequence per prompt in one
    batch, as llama.cpp's own batched tools do."""

    def __init__(self, path: str, mode: str, work: Workload) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.quiet = L.llama_log_callback(lambda level, text, data: None)  # kept: C holds a pointer
        L.llama_log_set(self.quiet, None)
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        seqs, per_seq = max(work.batches), max(work.prefill_tokens, work.prompt_tokens + work.new_tokens) + 1
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max = seqs * per_seq, seqs
        params.n_batch = params.n_ubatch = max(work.prefill_tokens, seqs * work.prompt_tokens)
        params.n_threads = params.n_threads_batch = work.threads
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(params.n_batch, 0, seqs)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(self, index: int) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, index),
                                         shape=(self.vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        started = time.perf_counter()
        self.decode([(t, pos, seq, pos == len(p) - 1)
                     for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
        ends = itertools.accumulate(len(p) for p in prompts)
        tokens = [self.greedy(end - 1) for end in ends]
        first = time.perf_counter()
        for step in range(1, new_tokens):
            self.decode([(t, len(p) + step - 1, seq, True)
                         for seq, (t, p) in enumerate(zip(tokens, prompts, strict=True))])
            tokens = [self.greedy(i) for i in range(len(prompts))]
        return first - started, time.perf_counter() - started


class Adapter(Protocol):
    def __init__(self, path: str, mode: str, work: Workload) -> None: ...
    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]: ...


ADAPTERS: dict[str, type[Adapter]] = {"gpt2engine": Ours, "transformers": Transformers,
                                      "ctranslate2": CTranslate2, "llama.cpp": LlamaCpp}


def measure(engine: str, mode: str, path: str, work: Workload) -> list[dict]:
    """In the child: one run of the workload on one engine in one mode, a result per batch size."""
    import random

    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(0, 50000) for _ in range(n)]  # noqa: E731
    started = time.perf_counter()
    adapter = ADAPTERS[engine](path, mode, work)
    load_s = time.perf_counter() - started
    adapter.generate([prompt(work.prompt_tokens)] * max(work.batches), 4)  # warm-up: every shape measured,
    adapter.generate([prompt(work.prefill_tokens)], 1)  # and the first touch of the memory a long prompt uses
    prefill = work.prefill_tokens / statistics.median(  # a short measurement: the median of three
        adapter.generate([prompt(work.prefill_tokens)], 1)[0] for _ in range(3))
    rows = []
    for batch in work.batches:
        first, total = adapter.generate([prompt(work.prompt_tokens) for _ in range(batch)], work.new_tokens)
        rows.append(dict(engine=engine, dtype=mode, batch=batch, threads=work.threads,
                         decode_tok_s=batch * (work.new_tokens - 1) / (total - first),
                         prefill_tok_s=prefill, ttft_ms=first * 1e3, load_s=load_s))
    return [{**row, "peak_rss_mb": peak_rss() / 2**20} for row in rows]


def combine(rounds: list[list[dict]]) -> list[dict]:
    """One engine and mode's rounds -> per batch size the median of each number, and the spread
    (max - min) / median of its decode and prefill speeds."""
    combined = []
    for at_batch in zip(*rounds, strict=True):
        row = dict(at_batch[0])
        for key, digits in (("decode_tok_s", 2), ("prefill_tok_s", 1), ("ttft_ms", 1), ("load_s", 2),
                            ("peak_rss_mb", 0)):
            row[key] = round(statistics.median(r[key] for r in at_batch), digits or None)
        row["spread"] = round(max((max(v) - min(v)) / statistics.median(v) for v in (
            [r["decode_tok_s"] for r in at_batch], [r["prefill_tok_s"] for r in at_batch])), 3)
        combined.append(row)
    return combined


def peak_rss() -> int:
    """Bytes: this process's high-water resident set (VmHWM; getrusage's ru_maxrss would count the
    parent's too, as it lives on across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the parent: children, the table, the ratios --------------------------------------------------

def missing_reason(engine: str) -> str | None:
    import importlib.util

    modules, install = NEEDS.get(engine, ((), ""))
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed ({', '.join(absent)}): {install}" if absent else None


def run_child(engine: str, mode: str, path: Path, work: Workload) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(work.threads), "MKL_NUM_THREADS": str(work.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    spec = json.dumps(dict(engine=engine, mode=mode, path=str(path), work=asdict(work)))
    done = subprocess.run([sys.executable, "-m", "gpt2engine.bench", "child", spec], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [dict(engine=engine, dtype=mode, failed=reason[:300])]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def cpu_summary() -> str:
    from gpt2engine.native import cpu_flags

    flags = set(cpu_flags().split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "neon", "asimd")
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "CPU")
    notable = " ".join(f for f in wanted if f in flags) or "none of note"
    return f"{model}, {os.cpu_count()} CPUs, flags: {notable}"


def run(engines: list[str], checkpoint: Path, work: Workload, say) -> list[dict]:
    """Every (engine, mode) in its own child; `work.repeats` rounds, each going over all of them in
    turn, so that a slow stretch of a shared machine falls on every engine alike."""
    results: list[dict] = []
    jobs: dict[tuple[str, str], Path] = {}
    for engine in engines:
        reason = missing_reason(engine)
        for mode in MODES[engine]:
            if reason:
                results.append(dict(engine=engine, dtype=mode, missing=reason))
                continue
            try:
                jobs[engine, mode] = prepare(engine, mode, checkpoint)
            except (GPT2EngineError, subprocess.SubprocessError, OSError) as error:
                results.append(dict(engine=engine, dtype=mode, failed=f"cannot prepare its weights: {error}"))
    rounds: dict[tuple[str, str], list[list[dict]]] = {key: [] for key in jobs}
    for round_number in range(1, work.repeats + 1):
        for (engine, mode), path in jobs.items():
            if (engine, mode) not in rounds:
                continue  # failed in an earlier round
            say(f"round {round_number}/{work.repeats}: {engine} {mode}...")
            rows = run_child(engine, mode, path, work)
            if any("failed" in row for row in rows):
                results += rows
                del rounds[engine, mode]
            else:
                rounds[engine, mode].append(rows)
    return results + [row for runs in rounds.values() for row in combine(runs)]


def ratio_table(rows: list[dict], metric: str, batch: int) -> list[str]:
    ours = [r for r in rows if r["engine"] == "gpt2engine" and r.get("batch") == batch]
    peers = [r for r in rows if r["engine"] != "gpt2engine" and r.get("batch") == batch]
    if not ours or not peers:
        return []
    names = [f"{p['engine']} {p['dtype']}" for p in peers]
    lines = [f"{'ours / peer':<20}" + "".join(f"{n:>22}" for n in names)]
    for row in ours:
        cells = "".join(f"{row[metric] / p[metric]:>21.2f}x" for p in peers)
        lines.append(f"{'gpt2engine ' + row['dtype']:<20}{cells}")
    return lines


def report(rows: list[dict], checkpoint: Path, work: Workload, load_before: float) -> str:
    header = (f"{'engine':<13}{'mode':<10}{'decode b1':>11}{'decode b8':>11}{'prefill':>10}"
              f"{'ttft ms':>9}{'load s':>8}{'peak MB':>9}{'spread':>8}")
    lines = [
        f"gpt2 bench: {checkpoint}",
        f"{cpu_summary()}",
        f"{work.threads} threads for every engine; greedy, prompt {work.prompt_tokens} tokens, "
        f"{work.new_tokens} new; prefill of {work.prefill_tokens}; tokens/s, median of {work.repeats} "
        f"rounds; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
        "", header,
    ]
    seen = set()
    for row in rows:
        key = (row["engine"], row["dtype"])
        if key in seen:
            continue
        seen.add(key)
        if "missing" in row or "failed" in row:
            why = row.get("missing") or "failed: " + row["failed"]
            lines.append(f"{row['engine']:<13}{row['dtype']:<10}  {why}")
            continue
        b = {r["batch"]: r for r in rows if (r["engine"], r["dtype"]) == key and "batch" in r}
        one, eight = b.get(1, {}), b.get(max(work.batches), {})
        spread = max(r["spread"] for r in b.values())
        lines.append(f"{row['engine']:<13}{row['dtype']:<10}{one.get('decode_tok_s', 0):>11.1f}"
                     f"{eight.get('decode_tok_s', 0):>11.1f}{row['prefill_tok_s']:>10.0f}"
                     f"{one.get('ttft_ms', 0):>9.1f}{row['load_s']:>8.2f}{row['peak_rss_mb']:>9}"
                     f"{spread:>8.2f}")
    measured = [r for r in rows if "batch" in r]
    for title, metric, batch in (("decode, batch 1", "decode_tok_s", 1),
                                 (f"decode, batch {max(work.batches)}", "decode_tok_s", max(work.batches)),
                                 ("prefill", "prefill_tok_s", 1)):
        table = ratio_table(measured, metric, batch)
        if table:
            lines += ["", f"Ratios, {title} (ours / peer; above 1.00x we are faster):", *table]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`gpt2 bench`: see the module docstring."""
    from gpt2engine.config import GPT2Config
    from gpt2engine.loading.hub import resolve_checkpoint

    unknown = [e for e in args.engines if e not in MODES]
    if unknown:
        raise GPT2EngineError(f"unknown engine {unknown[0]!r}; choose from {', '.join(MODES)}")

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        say(f"warning: the machine is busy (load average {load_before:.2f}); the ratios will be noisy")
    say("Preparing the checkpoint...")
    checkpoint = resolve_checkpoint(args.model) if args.model else default_checkpoint()
    context = GPT2Config.from_json_file(checkpoint / "config.json").n_positions
    work = Workload(threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats,
                    prefill_tokens=min(512, context - 1))  # a small model's context may be short
    if work.prompt_tokens + work.new_tokens > context:
        raise GPT2EngineError(f"--new-tokens {work.new_tokens} and a {work.prompt_tokens}-token prompt do "
                              f"not fit in the model's context of {context}")
    rows = run(args.engines, checkpoint, work, say)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(report(rows, checkpoint, work, load_before))
    return 0


def child(spec: str) -> None:
    job = json.loads(spec)
    work = Workload(**{**job["work"], "batches": tuple(job["work"]["batches"])})
    for row in measure(job["engine"], job["mode"], job["path"], work):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2])
