"""The `gpt2` command: thin argument parsing over the engine.

`gpt2` alone is the interactive REPL; `gpt2 generate` is one-shot; `gpt2 eval` measures;
`gpt2 export` writes a Hugging Face checkpoint. A user's mistake is one line on stderr and a
non-zero exit (2 for a bad command line, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from gpt2engine.errors import GPT2EngineError

BANNER = "GPT-2 Inference Engine Ready"
PROMPT = "Prompt (Type 'exit' or 'quit' to exit.) > "
DTYPES = ("auto", "float32", "bfloat16", "float16")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="gpt2", metavar="NAME_OR_PATH",
                       help="a checkpoint folder or a Hugging Face Hub id (default: gpt2)")
    group.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    group.add_argument("--device", default="auto",
                       help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, mps ...")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="weights and activations; auto = float32 on CPU, float16 on CUDA")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                       help="most tokens to generate per response (default: 200)")
    group.add_argument("--temperature", type=float, default=1.0, metavar="T",
                       help="0 = greedy; lower is more focused (default: 1.0)")
    group.add_argument("--top-k", type=int, default=40, metavar="K",
                       help="sample among the K likeliest tokens, 0 = off (default: 40, as "
                            "OpenAI's GPT-2 release)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P",
                       help="nucleus sampling: the likeliest tokens up to probability P (default: 1.0 = off)")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens below P times the likeliest one's probability (default: 0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                       help="> 1 discourages tokens already present (default: 1.0 = off)")
    group.add_argument("--seed", type=int, help="make sampling reproducible")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="end the response at TEXT (not printed); repeatable")
    group.add_argument("--ignore-eos", action="store_true",
                       help="keep generating past <|endoftext|>")
    group.add_argument("--truncate", choices=("error", "left"), default="error",
                       help="a prompt that does not fit the context: error (default) or keep its "
                            "most recent tokens (left)")
    group.add_argument("--stats", action="store_true",
                       help="after each response, print tokens, tokens/s and time to first token")


def generation_options(args: argparse.Namespace):
    from gpt2engine.generate import GenerationOptions
    from gpt2engine.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed)
    return GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling,
                             stop=tuple(args.stop), ignore_eos=args.ignore_eos, truncate=args.truncate)


def load(args: argparse.Namespace):
    """The model and tokenizer the flags name, on the device and dtype they ask for."""
    import torch

    from gpt2engine.hub import resolve_checkpoint
    from gpt2engine.model import GPT2
    from gpt2engine.tokenizer import Tokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise GPT2EngineError(f"device {device!r} is not usable ({str(error).splitlines()[0]})") from None
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "float32" if torch.device(device).type == "cpu" else "float16"
    folder = resolve_checkpoint(args.model, args.revision)
    model = GPT2.from_pretrained(folder, dtype=getattr(torch, dtype_name), device=device)
    return model, Tokenizer.from_pretrained(folder)


def print_stats(tokens: int, started: float, first_token: float | None) -> None:
    elapsed = time.perf_counter() - started
    rate = tokens / elapsed if elapsed > 0 else 0.0
    ttft = f"{(first_token - started) * 1000:.0f} ms" if first_token else "n/a"
    print(f"[{tokens} tokens in {elapsed:.2f} s, {rate:.1f} tokens/s, first token after {ttft}]",
          file=sys.stderr, flush=True)


def respond(model, tokenizer, prompt: str, options, stats: bool):
    """Stream one response to stdout; returns its GenerationResult."""
    from gpt2engine.generate import Generation

    generation = Generation(model, tokenizer, [prompt], options)
    started, first_token = time.perf_counter(), None
    for _, piece in generation:
        first_token = first_token or time.perf_counter()
        print(piece, end="", flush=True)
    print(flush=True)
    [result] = generation.results
    if stats:
        print_stats(result.completion_tokens, started, first_token)
    return result


def run_repl(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):  # readline gives input() line editing and history
        import readline  # noqa: F401
    model, tokenizer = load(args)
    print(BANNER, flush=True)
    while True:
        try:
            prompt = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            print()
            return 0
        if prompt.strip() in ("exit", "quit"):
            return 0
        if not prompt.strip():
            continue
        try:
            respond(model, tokenizer, prompt, args.options, args.stats)
        except KeyboardInterrupt:  # Ctrl-C during a response: drop it, back to the prompt
            print("\n[interrupted]", flush=True)
        except GPT2EngineError as error:  # e.g. a prompt too long for the context
            print(f"error: {error}", file=sys.stderr, flush=True)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args)
    if args.json:
        from gpt2engine.generate import complete

        [result] = complete(model, tokenizer, [prompt], args.options)
        print(json.dumps({"model": args.model, "text": result.text,
                          "prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens,
                          "finish_reason": result.finish_reason}, ensure_ascii=False))
    else:
        respond(model, tokenizer, prompt, args.options, args.stats)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from gpt2engine.hub import resolve_checkpoint
    from gpt2engine.model import GPT2

    out = Path(args.output)
    source = resolve_checkpoint(args.model, args.revision)
    tokenizer_files = [source / name for name in ("vocab.json", "merges.txt", "tokenizer.json")
                       if (source / name).is_file()]
    clash = [out / p.name for p in tokenizer_files if (out / p.name).exists()]
    if clash:
        raise GPT2EngineError(f"{clash[0]} already exists; refusing to overwrite it")
    GPT2.from_pretrained(source).save_pretrained(out)
    for path in tokenizer_files:
        shutil.copyfile(path, out / path.name)
    print(f"wrote {out} (config.json, model.safetensors"
          + "".join(f", {p.name}" for p in tokenizer_files) + ")")
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="gpt2",
        description="GPT-2 inference engine. With no command: an interactive prompt that streams "
                    "each response; exit with 'exit', 'quit', Ctrl-D or Ctrl-C (Ctrl-C during "
                    "a response stops only that response).",
    )
    from gpt2engine import __version__

    parser.add_argument("--version", action="version", version=f"gpt2engine {__version__}")
    add_model_flags(parser)
    add_generation_flags(parser)
    parser.set_defaults(run=run_repl)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)

    generate = commands.add_parser("generate", help="generate once and exit (for scripts)",
                                   description="Generate a continuation of PROMPT and print it.")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read it from stdin")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object: text, token counts, finish_reason")
    add_model_flags(generate)
    add_generation_flags(generate)
    generate.set_defaults(run=run_generate)

    export = commands.add_parser("export", help="write a Hugging Face checkpoint folder",
                                 description="Load --model and write it back in the Hugging Face "
                                             "layout (config.json, model.safetensors, tokenizer "
                                             "files). Existing files are never overwritten.")
    export.add_argument("output", metavar="FOLDER")
    add_model_flags(export)
    export.set_defaults(run=run_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    if hasattr(args, "temperature"):
        try:
            args.options = generation_options(args)
        except GPT2EngineError as error:  # a flag value out of range is a command-line error
            parser.error(str(error))
    try:
        return run(args)
    except GPT2EngineError as error:
        print(f"gpt2: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2 generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
