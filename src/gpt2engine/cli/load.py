"""Loading what the flags name: the model and tokenizer (what is loading goes to stderr), and the
one-row engine the REPL and `gpt2 generate` answer with."""

from __future__ import annotations

import argparse
import sys

from gpt2engine.cli.flags import CommandLineError, engine_options
from gpt2engine.errors import GPT2EngineError


def load(args: argparse.Namespace):
    """The model and tokenizer the flags name, on the device and dtype they ask for; what is
    loading goes to stderr (so scripts reading stdout are undisturbed) unless --quiet."""
    from gpt2engine.loading.runtime import load_pretrained

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return load_pretrained(args.model, args.revision, args.device, args.dtype,
                           say=None if args.quiet else say, tokenizer=args.tokenizer)


def load_engine(args: argparse.Namespace):
    """One engine with one cache row: the REPL and `gpt2 generate` answer one prompt at a time.
    The steering flags are checked against the model here (a mistake in them is a command-line
    error), and vectors from prompts computed once for every response."""
    model, tokenizer = load(args)
    from gpt2engine.engine import Engine  # after loading, which parses the tokenizer before torch

    engine = Engine(model, tokenizer, max_batch=1, **engine_options(args))
    try:
        args.options = engine.with_checked_hooks(args.options)
    except GPT2EngineError as error:
        raise CommandLineError(f"--steer: {error}") from None
    return engine
