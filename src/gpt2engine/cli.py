"""The `gpt2` command: thin argument parsing over the engine.

`gpt2` alone is the interactive REPL; `gpt2 generate` is one-shot; `gpt2 eval` measures;
`gpt2 export` writes a Hugging Face checkpoint. A user's mistake is one line on stderr and a
non-zero exit (2 for a bad command line, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from gpt2engine.errors import GPT2EngineError
from gpt2engine.runtime import DTYPES
from gpt2engine.sampling_params import ROW_DEFAULTS, ROW_PARAMS, SamplingParams

# Where the command line differs from the library: top-k 40, as OpenAI's GPT-2 release sampled
# (plain temperature-1 sampling over the whole vocabulary reads badly)
CLI_SAMPLING_DEFAULTS = {"top_k": 40}

if TYPE_CHECKING:
    from gpt2engine.engine import GenerationResult

BANNER = "GPT-2 Inference Engine Ready"
MAX_NEW_TOKENS = 2**17  # no GPT-2 context is longer (GPT2Config's bound)
MAX_INPUT_BYTES = 16 * 2**20  # a prompt from stdin
PROMPT = "Prompt (Type 'exit' or 'quit' to exit.) > "


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def shared_flag(group: argparse._ArgumentGroup, inherit: bool):
    """add_argument for a flag that `gpt2` and its commands share. In a command (`inherit`) its
    default is left out, so a value given before the command name (`gpt2 --model M generate`)
    is not replaced by the command's default."""

    def add(*names: str, default=None, **options) -> None:
        group.add_argument(*names, default=argparse.SUPPRESS if inherit else default, **options)

    return add


def add_model_flags(parser: argparse.ArgumentParser, inherit: bool = False) -> None:
    add = shared_flag(parser.add_argument_group("model"), inherit)
    add("--model", default="gpt2", metavar="NAME_OR_PATH",
        help="a checkpoint folder or a Hugging Face Hub id (default: gpt2)")
    add("--revision", help="Hub branch, tag or commit (default: main)")
    add("--device", default="auto", type=device_name,
        help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, mps, xpu")
    add("--dtype", default="auto", choices=DTYPES,
        help="weights and activations; auto = float32 on CPU, float16 on CUDA")
    add("--quiet", action="store_true", default=False,
        help="say nothing on stderr while loading (which checkpoint, from where, device, dtype)")


def add_engine_flags(parser: argparse.ArgumentParser, inherit: bool = False) -> None:
    """Flags of the commands that run the engine loop: the REPL, generate, serve."""
    add = shared_flag(parser.add_argument_group("engine"), inherit)
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
        help="on CUDA, capture the decode step as CUDA graphs, once at start-up (default: on)")


def add_generation_flags(parser: argparse.ArgumentParser, inherit: bool = False) -> None:
    add = shared_flag(parser.add_argument_group("generation"), inherit)
    add("--max-new-tokens", type=bounded_int(1, MAX_NEW_TOKENS), default=200, metavar="N",
        help="most tokens to generate per response (default: 200)")
    for name, param in ROW_PARAMS.items():  # every per-row sampling parameter, as declared there
        default = CLI_SAMPLING_DEFAULTS.get(name, ROW_DEFAULTS[name])
        add(f"--{name.replace('_', '-')}", type=int if param.integer else float, default=default,
            metavar=param.metavar, help=f"{param.help} (default: {default:g})")
    add("--seed", type=int, help="make sampling reproducible")
    add("--stop", action="append", default=[], metavar="TEXT",
        help="end the response at TEXT (not printed); repeatable")
    add("--ignore-eos", action="store_true", default=False, help="keep generating past <|endoftext|>")
    add("--truncate", choices=("error", "left"), default="error",
        help="a prompt that does not fit the context: error (default) or keep its most recent tokens (left)")
    add("--stats", action="store_true", default=False,
        help="after each response, print tokens, tokens/s and time to first token")


def generation_options(args: argparse.Namespace):
    from gpt2engine.engine import GenerationOptions

    sampling = SamplingParams(**{name: getattr(args, name) for name in ROW_PARAMS}, seed=args.seed)
    return GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling,
                             stop=tuple(args.stop), ignore_eos=args.ignore_eos, truncate=args.truncate)


def load(args: argparse.Namespace):
    """The model and tokenizer the flags name, on the device and dtype they ask for; what is
    loading goes to stderr (so scripts reading stdout are undisturbed) unless --quiet."""
    from gpt2engine.runtime import load_pretrained

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return load_pretrained(args.model, args.revision, args.device, args.dtype,
                           say=None if args.quiet else say)


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


def print_stats(tokens: int, started: float, first_token: float | None) -> None:
    elapsed = time.perf_counter() - started
    rate = tokens / elapsed if elapsed > 0 else 0.0
    ttft = f"{(first_token - started) * 1000:.0f} ms" if first_token else "n/a"
    print(f"[{tokens} tokens in {elapsed:.2f} s, {rate:.1f} tokens/s, first token after {ttft}]",
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
    if stats:
        print_stats(len(request.output_ids), started, first_token)
    return request.result()


def load_engine(args: argparse.Namespace):
    """One engine with one cache row: the REPL and `gpt2 generate` answer one prompt at a time."""
    model, tokenizer = load(args)
    from gpt2engine.engine import Engine  # after loading, which parses the tokenizer before torch

    return Engine(model, tokenizer, max_batch=1, cuda_graphs=args.cuda_graphs)


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


def run_generate(args: argparse.Namespace) -> int:
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    engine = load_engine(args)
    if args.json:
        result = respond(engine, prompt, args.options, args.stats, show=False)
        print(json.dumps({"model": args.model, "text": result.text,
                          "prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens,
                          "finish_reason": result.finish_reason}, ensure_ascii=False))
    else:
        respond(engine, prompt, args.options, args.stats)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        from gpt2engine.server.app import Settings
        from gpt2engine.server.serve import serve
    except ImportError as error:
        raise GPT2EngineError(f"the server needs its extra ({error}): "
                              "pip install 'gpt2engine[server]'") from None
    from gpt2engine.engine import Engine
    from gpt2engine.runtime import pick_device

    if not args.ray:  # (Ray replicas pick theirs on their own nodes)
        pick_device(args.device)  # a bad device fails here, before the port opens

    def build_engine() -> Engine:
        return Engine(*load(args), max_batch=args.max_batch, max_queue=args.max_queue,
                      max_len=args.max_model_len, prefill_chunk=args.prefill_chunk,
                      cuda_graphs=args.cuda_graphs)

    settings = Settings(model_name=args.served_model_name or args.model, api_key=args.api_key,
                        max_body_bytes=args.max_body_bytes)
    if args.ray:
        return run_serve_on_ray(args, settings)
    return serve(build_engine, settings, args.host, args.port, args.shutdown_timeout,
                 describe=f"{args.model}, {args.max_batch} rows, queue of {args.max_queue}")


def run_serve_on_ray(args: argparse.Namespace, settings) -> int:
    from gpt2engine.hub import resolve_checkpoint
    from gpt2engine.server.ray_serve import ReplicaSpec, Scaling, serve_on_ray

    resolve_checkpoint(args.model, args.revision)  # a missing checkpoint fails here, not in every replica
    scaling = (Scaling(replicas=args.replicas or 1) if args.max_replicas is None else
               Scaling(None, args.min_replicas, args.max_replicas, args.upscale_delay, args.downscale_delay))
    spec = ReplicaSpec(args.model, args.revision, args.device, args.dtype, args.max_batch, args.max_queue,
                       args.max_model_len, args.prefill_chunk, args.cpus_per_replica, settings,
                       scaling.replicas or scaling.min_replicas, args.cuda_graphs)
    return serve_on_ray(spec, scaling, args.host, args.port, args.ray_address, args.shutdown_timeout)


def run_export(args: argparse.Namespace) -> int:
    from gpt2engine.hub import resolve_checkpoint
    from gpt2engine.pretrained import GPT2

    out = Path(args.output)
    if args.format == "gguf":
        from gpt2engine.gguf_export import export_gguf
        from gpt2engine.tokenizer import Tokenizer

        source = resolve_checkpoint(args.model, args.revision)
        export_gguf(GPT2.from_pretrained(source), Tokenizer.from_pretrained(source), out, args.gguf_type)
        print(f"wrote {out} (GGUF, {args.gguf_type} weights)")
        return 0
    source = resolve_checkpoint(args.model, args.revision)
    tokenizer_files = tuple(source / name for name in ("vocab.json", "merges.txt", "tokenizer.json")
                            if (source / name).is_file())
    GPT2.from_pretrained(source).save_pretrained(out, extra_files=tokenizer_files)
    print(f"wrote {out} (config.json, model.safetensors"
          + "".join(f", {p.name}" for p in tokenizer_files) + ")")
    return 0


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


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server",
        description="Serve /v1/completions (OpenAI's API, streamed or not), /v1/models, /health, "
                    "/tokenize, /detokenize and /metrics, with continuous batching.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="default: 8000")
    serve.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                       help="requests decoded together, one KV cache row each (default: 8)")
    serve.add_argument("--max-queue", type=bounded_int(0), default=64, metavar="M",
                       help="requests waiting for a row; past that, 503 + Retry-After (default: 64)")
    serve.add_argument("--max-model-len", type=positive_int, metavar="L",
                       help="positions per cache row (default: the model's context)")
    serve.add_argument("--prefill-chunk", type=positive_int, default=256, metavar="T",
                       help="prompt tokens prefilled per step while others decode (default: 256)")
    serve.add_argument("--api-key", type=api_key, default=os.environ.get("GPT2ENGINE_API_KEY"), metavar="KEY",
                       help="require Authorization: Bearer KEY (default: $GPT2ENGINE_API_KEY; none)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model name clients pass (default: --model as given)")
    serve.add_argument("--shutdown-timeout", type=seconds, default=30.0, metavar="S",
                       help="on SIGTERM, seconds for requests in flight to finish (default: 30)")
    serve.add_argument("--max-body-bytes", type=positive_int, default=4 * 2**20, metavar="B",
                       help="largest request body; larger gets 413 (default: 4 MiB)")
    ray = serve.add_argument_group("Ray Serve (pip install 'gpt2engine[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve replicas of the engine on Ray Serve behind one endpoint (--host, --port)")
    ray.add_argument("--replicas", type=positive_int, metavar="N",
                     help="a fixed number of replicas (default: 1; autoscaling when --max-replicas is set)")
    ray.add_argument("--min-replicas", type=positive_int, default=1, metavar="A",
                     help="autoscaling: fewest replicas (default: 1)")
    ray.add_argument("--max-replicas", type=positive_int, metavar="B",
                     help="autoscaling: most replicas; scales on requests in flight per replica")
    ray.add_argument("--ray-address", metavar="HOST:PORT",
                     help="join this Ray cluster (as `ray start --address`); default: start Ray locally")
    ray.add_argument("--cpus-per-replica", type=positive_int, default=1, metavar="C",
                     help="CPUs Ray reserves for each replica, and its torch threads (default: 1)")
    ray.add_argument("--upscale-delay", type=seconds, default=30.0, metavar="S",
                     help="autoscaling: seconds of load before adding a replica (default: 30)")
    ray.add_argument("--downscale-delay", type=seconds, default=600.0, metavar="S",
                     help="autoscaling: seconds of low load before removing one (default: 600)")
    add_model_flags(serve, inherit=True)
    add_engine_flags(serve, inherit=True)
    serve.set_defaults(run=run_serve)


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    from gpt2engine.bench import MODES

    bench = commands.add_parser(
        "bench", help="speed against transformers, CTranslate2 and llama.cpp, in one run",
        description="Decode tokens/s at batch 1 and 8, prefill tokens/s, time to first token, load "
                    "time and peak RSS of gpt2engine in every mode and of each peer that is installed "
                    "(pip install 'gpt2engine[bench]'), each in its own process, on the same "
                    "checkpoint and thread count; then the ratios.")
    bench.add_argument("--model", dest="bench_model", metavar="NAME_OR_PATH",
                       help="checkpoint (default: GPT-2 124M's architecture with random weights, "
                            "built locally once)")
    bench.add_argument("--engines", type=lambda text: text.split(","), default=list(MODES),
                       metavar="LIST", help=f"comma-separated, of {','.join(MODES)} (default: all)")
    bench.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)), metavar="N",
                       help="threads for every engine (default: the CPUs this process may use)")
    bench.add_argument("--new-tokens", type=bounded_int(8, 512), default=64, metavar="N",
                       help="tokens generated per decode run (default: 64)")
    bench.add_argument("--repeats", type=bounded_int(1, 20), default=3, metavar="R",
                       help="rounds over every engine and mode; the medians are reported (default: 3)")
    bench.add_argument("--json", action="store_true",
                       help="one JSON object per engine, mode and batch size instead of the table")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from gpt2engine import bench

    args.model = args.bench_model
    return bench.main(args)


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def api_key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def bounded_int(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        value = int(text)
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        if value < low:
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value: 'x'"
    return parse


positive_int = bounded_int(1)


def device_name(text: str) -> str:
    from gpt2engine.runtime import check_device_name

    try:
        return check_device_name(text)
    except GPT2EngineError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    parser.set_defaults(run=run_repl)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)

    generate = commands.add_parser("generate", help="generate once and exit (for scripts)",
                                   description="Generate a continuation of PROMPT and print it.")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt, or - to read it from stdin")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object: text, token counts, finish_reason")
    add_model_flags(generate, inherit=True)
    add_engine_flags(generate, inherit=True)
    add_generation_flags(generate, inherit=True)
    generate.set_defaults(run=run_generate)

    add_serve_command(commands)
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
    add_eval_commands(commands)
    add_bench_command(commands)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        run: Callable[[argparse.Namespace], int] = args.run
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
