"""Greedy generation speed on GPT-2 124M: gpt2engine vs transformers, same checkpoint, same run.

Each engine runs in its own child process (alternating, several rounds) and reports the time to
first token (prefill) and decode tokens/s over a fixed number of new tokens; the medians and the
ratios are printed. Run: .venv/bin/python benchmarks/generation.py [ROUNDS]
"""

from __future__ import annotations

import json
import statistics
import sys

from common import child, gpt2_124m_checkpoint

PROMPT_TOKENS, NEW_TOKENS = 128, 128
MEASURE = """
import json, sys, time, torch
torch.manual_seed(0)
folder, batch = sys.argv[1], int(sys.argv[2])
ids = torch.randint(0, 50257, (batch, {prompt}))
{load}
def run(new_tokens):
    started = time.perf_counter()
    {generate}
    return time.perf_counter() - started
run(4)  # warm-up
first, whole = run(1), run({new})
print(json.dumps({{"ttft": first, "decode_tps": batch * ({new} - 1) / (whole - first)}}))
"""
ENGINES = {
    "gpt2engine": dict(
        load="from gpt2engine import GPT2, GenerationOptions, SamplingParams, Tokenizer, complete\n"
             "model, tokenizer = GPT2.from_pretrained(folder), Tokenizer.from_pretrained(folder)\n"
             "prompts = ids.tolist()",
        generate="complete(model, tokenizer, prompts, GenerationOptions(max_new_tokens=new_tokens, "
                 "sampling=SamplingParams(temperature=0), ignore_eos=True))",
    ),
    "transformers": dict(
        load="import transformers\n"
             "model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()",
        generate="model.generate(ids, do_sample=False, max_new_tokens=new_tokens, "
                 "min_new_tokens=new_tokens, pad_token_id=50256)",
    ),
}


def main(rounds: int = 3) -> None:
    folder = str(gpt2_124m_checkpoint())
    print(f"GPT-2 124M (random weights), fp32 CPU, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new "
          f"tokens, greedy; medians of {rounds} rounds")
    for batch in (1, 8):
        runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
        for _ in range(rounds):
            for name, engine in ENGINES.items():
                code = MEASURE.format(prompt=PROMPT_TOKENS, new=NEW_TOKENS, **engine)
                runs[name].append(json.loads(child(code, folder, str(batch))[1]))
        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("ttft", "decode_tps")}
               for name, rs in runs.items()}
        for name, m in med.items():
            print(f"batch {batch} {name:>12}: first token {m['ttft'] * 1000:7.1f} ms, "
                  f"decode {m['decode_tps']:7.1f} tokens/s")
        ours, theirs = med["gpt2engine"], med["transformers"]
        speed = ours["decode_tps"] / theirs["decode_tps"]
        print(f"batch {batch} gpt2engine / transformers: decode speed x{speed:.2f}, "
              f"first token time x{ours['ttft'] / theirs['ttft']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
