"""`gpt2 serve --ray`: the server as replicas on Ray Serve, on one machine or across a cluster,
behind Ray's HTTP proxy as the one endpoint.

Each replica is the plain server unchanged (app.py's routes over its own engine loop), built in
the replica once its weights are loaded, so Ray counts it running only when it can serve. Ray's
router sends a request to a replica with a free engine row (`max_ongoing_requests` = the batch
size, so continuous batching fills); past that, requests wait in Ray's bounded queue, and past
that they get 503 with Retry-After. A client that disconnects cancels its request on the replica,
which frees the row. Every response names its replica in `x-gpt2engine-replica`; /health is 200
only while the replicas asked for are all running. Ray is an optional extra (`gpt2engine[ray]`):
nothing else imports this module.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from gpt2engine.engine.scheduler import DEFAULT_SPECULATIVE_TOKENS
from gpt2engine.errors import GPT2EngineError
from gpt2engine.server.app import RETRY_AFTER_SECONDS, create_app
from gpt2engine.server.settings import DEFAULT_SHUTDOWN_TIMEOUT, Scaling, Settings

APP, DEPLOYMENT = "gpt2engine", "gpt2engine"
REPLICA_HEADER = b"x-gpt2engine-replica"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: the model flags and the engine's sizes (sent to each replica)."""

    model: str
    revision: str | None
    device: str
    dtype: str
    max_batch: int
    max_queue: int
    max_model_len: int | None
    prefill_chunk: int
    threads: int
    settings: Settings
    replicas_wanted: int  # /health is 200 once this many are running
    cuda_graphs: bool = True
    tokenizer: str | None = None
    prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB
    speculative: str | None = None
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    speculative_dtype: str = "auto"
    max_batched_tokens: int | None = None


class ReplicaHeader:
    """Pure ASGI middleware: every response says which replica served it."""

    def __init__(self, app, name: str) -> None:
        self.app, self.name = app, name.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name)]}
            await send(message)

        await self.app(scope, receive, named)


def replicas_running() -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


def application(spec: ReplicaSpec, scaling: Scaling, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
    """The Ray Serve application: one deployment whose replicas each own an engine."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    @serve.ingress()
    class Replica:
        def __init__(self, spec: ReplicaSpec) -> None:
            import torch

            from gpt2engine.engine import Engine
            from gpt2engine.loading.runtime import load_pretrained

            torch.set_num_threads(spec.threads)
            model, tokenizer = load_pretrained(spec.model, spec.revision, spec.device, spec.dtype,
                                               tokenizer=spec.tokenizer)
            self.spec = spec
            self.engine = Engine(model, tokenizer, max_batch=spec.max_batch, max_queue=spec.max_queue,
                                 max_len=spec.max_model_len, prefill_chunk=spec.prefill_chunk,
                                 cuda_graphs=spec.cuda_graphs, prefix_cache_mib=spec.prefix_cache_mib,
                                 speculative=spec.speculative, speculative_tokens=spec.speculative_tokens,
                                 speculative_dtype=spec.speculative_dtype,
                                 max_batched_tokens=spec.max_batched_tokens)
            self.name = serve.get_replica_context().replica_id.unique_id

        def __serve_build_asgi_app__(self):
            import asyncio

            async def all_running() -> bool:
                return await asyncio.to_thread(replicas_running) >= self.spec.replicas_wanted

            app = create_app(self.spec.settings, lambda: self.engine, self.load_failed, all_running)
            return ReplicaHeader(app, self.name)

        def load_failed(self, message: str) -> None:
            print(f"gpt2engine replica {self.name}: {message}", file=sys.stderr, flush=True)

    sizing: dict[str, object]
    if scaling.replicas is not None:
        sizing = dict(num_replicas=scaling.replicas)
    else:
        window = min(30.0, max(1.0, scaling.upscale_delay))  # load is judged over the upscale delay
        sizing = dict(autoscaling_config=AutoscalingConfig(
            min_replicas=scaling.min_replicas, max_replicas=scaling.max_replicas,
            target_ongoing_requests=max(1, spec.max_batch // 2), upscale_delay_s=scaling.upscale_delay,
            downscale_delay_s=scaling.downscale_delay, look_back_period_s=window,
            metrics_interval_s=min(10.0, window / 2)))
    gpus = 1 if spec.device.startswith("cuda") else 0
    # ray's overloads of serve.deployment read the class as a function: hence the ignore
    deployment = serve.deployment(Replica).options(  # type: ignore[attr-defined]
        name=DEPLOYMENT, max_ongoing_requests=spec.max_batch, max_queued_requests=spec.max_queue,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=float(RETRY_AFTER_SECONDS)),
        ray_actor_options={"num_cpus": spec.threads, "num_gpus": gpus},
        graceful_shutdown_timeout_s=shutdown_timeout, **sizing)
    return deployment.bind(spec)


def serve_on_ray(spec: ReplicaSpec, scaling: Scaling, host: str, port: int, address: str | None,
                 shutdown_timeout: float) -> int:
    """Start (or join) Ray, deploy the replicas, and serve until SIGTERM or Ctrl-C."""
    try:
        import ray
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError as error:
        raise GPT2EngineError(f"--ray needs Ray Serve ({error}): pip install 'gpt2engine[ray]'") from None
    where = f"the Ray cluster at {address}" if address else "a local Ray instance (127.0.0.1)"
    print(f"gpt2 serve: starting {where}...", file=sys.stderr, flush=True)
    try:
        if address:
            ray.init(address=address, namespace=APP, log_to_driver=False)
        else:
            ray.init(_node_ip_address="127.0.0.1", namespace=APP, log_to_driver=False)
    except Exception as error:  # Ray raises many kinds: unreachable, refused, unauthenticated
        raise GPT2EngineError(f"cannot start or reach Ray at {address or 'localhost'} "
                              f"({str(error).splitlines()[0]})") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"gpt2 serve: loading {spec.model} in {scaling.replicas or scaling.min_replicas} "
              f"replica(s); listening on http://{host}:{port}", file=sys.stderr, flush=True)
        serve.run(application(spec, scaling, shutdown_timeout), name=APP, route_prefix="/")
        print("gpt2 serve: ready (Ray dashboard: ray status / http://127.0.0.1:8265 when installed)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("gpt2 serve: stopping the replicas...", file=sys.stderr, flush=True)
        serve.delete(APP)
    except (RuntimeError, RayServeException) as error:  # a replica could not start: Ray says why
        raise GPT2EngineError(f"the replicas did not start ({str(error).splitlines()[0]})") from None
    finally:
        if not address:
            serve.shutdown()
        ray.shutdown()
    return 0
