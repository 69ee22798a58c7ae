"""`gpt2 eval`: perplexity, LAMBADA, multiple choice, and lm-evaluation-harness's own command line."""

from __future__ import annotations

import argparse
import json
import sys

from gpt2engine.cli.flags import OneLineParser, add_model_flags, positive_int
from gpt2engine.cli.load import load
from gpt2engine.errors import GPT2EngineError


def add_eval_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="perplexity, LAMBADA, multiple choice, lm-eval",
                                   description="Measure a model on text or a task file.")
    tasks = evaluate.add_subparsers(title="evaluations", metavar="EVALUATION", required=True,
                                    parser_class=OneLineParser)

    def task(name: str, help: str, description: str, run) -> argparse.ArgumentParser:
        parser = tasks.add_parser(name, help=help, description=description)
        parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                            help="sequences per forward pass (default: 4)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        add_model_flags(parser, inherit=True)
        parser.set_defaults(run=run)
        return parser

    ppl = task("perplexity", "sliding-window perplexity of text files",
               "Perplexity and bits per byte of each FILE (UTF-8 text) and of all together, with "
               "the sliding windows of Hugging Face's 'perplexity of fixed-length models' guide. "
               "No <|endoftext|> is added in front, so the first token is not scored.",
               run_perplexity)
    ppl.add_argument("files", nargs="+", metavar="FILE")
    ppl.add_argument("--max-length", type=positive_int, metavar="L",
                     help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=positive_int, metavar="S",
                     help="tokens between window starts (default: half of --max-length)")
    lam = task("lambada", "last-word accuracy and perplexity (GPT-2 paper protocol)",
               "FILE.jsonl holds one {\"text\": passage} per line; the model predicts each "
               "passage's last word from the rest.", run_lambada)
    lam.add_argument("file", metavar="FILE.jsonl")
    choice = task("choice", "multiple-choice accuracy (HellaSwag-style)",
                  "FILE.jsonl holds one {\"context\": str, \"endings\": [str, ...], \"label\": "
                  "int} per line; the ending with the highest log-likelihood is the model's "
                  "answer (accuracy_norm: per character).", run_choice)
    choice.add_argument("file", metavar="FILE.jsonl")
    harness = tasks.add_parser(
        "harness", help="lm-evaluation-harness with --model gpt2engine", add_help=False,
        description="lm_eval's own command line, with the gpt2engine model registered.")
    harness.add_argument("harness_args", nargs=argparse.REMAINDER)
    harness.set_defaults(run=run_harness)


def run_perplexity(args: argparse.Namespace) -> int:
    from gpt2engine.evaluation import Perplexity, perplexity, read_text

    texts = {path: read_text(path) for path in args.files}  # bad files fail before the model loads
    model, tokenizer = load(args)
    results = {path: perplexity(model, tokenizer, text, args.max_length, args.stride,
                                args.batch_size, progress=not args.json)
               for path, text in texts.items()}
    total = sum(results.values(), start=Perplexity(0.0, 0, 0))
    if args.json:
        print(json.dumps({"perplexity": total.perplexity, "bits_per_byte": total.bits_per_byte,
                          "tokens": total.tokens,
                          "files": [{"file": path, "perplexity": r.perplexity,
                                     "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}
                                    for path, r in results.items()]}))
        return 0
    rows = [*results.items(), *([("total", total)] if len(results) > 1 else [])]
    for name, r in rows:
        print(f"{name}: perplexity {r.perplexity:.4f}, bits per byte {r.bits_per_byte:.4f}, "
              f"{r.tokens} tokens scored")
    return 0


def run_lambada(args: argparse.Namespace) -> int:
    from gpt2engine.evaluation import lambada, read_lambada

    requests = read_lambada(args.file)
    model, tokenizer = load(args)
    report(lambada(model, tokenizer, requests, args.batch_size, progress=not args.json), args.json)
    return 0


def run_choice(args: argparse.Namespace) -> int:
    from gpt2engine.evaluation import multiple_choice, read_choices

    records = read_choices(args.file)
    model, tokenizer = load(args)
    report(multiple_choice(model, tokenizer, records, args.batch_size, progress=not args.json),
           args.json)
    return 0


def report(metrics: dict[str, float], as_json: bool) -> None:
    print(json.dumps(metrics) if as_json else
          ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                    for name, value in metrics.items()))


def run_harness(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import gpt2engine.lm_eval_adapter  # noqa: F401  (registers --model gpt2engine)
    except ImportError as error:
        raise GPT2EngineError(f"lm-evaluation-harness is not installed ({error}); "
                              "pip install lm-eval") from None
    sys.argv = ["lm_eval", *args.harness_args]
    cli_evaluate()
    return 0
