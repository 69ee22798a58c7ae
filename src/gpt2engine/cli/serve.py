"""`gpt2 serve`: the OpenAI-compatible server, or its replicas on Ray Serve (`--ray`)."""

from __future__ import annotations

import argparse
import os

from gpt2engine.cli.flags import (
    add_engine_flags,
    add_model_flags,
    api_key,
    bounded_int,
    engine_options,
    non_negative_float,
    positive_int,
    seconds,
)
from gpt2engine.cli.load import load
from gpt2engine.engine.scheduler import DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
from gpt2engine.errors import GPT2EngineError
from gpt2engine.server.settings import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CAPTURE_MIB,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Scaling,
    Settings,
)


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server",
        description="Serve /v1/completions and /v1/chat/completions (OpenAI's API, streamed or not), "
                    "/v1/models, /health, /tokenize, /detokenize and /metrics, with continuous batching.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="default: 8000")
    serve.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                       help="requests decoded together, one KV cache row each (default: %(default)s)")
    serve.add_argument("--max-queue", type=bounded_int(0), default=DEFAULT_MAX_QUEUE, metavar="M",
                       help="requests waiting for a row; past that, 503 + Retry-After (default: %(default)s)")
    serve.add_argument("--max-model-len", type=positive_int, metavar="L",
                       help="positions per cache row (default: the model's context)")
    serve.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="T",
                       help="a prompt is prefilled in pieces of T tokens (the prefix cache's blocks; "
                            "default: %(default)s)")
    serve.add_argument("--max-batched-tokens", type=positive_int, metavar="N",
                       help="tokens a step computes: one per decoding request, and as many waiting "
                            "prompts' pieces as fit in the rest (default: a piece and a token per row)")
    serve.add_argument("--chat-template", metavar="FILE_OR_STRING", default=argparse.SUPPRESS,  # or gpt2's
                       help="the Jinja chat template of /v1/chat/completions, a file or the template "
                            "itself (default: the checkpoint's tokenizer_config.json chat_template or "
                            "chat_template.jinja; without one, chat requests get 400)")
    serve.add_argument("--api-key", type=api_key, default=os.environ.get("GPT2ENGINE_API_KEY"), metavar="KEY",
                       help="require Authorization: Bearer KEY (default: $GPT2ENGINE_API_KEY; none)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model name clients pass (default: --model as given)")
    serve.add_argument("--shutdown-timeout", type=seconds, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                       help="on SIGTERM, seconds for requests in flight to finish (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="B",
                       help="largest request body in bytes; larger gets 413 (default: %(default)s)")
    serve.add_argument("--max-capture-mib", type=non_negative_float, default=DEFAULT_MAX_CAPTURE_MIB,
                       metavar="MIB",
                       help="most float32 activations one completion may capture (its `capture` field); "
                            "more gets 400 before any work (default: %(default)s)")
    ray = serve.add_argument_group("Ray Serve (pip install 'gpt2engine[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve replicas of the engine on Ray Serve behind one endpoint (--host, --port)")
    ray.add_argument("--replicas", type=positive_int, metavar="N",
                     help="a fixed number of replicas (default: 1; autoscaling when --max-replicas is set)")
    ray.add_argument("--min-replicas", type=positive_int, default=Scaling.min_replicas, metavar="A",
                     help="autoscaling: fewest replicas (default: %(default)s)")
    ray.add_argument("--max-replicas", type=positive_int, metavar="B",
                     help="autoscaling: most replicas; scales on requests in flight per replica")
    ray.add_argument("--ray-address", metavar="HOST:PORT",
                     help="join this Ray cluster (as `ray start --address`); default: start Ray locally")
    ray.add_argument("--cpus-per-replica", type=positive_int, default=1, metavar="C",
                     help="CPUs Ray reserves for each replica, and its torch threads (default: 1)")
    ray.add_argument("--upscale-delay", type=seconds, default=Scaling.upscale_delay, metavar="S",
                     help="autoscaling: seconds of load before adding a replica (default: %(default)s)")
    ray.add_argument("--downscale-delay", type=seconds, default=Scaling.downscale_delay, metavar="S",
                     help="autoscaling: seconds of low load before removing one (default: %(default)s)")
    add_model_flags(serve, inherit=True)
    add_engine_flags(serve, inherit=True)
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        from gpt2engine.server.serve import serve
    except ImportError as error:
        raise GPT2EngineError(f"the server needs its extra ({error}): "
                              "pip install 'gpt2engine[server]'") from None
    from gpt2engine.engine import Engine
    from gpt2engine.loading.runtime import pick_device

    if not args.ray:  # (Ray replicas pick theirs on their own nodes)
        pick_device(args.device)  # a bad device fails here, before the port opens

    def build_engine() -> Engine:
        return Engine(*load(args), max_batch=args.max_batch, max_queue=args.max_queue,
                      max_len=args.max_model_len, prefill_chunk=args.prefill_chunk,
                      max_batched_tokens=args.max_batched_tokens, **engine_options(args))

    settings = Settings(model_name=args.served_model_name or args.model, api_key=args.api_key,
                        max_body_bytes=args.max_body_bytes, chat_template=args.chat_template,
                        max_capture_bytes=int(args.max_capture_mib * 2**20))
    if args.ray:
        return run_serve_on_ray(args, settings)
    return serve(build_engine, settings, args.host, args.port, args.shutdown_timeout,
                 describe=f"{args.model}, {args.max_batch} rows, queue of {args.max_queue}")


def run_serve_on_ray(args: argparse.Namespace, settings) -> int:
    from gpt2engine.loading.hub import resolve_checkpoint
    from gpt2engine.server.ray_serve import ReplicaSpec, serve_on_ray

    resolve_checkpoint(args.model, args.revision)  # a missing checkpoint fails here, not in every replica
    scaling = (Scaling(replicas=args.replicas or 1) if args.max_replicas is None else
               Scaling(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       upscale_delay=args.upscale_delay, downscale_delay=args.downscale_delay))
    spec = ReplicaSpec(model=args.model, revision=args.revision, tokenizer=args.tokenizer,
                       device=args.device, dtype=args.dtype,
                       max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                       prefill_chunk=args.prefill_chunk, max_batched_tokens=args.max_batched_tokens,
                       threads=args.cpus_per_replica, settings=settings,
                       replicas_wanted=scaling.replicas or scaling.min_replicas, **engine_options(args))
    return serve_on_ray(spec, scaling, args.host, args.port, args.ray_address, args.shutdown_timeout)
