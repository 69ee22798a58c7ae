"""The whole command line: `gpt2` (the REPL) and its commands, each defined in its own module."""

from __future__ import annotations

import argparse

from gpt2engine.cli.activations import add_activations_command
from gpt2engine.cli.bench import add_bench_command
from gpt2engine.cli.eval import add_eval_commands, run_harness
from gpt2engine.cli.export import add_export_command
from gpt2engine.cli.flags import (
    OneLineParser,
    add_engine_flags,
    add_generation_flags,
    add_model_flags,
    generation_options,
)
from gpt2engine.cli.generate import add_generate_command
from gpt2engine.cli.repl import run_repl
from gpt2engine.cli.serve import add_serve_command
from gpt2engine.errors import GPT2EngineError


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
    add_engine_flags(parser)
    add_generation_flags(parser)
    chat = parser.add_argument_group("chat (the REPL)")
    chat.add_argument("--chat", action="store_true",
                      help="a conversation: each prompt is your turn, rendered with the earlier ones by "
                           "the chat template; /reset starts over")
    chat.add_argument("--chat-template", metavar="FILE_OR_STRING",
                      help="the Jinja chat template, a file or the template itself (default: the "
                           "checkpoint's tokenizer_config.json chat_template or chat_template.jinja)")
    parser.set_defaults(run=run_repl)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)

    add_generate_command(commands)
    add_serve_command(commands)
    add_export_command(commands)
    add_eval_commands(commands)
    add_bench_command(commands)
    add_activations_command(commands)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if argv[:2] == ["eval", "harness"]:  # the rest, --help included, is lm_eval's to parse
        return argparse.Namespace(run=run_harness, harness_args=argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "replicas", None) is not None and args.max_replicas is not None:
        parser.error("--replicas is a fixed count; --min-replicas/--max-replicas autoscale: give one or "
                     "the other")
    if getattr(args, "max_replicas", None) is not None and args.max_replicas < args.min_replicas:
        parser.error(f"--max-replicas {args.max_replicas} is below --min-replicas {args.min_replicas}")
    if hasattr(args, "temperature"):
        try:
            args.options = generation_options(args)
        except GPT2EngineError as error:  # a flag value out of range is a command-line error
            parser.error(str(error))
    return args
