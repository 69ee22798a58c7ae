"""GuideLLM (the load generator vLLM's documentation recommends) against `gpt2 serve` and
llama.cpp's `llama-server` on the same weights, in one run: concurrent streams of synthetic
prompts over /v1/completions and /v1/chat/completions, reporting what GuideLLM reports (time to
first token, inter-token latency, output tokens/s) by concurrency.

Both servers get the 124M config (gpt2 bench's random weights, with GPT-2's own vocabulary so
GuideLLM's synthetic prompts have GPT-2's token counts; llama-server a GGUF export of them), 2
threads, 8 rows / slots of 1,024 positions, and the ChatML chat template (ours as Jinja,
llama-server's built-in `chatml`). GuideLLM sends `ignore_eos`, so every request generates its
output tokens.

GuideLLM is a benchmark dependency: it lives in its own virtual environment, benchmarks/.guidellm
(made on first use: `pip install torch==2.13.0 guidellm==0.8.1`, torch pinned to the CPU wheel,
which GuideLLM would otherwise resolve to a CUDA build). llama-server: build_llama_server.sh
(about 10 minutes); without it its rows say "missing".

Run: .venv/bin/python benchmarks/guidellm_serving.py [--streams 1,4,8] [--requests 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import gpt2_124m_checkpoint, with_gpt2_vocabulary
from serving import THREADS, busy, free_port, gguf_of, llama_server, running

HERE = Path(__file__).resolve().parent
GUIDELLM_VENV = HERE / ".guidellm"
GUIDELLM_VERSION = "0.8.1"
ROWS, CONTEXT = 8, 1024
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def guidellm() -> Path:
    """The guidellm command, installed into its own environment the first time."""
    command = GUIDELLM_VENV / "bin" / "guidellm"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GUIDELLM_VENV)], check=True)
        subprocess.run([str(GUIDELLM_VENV / "bin" / "pip"), "install", "--quiet", "torch==2.13.0",
                        f"guidellm=={GUIDELLM_VERSION}"], check=True)
    return command


def run_guidellm(url: str, model: Path, endpoint: str, streams: list[int], requests: int,
                 prompt_tokens: int, output_tokens: int, scratch: Path) -> dict[int, dict[str, float]]:
    """One GuideLLM run (a concurrent profile at each stream count) -> per count its TTFT and
    ITL medians (ms) and output tokens/s."""
    scenario = {"spec": {"backend": {"kind": "openai_http", "target": url, "model": str(model),
                                     "request_format": endpoint},
                         "profile": {"kind": "concurrent"},
                         "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens,
                                   "output_tokens": output_tokens}],
                         "constraints": [{"kind": "max_requests", "count": requests}]},
                "benchmarks": [{"profile.streams": n} for n in streams]}
    (scratch / "scenario.json").write_text(json.dumps(scenario))
    out = scratch / "out.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the tokenizer is the checkpoint folder's
    done = subprocess.run([str(guidellm()), "run", "--scenario", str(scratch / "scenario.json"),
                           "--output", f"kind=json,path={out}", "--disable-console"],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"guidellm failed: {done.stderr[-3000:]}")
    results = {}
    for benchmark, n in zip(json.loads(out.read_text())["benchmarks"], streams, strict=True):
        metrics = benchmark["metrics"]
        tokens = metrics["output_token_count"]["successful"]["total_sum"]
        results[n] = {"ttft_ms": metrics["time_to_first_token_ms"]["successful"]["median"],
                      "itl_ms": metrics["inter_token_latency_ms"]["successful"]["median"],
                      "tok_s": tokens / benchmark["duration"],
                      "failed": metrics["request_totals"]["errored"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,4,8", help="concurrent streams, one benchmark each")
    parser.add_argument("--requests", type=int, default=24, help="requests per benchmark")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    args = parser.parse_args()
    streams = [int(n) for n in args.streams.split(",")]
    folder = with_gpt2_vocabulary(gpt2_124m_checkpoint())
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    servers = {"gpt2engine": lambda port: [
        str(Path(sys.executable).parent / "gpt2"), "serve", "--model", str(folder), "--port", str(port),
        "--served-model-name", str(folder), "--max-batch", str(ROWS), "--max-model-len", str(CONTEXT),
        "--chat-template", CHATML, "--quiet"]}
    binary = llama_server()
    if binary:
        gguf = gguf_of(folder, "float32")
        servers["llama-server"] = lambda port: [
            binary, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "--parallel", str(ROWS),
            "-c", str(ROWS * CONTEXT), "-t", str(THREADS), "-tb", str(THREADS), "--no-webui",
            "--chat-template", "chatml"]
    print(f"GuideLLM {GUIDELLM_VERSION}, 124M (random weights), float32, {THREADS} threads each, "
          f"{args.prompt_tokens} prompt + {args.output_tokens} output tokens, {args.requests} requests "
          f"per level; load before: {busy():.2f}", flush=True)
    print("| server | endpoint | streams | TTFT p50 ms | ITL p50 ms | output tokens/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, command in servers.items():
            port = free_port()
            with running(command(port), port, env) as url:
                for endpoint in ENDPOINTS:
                    results = run_guidellm(url, folder, endpoint, streams, args.requests,
                                           args.prompt_tokens, args.output_tokens, Path(scratch))
                    for n, r in results.items():
                        failed = f" ({r['failed']} failed)" if r["failed"] else ""
                        print(f"| {name} | {endpoint} | {n} | {r['ttft_ms']:.0f} | {r['itl_ms']:.1f} | "
                              f"{r['tok_s']:.1f}{failed} |", flush=True)
    if not binary:
        print("| llama-server | | | missing (benchmarks/build_llama_server.sh builds it) | | |")
    print(f"load after: {busy():.2f}")


if __name__ == "__main__":
    main()
