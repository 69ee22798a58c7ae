"""Activations at engine speed, on the CPU and the 124M config (gpt2 bench's checkpoint), each
measurement in its own child process, all in one run:

1. An activation dataset: every token of a corpus (The Tempest, public domain) in rows of
   --context tokens, --batch-size rows per forward pass, one residual hook captured and written
   to safetensors shards. gpt2engine's `gpt2 activations` (activation_dataset.write_activations)
   in float32, bfloat16 and int8 (with each one's largest error against float32), against
   TransformerLens 4 (TransformerBridge, `run_with_cache(names_filter=...)`, and the same with
   `stop_at_layer`, as SAELens calls it) and transformers (GPT2Model, `output_hidden_states`).
   Reported: tokens/s, and ours / each peer.
2. Generation at batch 1 (greedy, 128 new tokens after a 64-token prompt) with that hook captured,
   against none: tokens/s, medians of 3 alternating runs.

Run: .venv/bin/python benchmarks/activations.py [--tokens 16384] [--context 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gpt2_124m_checkpoint, with_gpt2_vocabulary

ROOT = Path(__file__).resolve().parent.parent
TEMPEST = ROOT / "tests" / "data" / "tempest.txt"
HOOK = "blocks.6.hook_resid_pre"


def rows(checkpoint: str, tokens: int, context: int):
    from gpt2engine import Tokenizer
    from gpt2engine.activation_dataset import token_rows

    all_rows = token_rows(Tokenizer.from_pretrained(checkpoint), [TEMPEST.read_text()], context, True)
    return all_rows[: max(1, tokens // context)]


def save(out: Path, index: int, values, token_ids) -> None:
    from safetensors.torch import save_file

    tensors = {HOOK: values.contiguous(), "token_ids": token_ids.int()}
    save_file(tensors, str(out / f"shard_{index:05d}.safetensors"))


def child_ours(checkpoint: str, tokens: int, context: int, batch: int, dtype: str, out: str) -> dict:
    import torch

    from gpt2engine import GPT2, Tokenizer
    from gpt2engine.activation_dataset import read_shard, write_activations

    model, tokenizer = GPT2.from_pretrained(checkpoint, dtype=dtype), Tokenizer.from_pretrained(checkpoint)
    ids = rows(checkpoint, tokens, context)
    text = tokenizer.decode(ids[:, 1:].flatten().tolist())  # exactly these rows again
    started = time.perf_counter()
    manifest = write_activations(model, tokenizer, [text], [HOOK], Path(out), context=context,
                                 model_name=checkpoint, input_sha256=dtype, batch_size=batch)
    seconds = time.perf_counter() - started
    values = torch.cat([read_shard(Path(out) / s["file"])[HOOK] for s in manifest["shards"]])
    torch.save(values, Path(out) / "values.pt")
    return {"tokens": manifest["tokens"], "seconds": seconds}


def child_transformer_lens(checkpoint: str, tokens: int, context: int, batch: int, stop: bool,
                           out: str) -> dict:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(checkpoint, device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    ids = rows(checkpoint, tokens, context)
    started = time.perf_counter()
    with torch.inference_mode():
        for i, b in enumerate(range(0, len(ids), batch)):
            extra = {"stop_at_layer": int(HOOK.split(".")[1]) + 1} if stop else {}
            _, cache = bridge.run_with_cache(ids[b : b + batch], names_filter=[HOOK], **extra)
            save(Path(out), i, cache[HOOK].float(), ids[b : b + batch])
    return {"tokens": ids.numel(), "seconds": time.perf_counter() - started}


def child_transformers(checkpoint: str, tokens: int, context: int, batch: int, out: str) -> dict:
    import torch
    from transformers import GPT2Model

    model = GPT2Model.from_pretrained(checkpoint).eval()
    ids = rows(checkpoint, tokens, context)
    layer = int(HOOK.split(".")[1])
    started = time.perf_counter()
    with torch.inference_mode():
        for i, b in enumerate(range(0, len(ids), batch)):
            hidden = model(ids[b : b + batch], output_hidden_states=True).hidden_states[layer]
            save(Path(out), i, hidden, ids[b : b + batch])
    return {"tokens": ids.numel(), "seconds": time.perf_counter() - started}


def child_generation(checkpoint: str) -> dict:
    from gpt2engine import GPT2, Engine, GenerationOptions, SamplingParams, Tokenizer

    model, tokenizer = GPT2.from_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint)
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode(TEMPEST.read_text())[:64]

    def rate(capture: tuple[str, ...]) -> float:
        options = GenerationOptions(max_new_tokens=128, sampling=SamplingParams(temperature=0),
                                    ignore_eos=True, capture=capture)
        request = engine.add_request(prompt, options)
        started = time.perf_counter()
        for _ in engine.run([request]):
            pass
        assert not capture or request.result().activations[HOOK].shape[0] == 64 + 128
        return 128 / (time.perf_counter() - started)

    rate(())  # warm-up
    plain, captured = [], []
    for _ in range(3):
        plain.append(rate(()))
        captured.append(rate((HOOK,)))
    return {"plain": statistics.median(plain), "captured": statistics.median(captured)}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        children = {"ours": child_ours, "transformer_lens": child_transformer_lens,
                    "transformers": child_transformers, "generation": child_generation}
        typed = [int(a) if a.isdigit() else {"True": True, "False": False}.get(a, a) for a in rest]
        print(json.dumps(children[name](*typed)))
        return
    import torch

    checkpoint = str(with_gpt2_vocabulary(gpt2_124m_checkpoint()))
    shape = [checkpoint, str(args.tokens), str(args.context), str(args.batch_size)]
    print(f"124M config, CPU ({torch.get_num_threads()} threads), hook {HOOK}, context {args.context}, "
          f"batch {args.batch_size}")
    results, errors = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in ("float32", "bfloat16", "int8"):
            out = Path(scratch) / dtype
            results[f"gpt2engine {dtype}"] = run_child("ours", *shape, dtype, str(out))
            values = torch.load(out / "values.pt")
            if dtype == "float32":
                reference = values
            errors[f"gpt2engine {dtype}"] = float((values - reference).abs().max())
        for stop in (False, True):
            out = Path(scratch) / f"tl-{stop}"
            out.mkdir()
            name = "TransformerLens run_with_cache" + (" stop_at_layer" if stop else "")
            results[name] = run_child("transformer_lens", *shape, str(stop), str(out))
        out = Path(scratch) / "hf"
        out.mkdir()
        results["transformers output_hidden_states"] = run_child("transformers", *shape, str(out))
    ours = results["gpt2engine float32"]["tokens"] / results["gpt2engine float32"]["seconds"]
    print("\n| activation dataset | tokens/s | gpt2engine float32 / it | largest error vs float32 |")
    print("|---|---|---|---|")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        error = f"{errors[name]:.2g}" if name in errors else ""
        print(f"| {name} | {rate:,.0f} | {ours / rate:.2f}x | {error} |")
    generation = run_child("generation", checkpoint)
    print("\n| generation, batch 1, greedy, 128 tokens | tokens/s |\n|---|---|")
    print(f"| no hook | {generation['plain']:.1f} |\n| {HOOK} captured | {generation['captured']:.1f} "
          f"({generation['captured'] / generation['plain']:.3f}x) |")


if __name__ == "__main__":
    main()
