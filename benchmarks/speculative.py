"""Speculative decoding on and off in one run, on the CPU, each measurement in its own child process.

Random weights accept nothing, so the models are trained here, once (cached in
benchmarks/.checkpoints), on The Tempest (public domain) with GPT-2's tokenizer: a target (6 layers,
384 wide, about 30M parameters) and a draft (2 layers, 128 wide), each a few minutes on 2 cores.
Half the training windows are a passage followed by the same passage again, so that the models
learn to copy, as real GPT-2 does; the softmax runs over the play's own tokens only (the other
rows of the tied head keep their small random values), which makes the training affordable.

Workloads, 128 new tokens at batch 1:
- copy-heavy: a 200-token passage, a blank line, and the passage's first 16 tokens again: the
  model goes on repeating the passage (greedy);
- open-ended: the start of another passage, sampled (temperature 0.8, top-k 40, seeded).
Modes: no speculation, prompt lookup (`ngram`), the draft model in float32 and in int8 (a draft's
weights are read once per proposal: the smaller, the cheaper). Then 16 concurrent streams through
`gpt2 serve` (random prompts, greedy, 64 new tokens) with and without `--speculative ngram`.
Each measurement (3 generations after a warm-up, their median) is a child process; the modes take
turns, 3 rounds, so that a drift of the shared machine's speed falls on all of them. Reported: the
median tokens/s over the rounds, the acceptance rate, and the ratios to no speculation.

Run: .venv/bin/python benchmarks/speculative.py [--train-steps 400] [--speculative-tokens K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE
from serving import free_port, load, running

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEMPEST = ROOT / "tests" / "data" / "tempest.txt"
MODELS = {"target": dict(n_embd=384, n_layer=6, n_head=6), "draft": dict(n_embd=128, n_layer=2, n_head=2)}


def train(name: str, steps: int) -> Path:
    """A model of MODELS[name] trained on The Tempest, half of its windows a passage twice."""
    import torch
    import transformers

    from gpt2engine.tokenizer import GPT2_VOCABULARY, Tokenizer

    folder = CACHE / f"speculative-{name}-{steps}"
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("vocab.json", "merges.txt"):
        (folder / file).write_bytes((GPT2_VOCABULARY / file).read_bytes())
    ids = torch.tensor(Tokenizer.from_pretrained(folder).encode(TEMPEST.read_text()))
    used = ids.unique()  # the softmax's tokens
    index = torch.full((50257,), -1)
    index[used] = torch.arange(len(used))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=512, **MODELS[name])
    model = transformers.GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if name == "draft" else 1e-3)
    started = time.perf_counter()
    for step in range(steps):
        windows = []
        for _ in range(8):
            start = random.randrange(len(ids) - 257)
            if random.random() < 0.5:
                passage = ids[start : start + 128]
                windows.append(torch.cat((passage, passage))[:256])
            else:
                windows.append(ids[start : start + 256])
        batch = torch.stack(windows)
        hidden = model.transformer(batch).last_hidden_state[:, :-1]
        logits = hidden @ model.transformer.wte.weight[used].T
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), index[batch[:, 1:]].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"  {name} step {step}: loss {loss.item():.2f} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval().save_pretrained(folder)
    return folder


def workloads(tokenizer) -> dict[str, tuple[list[int], dict]]:
    ids = tokenizer.encode(TEMPEST.read_text())
    passage = ids[30000:30200]
    copy = [*passage, *tokenizer.encode("\n\n"), *passage[:16]]
    return {"copy-heavy": (copy, dict(temperature=0)),
            "open-ended": (ids[40000:40064], dict(temperature=0.8, top_k=40, seed=1))}


def child(target: str, draft: str, workload: str, mode: str, tokens: str) -> dict:
    from gpt2engine import GPT2, Engine, GenerationOptions, SamplingParams, Tokenizer
    from gpt2engine.engine.scheduler import DEFAULT_SPECULATIVE_TOKENS

    model, tokenizer = GPT2.from_pretrained(target), Tokenizer.from_pretrained(target)
    speculative = {"off": None, "ngram": "ngram", "draft": GPT2.from_pretrained(draft),
                   "draft-int8": GPT2.from_pretrained(draft, dtype="int8")}[mode]
    engine = Engine(model, tokenizer, max_batch=1, speculative=speculative,
                    speculative_tokens=int(tokens) if tokens else DEFAULT_SPECULATIVE_TOKENS)
    prompt, sampling = workloads(tokenizer)[workload]

    def once() -> tuple[float, object]:
        request = engine.add_request(prompt, GenerationOptions(max_new_tokens=128, ignore_eos=True,
                                                               sampling=SamplingParams(**sampling)))
        started = time.perf_counter()
        for _ in engine.run([request]):
            pass
        return 128 / (time.perf_counter() - started), request

    once()  # warm-up
    rates, requests = zip(*(once() for _ in range(3)), strict=True)
    last = requests[-1]
    return {"tok_s": statistics.median(rates), "proposed": last.proposed_tokens,
            "accepted": last.accepted_tokens, "tokens": last.output_ids}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serving(target: str, speculative: bool) -> float:
    port = free_port()
    command = [str(BIN / "gpt2"), "serve", "--model", target, "--port", str(port), "--max-batch", "16",
               "--quiet", *(["--speculative", "ngram"] if speculative else [])]
    with running(command, port, dict(os.environ)) as url:
        return asyncio.run(load(url, 16, 2, random.Random(0)))["tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--speculative-tokens", default="",
                        help="the most proposed a step (default: the engine's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=5)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    target, draft = (str(train(name, args.train_steps)) for name in ("target", "draft"))
    print(f"target {MODELS['target']}, draft {MODELS['draft']}, both trained {args.train_steps} steps; CPU; "
          f"speculative tokens {args.speculative_tokens or 'default'}; {args.rounds} rounds")
    print("\n| workload (batch 1, 128 tokens) | speculation | tokens/s | x off | accepted / proposed "
          "| same tokens |")
    print("|---|---|---|---|---|---|")
    modes = ("off", "ngram", "draft", "draft-int8")
    for workload in ("copy-heavy", "open-ended"):
        rounds = [{mode: run_child(target, draft, workload, mode, args.speculative_tokens) for mode in modes}
                  for _ in range(args.rounds)]
        results = {mode: {**rounds[-1][mode], "tok_s": statistics.median(r[mode]["tok_s"] for r in rounds)}
                   for mode in modes}
        for mode, r in results.items():
            rate = f"{r['accepted']}/{r['proposed']}" if r["proposed"] else "-"
            ratio = r["tok_s"] / results["off"]["tok_s"]
            same = r["tokens"] == results["off"]["tokens"]
            print(f"| {workload} | {mode} | {r['tok_s']:.1f} | {ratio:.2f}x | {rate} | {same} |")
    off, on = serving(target, False), serving(target, True)
    print(f"\n16 streams through gpt2 serve: {off:.1f} tokens/s without, {on:.1f} with --speculative ngram "
          f"({on / off:.2f}x)")


if __name__ == "__main__":
    main()
