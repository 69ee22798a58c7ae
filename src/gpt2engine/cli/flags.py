"""The flags `gpt2` and its commands share, their types, and the parser that says a bad command
line in one line. Plain Python: `gpt2 --help` and a bad flag cost no `import torch`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn

from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from gpt2engine.engine.scheduler import DEFAULT_SPECULATIVE_TOKENS
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import Steering, check_hook
from gpt2engine.loading.runtime import DTYPES
from gpt2engine.sampling_params import ROW_DEFAULTS, ROW_PARAMS, SamplingParams

# Where the command line differs from the library: top-k 40, as OpenAI's GPT-2 release sampled
# (plain temperature-1 sampling over the whole vocabulary reads badly)
CLI_SAMPLING_DEFAULTS = {"top_k": 40}

MAX_NEW_TOKENS = 2**17  # no GPT-2 context is longer (GPT2Config's bound)


class CommandLineError(GPT2EngineError):
    """A flag's value that only the loaded model shows to be wrong (exit code 2, as argparse's)."""


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
    add("--tokenizer", metavar="NAME_OR_PATH",
        help="take the tokenizer from this folder or Hub id (default: the model's; GPT-2's own for "
             "a nanoGPT ckpt.pt or an llm.c .bin)")
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
    add("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
        help="keep prompts' KV cache (and prompt logprobs) for requests that start the same way, "
             "by whole prefill chunks (default: on)")
    add("--prefix-cache-mib", type=non_negative_float, default=DEFAULT_PREFIX_CACHE_MIB, metavar="MIB",
        help=f"the most memory the prefix cache keeps, least recently used out first "
             f"(default: {DEFAULT_PREFIX_CACHE_MIB})")
    add("--speculative", metavar="ngram|NAME_OR_PATH",
        help="speculative decoding: 'ngram' (prompt lookup) or a draft model of the same vocabulary "
             "proposes tokens that one step of the model checks; the output is unchanged (default: off)")
    add("--speculative-tokens", type=bounded_int(1, 64), default=DEFAULT_SPECULATIVE_TOKENS, metavar="K",
        help=f"the most tokens proposed a step; fewer as a request's acceptance goes "
             f"(default: {DEFAULT_SPECULATIVE_TOKENS})")
    add("--speculative-dtype", default="auto", choices=DTYPES, help="the draft model's dtype (default: auto)")


def engine_options(args: argparse.Namespace) -> dict:
    """The Engine's keyword arguments that add_engine_flags' flags set."""
    return {"cuda_graphs": args.cuda_graphs,
            "prefix_cache_mib": args.prefix_cache_mib if args.prefix_cache else 0,
            "speculative": args.speculative, "speculative_tokens": args.speculative_tokens,
            "speculative_dtype": args.speculative_dtype}


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
    steer = shared_flag(parser.add_argument_group(
        "steering (activation addition: coefficient x vector added to a residual hook point, "
        "e.g. blocks.6.hook_resid_pre; repeatable)"), inherit)
    steer("--steer", nargs=3, action="append", default=[], metavar=("HOOK", "COEFFICIENT", "FILE"),
          help="add COEFFICIENT times the vector in FILE (a JSON list or whitespace-separated numbers, "
               "n_embd of them) at HOOK")
    steer("--steer-prompts", nargs=4, action="append", default=[],
          metavar=("HOOK", "COEFFICIENT", "POSITIVE", "NEGATIVE"),
          help="the vector is the difference of the two prompts' activations at HOOK, at their last "
               "tokens (ActAdd: 'Love' 'Hate')")
    steer("--steer-start", type=bounded_int(0), default=0, metavar="POSITION",
          help="steer from this position on (default: 0, every position)")


def generation_options(args: argparse.Namespace):
    from gpt2engine.engine import GenerationOptions

    sampling = SamplingParams(**{name: getattr(args, name) for name in ROW_PARAMS}, seed=args.seed)
    return GenerationOptions(max_new_tokens=args.max_new_tokens, sampling=sampling,
                             stop=tuple(args.stop), ignore_eos=args.ignore_eos, truncate=args.truncate,
                             steer=steerings(args))


def steerings(args: argparse.Namespace) -> tuple[Steering, ...]:
    """The --steer and --steer-prompts flags; the hook's layer and the vector's length are checked
    once the model is loaded (cli/load.py)."""
    found = []
    for hook, coefficient, file in args.steer:
        check_hook(hook, None, steering=True)  # its layer: once loaded
        found.append(Steering(hook, read_vector(file), number(coefficient), args.steer_start))
    for hook, coefficient, positive, negative in args.steer_prompts:
        check_hook(hook, None, steering=True)  # its layer: once loaded
        found.append(Steering(hook, coefficient=number(coefficient), start=args.steer_start,
                              from_prompts=(positive, negative)))
    return tuple(found)


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GPT2EngineError(f"steering coefficient must be a number, got {text!r}") from None


def read_vector(path: str) -> list[float]:
    """A steering vector from a file: a JSON list of numbers, or numbers separated by whitespace."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise GPT2EngineError(f"steering vector {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise GPT2EngineError(f"steering vector {path}: not UTF-8 text") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [float(v) for v in text.split()]
    except ValueError:
        raise GPT2EngineError(
            f"steering vector {path}: not a JSON list or whitespace-separated numbers") from None
    if not isinstance(values, list) or not values:
        raise GPT2EngineError(f"steering vector {path}: expected a non-empty list of numbers")
    return values


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


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


non_negative_float.__name__ = "float"


def device_name(text: str) -> str:
    from gpt2engine.loading.runtime import check_device_name

    try:
        return check_device_name(text)
    except GPT2EngineError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
