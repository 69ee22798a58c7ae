"""`gpt2 activations`: an activation dataset of a corpus at chosen hook points, for sparse
autoencoder training (activation_dataset.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2engine.cli.flags import add_model_flags, non_negative_float, positive_int
from gpt2engine.cli.load import load
from gpt2engine.errors import GPT2EngineError


def add_activations_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "activations", help="write a corpus's activations at hook points (for SAE training)",
        description="Run every token of INPUT through the model and write the activations at HOOKS "
                    "(TransformerLens' names) in safetensors shards with a manifest.json, resumable: "
                    "run the same command again after an interruption. An existing output of other "
                    "settings is never overwritten.")
    command.add_argument("--hooks", required=True, metavar="NAMES",
                         help="comma-separated hook points, e.g. "
                              "blocks.6.hook_resid_pre,blocks.6.hook_mlp_out")
    command.add_argument("--input", required=True, type=Path, metavar="FILE",
                         help="UTF-8 text (one document) or JSON lines (.jsonl) with a 'text' field")
    command.add_argument("--text-field", default="text", metavar="NAME",
                         help="the JSON lines' field holding each document (default: text)")
    command.add_argument("--context", type=positive_int, default=128, metavar="N",
                         help="tokens per row (default: 128)")
    command.add_argument("--out", required=True, type=Path, metavar="DIR", help="the output folder")
    command.add_argument("--format", choices=("safetensors", "saelens"), default="safetensors",
                         help="saelens: also the Hugging Face dataset SAELens reads as cached activations "
                              "(DIR/saelens; needs the datasets package) (default: safetensors)")
    command.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                         help="rows per forward pass (default: 8)")
    command.add_argument("--shard-mib", type=non_negative_float, default=256, metavar="MIB",
                         help="about this many MiB of activations per shard (default: 256)")
    command.add_argument("--prepend-eot", action=argparse.BooleanOptionalAction, default=True,
                         help="start every row with <|endoftext|>, as SAELens prepends BOS (default: on)")
    add_model_flags(command, inherit=True)
    command.set_defaults(run=run_activations)


def run_activations(args: argparse.Namespace) -> int:
    from gpt2engine.activation_dataset import file_sha256, print_progress, read_documents, write_activations

    documents = read_documents(args.input, args.text_field)  # a bad input fails before the model loads
    if args.out.exists() and not args.out.is_dir():
        raise GPT2EngineError(f"{args.out} exists and is not a folder (nothing was changed)")
    model, tokenizer = load(args)
    manifest = write_activations(
        model, tokenizer, documents, [n.strip() for n in args.hooks.split(",") if n.strip()], args.out,
        context=args.context, model_name=args.model, input_sha256=file_sha256(args.input),
        format=args.format, batch_size=args.batch_size, shard_mib=args.shard_mib,
        prepend_eot=args.prepend_eot, progress=None if args.quiet else print_progress)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"wrote {manifest['tokens']:,} tokens' activations at {len(manifest['hooks'])} hooks in "
          f"{len(manifest['shards'])} shards to {args.out}", file=sys.stderr)
    return 0
