"""The `gpt2` command: thin argument parsing over the engine, one module per command.

`gpt2` alone is the interactive REPL (repl.py); `gpt2 generate` is one-shot (generate.py); `gpt2
serve` serves (serve.py); `gpt2 eval` measures (eval.py); `gpt2 export` writes a checkpoint
(export.py); `gpt2 bench` races the peers (bench.py). parser.py puts them together; flags.py holds
what they share. A user's mistake is one line on stderr and a non-zero exit (2 for a bad command
line, 1 for everything else), never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gpt2engine.cli.flags import CommandLineError
from gpt2engine.cli.parser import parse
from gpt2engine.errors import GPT2EngineError


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except GPT2EngineError as error:
        print(f"gpt2: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, CommandLineError) else 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2 generate ... | head`
        sys.stderr.close()
        return 0
