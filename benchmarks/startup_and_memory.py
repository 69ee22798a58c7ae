"""Time to a usable model and peak memory of loading GPT-2 124M: gpt2engine vs transformers, then
gpt2engine in each mode (float32, bfloat16, int8) against `import torch` alone.

Each side runs in its own child process, alternately, several times; the medians and their
ratio are printed. Run: .venv/bin/python benchmarks/startup_and_memory.py
"""

from __future__ import annotations

import os
import sys

from common import child, gpt2_124m_checkpoint, median_of

# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork.
PEAK_RSS = ("import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1)) / 1024)")
LOAD = {
    "gpt2engine": "import sys; from gpt2engine import GPT2; m = GPT2.from_pretrained(sys.argv[1]);",
    "transformers": ("import sys, transformers; "
                     "m = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]);"),
}
# transformers leaves its weights memory-mapped, so their pages count only once they are read.
FORWARD = "import torch; m(torch.zeros(1, 8, dtype=torch.long));"
IMPORT_ONLY = {"gpt2engine": "import gpt2engine, torch;", "transformers": "import transformers, torch;"}
TO_PROMPT = {  # the REPL reads end of input at its first prompt and leaves
    "gpt2engine": "import sys; from gpt2engine.cli import main; sys.exit(main(['--model', sys.argv[1]]))",
    "transformers": "import sys, transformers; transformers.pipeline('text-generation', model=sys.argv[1])",
}


MODES = ("float32", "bfloat16", "int8")
REPL_PEAK = ("import sys; from gpt2engine.cli import main; main(['--model', sys.argv[1], '--dtype', "
             "sys.argv[2], '--quiet']);" + PEAK_RSS)
WEIGHT_BYTES = ("import sys; from gpt2engine import GPT2; m = GPT2.from_pretrained(sys.argv[1], "
                "dtype=sys.argv[2]); print(sum({t.untyped_storage().data_ptr(): t.untyped_storage()"
                ".nbytes() for t in m.state_dict().values()}.values()) / 2**20)")


def by_mode(folder: str, runs: int) -> None:
    """The issue's targets: `gpt2` to its prompt within 0.5 s of `import torch`, and peak RSS within
    `import torch` + 1.1 x the weights of the mode in use."""
    torch_s = median_of(runs, lambda: child("import torch")[0])
    torch_mib = median_of(runs, lambda: float(child("import torch;" + PEAK_RSS)[1]))
    print(f"`python -c 'import torch'`: {torch_s:.2f} s, peak RSS {torch_mib:.0f} MiB")
    for mode in MODES:
        weights = float(child(WEIGHT_BYTES, folder, mode)[1])
        seconds = median_of(runs, lambda m=mode: child(REPL_PEAK, folder, m, stdin="")[0])
        peak = median_of(runs, lambda m=mode: float(child(REPL_PEAK, folder, m, stdin="")[1].split()[-1]))
        print(f"gpt2 --dtype {mode:<8}: to its prompt {seconds:.2f} s (import torch + "
              f"{seconds - torch_s:.2f} s); peak RSS {peak:.0f} MiB = import torch + "
              f"{(peak - torch_mib) / weights:.2f} x its {weights:.0f} MiB of weights")


def main(runs: int = 5) -> None:
    folder = str(gpt2_124m_checkpoint())
    size = sum(f.stat().st_size for f in os.scandir(folder) if f.name.endswith(".safetensors"))
    print(f"checkpoint: {folder} ({size / 2**20:.0f} MiB of weights), {runs} runs each, medians")
    rss = {}
    for name in LOAD:
        base = median_of(runs, lambda n=name: float(child(IMPORT_ONLY[n] + PEAK_RSS)[1]))
        peak = median_of(runs, lambda n=name: float(child(LOAD[n] + PEAK_RSS, folder)[1]))
        used = median_of(runs, lambda n=name: float(child(LOAD[n] + FORWARD + PEAK_RSS, folder)[1]))
        rss[name] = used
        print(f"{name:>12}: peak RSS {peak:6.0f} MiB after load, {used:6.0f} MiB after a first "
              f"forward pass (imports alone: {base:.0f} MiB)")
    print(f"peak RSS ratio gpt2engine / transformers, after a first forward pass: "
          f"{rss['gpt2engine'] / rss['transformers']:.2f}")
    seconds = {name: median_of(runs, lambda n=name: child(TO_PROMPT[n], folder, stdin="")[0])
               for name in TO_PROMPT}
    print(f"  gpt2engine: `gpt2` to its prompt      {seconds['gpt2engine']:.2f} s")
    print(f"transformers: pipeline('text-generation') {seconds['transformers']:.2f} s")
    print(f"ratio gpt2engine / transformers: {seconds['gpt2engine'] / seconds['transformers']:.2f}")
    by_mode(folder, runs)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
