"""`gpt2 export`: a Hugging Face checkpoint folder or a GGUF file, never over an existing file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2engine.cli.flags import add_model_flags


def add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write a Hugging Face checkpoint folder or a GGUF file",
                                 description="Load --model and write it back in the Hugging Face "
                                             "layout (config.json, model.safetensors, tokenizer "
                                             "files) or as GGUF for llama.cpp. Existing files are "
                                             "never overwritten.")
    export.add_argument("output", metavar="FOLDER_OR_FILE",
                        help="a folder (Hugging Face layout) or a .gguf file (--format gguf)")
    export.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: config.json + model.safetensors + tokenizer files (default); "
                             "gguf: one file for llama.cpp")
    export.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="f32",
                        help="GGUF weight type of the 2-D weights (default: f32)")
    add_model_flags(export, inherit=True)
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from gpt2engine.loading.hub import resolve_checkpoint
    from gpt2engine.loading.pretrained import GPT2
    from gpt2engine.tokenizer import Tokenizer, tokenizer_folder

    out = Path(args.output)
    source = resolve_checkpoint(args.model, args.revision)
    text = tokenizer_folder(resolve_checkpoint(args.tokenizer) if args.tokenizer else source)
    if args.format == "gguf":
        from gpt2engine.gguf_export import export_gguf

        model, tokenizer = GPT2.from_pretrained(source), Tokenizer.from_pretrained(text)
        caveats = export_gguf(model, tokenizer, out, args.gguf_type)
        for caveat in caveats:
            print(f"gpt2 export: warning: {caveat}", file=sys.stderr)
        print(f"wrote {out} (GGUF, {args.gguf_type} weights)")
        return 0
    tokenizer_files = tuple(text / name for name in ("vocab.json", "merges.txt", "tokenizer.json")
                            if (text / name).is_file())
    GPT2.from_pretrained(source).save_pretrained(out, extra_files=tokenizer_files)
    print(f"wrote {out} (config.json, model.safetensors"
          + "".join(f", {p.name}" for p in tokenizer_files) + ")")
    return 0
