"""`gpt2 generate PROMPT`: one response to stdout, then exit; and the streaming of one response
that the REPL shares."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from gpt2engine.cli.flags import add_engine_flags, add_generation_flags, add_model_flags
from gpt2engine.cli.load import load_engine
from gpt2engine.errors import GPT2EngineError

if TYPE_CHECKING:
    from gpt2engine.engine import GenerationResult



MAX_INPUT_BYTES = 16 * 2**20  # a prompt from stdin


def read_stdin() -> str:
    """All of stdin as UTF-8 text, at most MAX_INPUT_BYTES of it."""
    data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise GPT2EngineError(f"stdin: more than {MAX_INPUT_BYTES // 2**20} MiB; a prompt is far "
                              "shorter (the context is at most a few thousand tokens)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GPT2EngineError(f"stdin: not UTF-8 text (byte {error.start})") from None


def print_stats(result: GenerationResult, started: float, first_token: float | None) -> None:
    tokens, elapsed = result.completion_tokens, time.perf_counter() - started
    rate = tokens / elapsed if elapsed > 0 else 0.0
    ttft = f"{(first_token - started) * 1000:.0f} ms" if first_token else "n/a"
    speculative = ""
    if result.acceptance_rate is not None:
        speculative = (f", speculative: {result.accepted_tokens}/{result.proposed_tokens} proposed tokens "
                       f"accepted ({result.acceptance_rate:.0%})")
    print(f"[{tokens} tokens in {elapsed:.2f} s, {rate:.1f} tokens/s, first token after {ttft}{speculative}]",
          file=sys.stderr, flush=True)


def respond(engine, prompt: str, options, stats: bool, show: bool = True) -> GenerationResult:
    """Stream one response to stdout unless not `show` (and its statistics to stderr if asked)."""
    request = engine.add_request(prompt, options)
    started, first_token = time.perf_counter(), None
    for output in engine.run([request]):
        first_token = first_token or time.perf_counter()
        if show:
            print(output.text, end="", flush=True)
    if show:
        print(flush=True)
    if request.finish_reason == "error":
        raise GPT2EngineError(request.error)
    result = request.result()
    if stats:
        print_stats(result, started, first_token)
    return result


def run_generate(args: argparse.Namespace) -> int:
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    engine = load_engine(args)
    if args.json:
        result = respond(engine, prompt, args.options, args.stats, show=False)
        shown = {"model": args.model, "text": result.text, "prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
        if engine.speculation is not None:
            shown["speculative"] = {
                "proposer": engine.speculation.stats.proposer, "proposed_tokens": result.proposed_tokens,
                "accepted_tokens": result.accepted_tokens, "acceptance_rate": result.acceptance_rate}
        print(json.dumps(shown, ensure_ascii=False))
    else:
        respond(engine, prompt, args.options, args.stats)
    return 0


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate once and exit (for scripts)",
                                   description="Generate a continuation of PROMPT and print it.")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read it from stdin")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object: text, token counts, finish_reason")
    add_model_flags(generate, inherit=True)
    add_engine_flags(generate, inherit=True)
    add_generation_flags(generate, inherit=True)
    generate.set_defaults(run=run_generate)
