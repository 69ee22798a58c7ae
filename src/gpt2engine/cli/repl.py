"""`gpt2` with no command: the interactive prompt. Each response streams; Ctrl-C during one stops
only that one; exit, quit, Ctrl-D or Ctrl-C at the prompt leave."""

from __future__ import annotations

import argparse
import contextlib
import sys

from gpt2engine.cli.generate import respond
from gpt2engine.cli.load import load_engine
from gpt2engine.errors import GPT2EngineError

BANNER = "GPT-2 Inference Engine Ready"


PROMPT = "Prompt (Type 'exit' or 'quit' to exit.) > "


def run_repl(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):  # readline gives input() line editing and history
        import readline  # noqa: F401
    engine = load_engine(args)
    print(BANNER, flush=True)
    while True:
        try:
            prompt = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            print()
            return 0
        except UnicodeDecodeError as error:  # bytes that are not UTF-8: say so, keep the session
            print(f"error: the line is not UTF-8 text (byte {error.start})", file=sys.stderr, flush=True)
            continue
        if prompt.strip() in ("exit", "quit"):
            return 0
        if not prompt.strip():
            continue
        try:
            respond(engine, prompt, args.options, args.stats)
        except KeyboardInterrupt:  # Ctrl-C during a response: drop it, back to the prompt
            engine.reset()
            print("\n[interrupted]", flush=True)
        except GPT2EngineError as error:  # e.g. a prompt too long for the context
            print(f"error: {error}", file=sys.stderr, flush=True)
