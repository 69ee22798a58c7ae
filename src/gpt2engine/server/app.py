"""The OpenAI-compatible HTTP API over the async engine: FastAPI routes and one gate in front.

The gate (a plain ASGI middleware, so streaming and disconnects pass through untouched) answers
before any route: 401 without the API key, 503 while loading or draining, 413 for a body over
the limit. Routes turn requests into engine requests and engine outputs into OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gpt2engine import __version__
from gpt2engine.chat import NO_TEMPLATE, ChatTemplate
from gpt2engine.engine import Engine, QueueFull, StepOutput
from gpt2engine.engine.async_engine import AsyncEngine
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import capture_bytes
from gpt2engine.server.metrics import Metrics
from gpt2engine.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_choice,
    chat_delta,
    check,
    completion,
    hooks_of,
    max_tokens_of,
    options_for,
    prompts_of,
    usage,
)
from gpt2engine.server.settings import Settings

RETRY_AFTER_SECONDS = "1"


class State:
    """What the routes share: the engine once loaded, the status, in-flight completions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status = "loading"  # -> ready -> draining; or failed
        self.loaded: tuple[AsyncEngine, Metrics] | None = None
        self.chat_template: ChatTemplate | None = None
        self.inflight = 0
        self.created = int(time.time())

    def attach(self, engine: Engine) -> None:
        self.chat_template = ChatTemplate.find(engine.tokenizer, self.settings.chat_template)
        running = AsyncEngine(engine)
        self.loaded = running, Metrics(lambda: running.running, lambda: running.waiting, running.max_batch,
                                       running.prefix_cache_stats, running.speculation_stats)
        self.status = "ready"

    def ready(self) -> tuple[AsyncEngine, Metrics]:
        """The engine and its metrics; the gate lets no route that needs them run before loading."""
        if self.loaded is None:
            raise APIError(503, "the model is not loaded yet", kind="service_unavailable")
        return self.loaded

    @property
    def engine(self) -> AsyncEngine:
        return self.ready()[0]

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool) -> str:
        """The conversation as the prompt text, by the chat template; 400 without one."""
        if self.chat_template is None:
            raise APIError(400, f"{NO_TEMPLATE}, or send a prompt to /v1/completions", "messages")
        try:
            return self.chat_template.render([m.model_dump() for m in messages], add_generation_prompt,
                                             continue_final_message)
        except GPT2EngineError as error:
            raise APIError(400, str(error), "messages") from None

    @property
    def metrics(self) -> Metrics:
        return self.ready()[1]


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Gate:
    """Pure ASGI middleware: API key, readiness and body size, before any route runs."""

    def __init__(self, app, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self.refusal(scope["path"], headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        limit, received = self.state.settings.max_body_bytes, 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if path == "/health":
            return None
        key = self.state.settings.api_key
        if key is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode()):
                return APIError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                kind="authentication_error")
        if self.state.status != "ready" and path not in ("/metrics", "/docs", "/openapi.json"):
            return APIError(503, f"the server is {self.state.status}; try again later",
                            kind="service_unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.state.settings.max_body_bytes:
            return APIError(413, f"request body over the limit of {self.state.settings.max_body_bytes} bytes")
        return None


def create_app(
    settings: Settings, load: Callable[[], Engine], on_load_error: Callable[[str], None],
    peers_ready: Callable[[], Awaitable[bool]] | None = None,
) -> FastAPI:
    """The app; `load` builds the engine in a thread after the server starts listening, so
    /health can say 503 while the weights load; `on_load_error` hears why loading failed;
    `peers_ready`, where the app is one replica of several, says whether all of them run."""
    state = State(settings)

    def load_in_background() -> None:
        try:
            state.attach(load())
        except GPT2EngineError as error:
            state.status = "failed"
            on_load_error(str(error))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="gpt2engine-load", daemon=True).start()
        yield
        if state.loaded is not None:
            state.engine.close()

    app = FastAPI(title="gpt2engine", version=__version__, lifespan=lifespan,
                  description="An OpenAI-compatible completions API for GPT-2 models.")
    app.state.engine_state = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(GPT2EngineError)
    async def engine_error(request: Request, error: GPT2EngineError) -> JSONResponse:
        return error_response(APIError(400, str(error)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON"))
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = location[0] if location else None
        where = ".".join(location) or "body"
        return error_response(APIError(400, f"{where}: {first.get('msg', 'invalid')}", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # a bug: the client gets OpenAI's shape; the traceback goes to the server's log
        return error_response(APIError(500, f"internal error: {error!r}", kind="internal_server_error"))

    @app.exception_handler(404)
    async def not_found(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(404, f"no route {request.url.path}", kind="not_found_error"))

    @app.get("/health", summary="200 when ready; 503 while loading or draining")
    async def health() -> JSONResponse:
        status = state.status
        if status == "ready" and peers_ready is not None and not await peers_ready():
            status = "waiting for replicas"
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/v1/models", summary="the served model")
    async def models() -> dict:
        context = state.engine.max_len
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": state.created, "owned_by": "gpt2engine",
                                            "max_model_len": context}]}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = state.metrics.render() if state.loaded else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/tokenizer_info", summary="the tokenizer's special tokens (as vLLM serves them)")
    async def tokenizer_info() -> dict:
        engine = state.engine
        eot = "<|endoftext|>" if engine.tokenizer.eot_id is not None else None
        return {"eos_token": eot, "bos_token": eot, "pad_token": None, "unk_token": eot,
                "model_max_length": engine.max_len, "tokenizer_class": "GPT2TokenizerFast"}

    @app.post("/tokenize", summary="text, or a conversation through the chat template -> token ids")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = state.engine
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        text = body.prompt if body.messages is None else state.render_chat(
            body.messages, body.add_generation_prompt, continue_final_message=False)
        assert text is not None  # one of the two, checked above
        tokens = engine.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len}

    @app.post("/detokenize", summary="token ids -> text")
    async def detokenize(body: DetokenizeRequest) -> dict:
        tokenizer = state.engine.tokenizer
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def check_model(model: str | None) -> None:
        if model not in (None, settings.model_name):
            raise APIError(404, f"model {model!r} is not served here (this server serves "
                                f"{settings.model_name!r})", "model", kind="not_found_error")

    @app.post("/v1/chat/completions", summary="OpenAI's chat completions, through the chat template")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        prompt = state.render_chat(body.messages, body.add_generation_prompt, body.continue_final_message)
        completion_body = body.as_completion(prompt)
        run = await start_completion(state, completion_body, "chatcmpl")
        if body.stream:
            return StreamingResponse(stream_completion(state, run, completion_body, chat=True),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await finish_completion(state, run, raw, chat=True)

    @app.post("/v1/completions", summary="OpenAI's completions, streamed or not")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        run = await start_completion(state, body)
        if body.stream:
            return StreamingResponse(stream_completion(state, run, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await finish_completion(state, run, raw)

    return app


@dataclass
class Run:
    """One HTTP completion: its engine requests (one per prompt and choice) and their outputs."""

    completion_id: str
    model: str
    requests: list
    choices: list[Choice]
    outputs: asyncio.Queue
    arrival: float
    echo: bool
    n: int  # choices per prompt

    def unfinished(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)


async def start_completion(state: State, body: CompletionRequest, kind: str = "cmpl") -> Run:
    """Check the request and add its prompts x n choices to the engine (all or none)."""
    engine, metrics = state.ready()
    tokenizer, context = engine.tokenizer, engine.max_len
    completion_id, outputs = f"{kind}-{uuid.uuid4().hex}", asyncio.Queue[StepOutput]()
    check(body)
    prompts = prompts_of(body)
    hooks = hooks_of(body, engine.config)
    work = []
    for p, prompt in enumerate(prompts):
        try:
            ids = engine.prompt_ids(prompt)
        except GPT2EngineError as error:
            raise APIError(400, str(error), "prompt") from None
        work += [(p * body.n + c, ids, options_for(body, len(ids), context, c, hooks)) for c in range(body.n)]
    capture = sum(capture_bytes(hooks[0], engine.config, len(ids) + max_tokens_of(body, len(ids), context))
                  for _, ids, _ in work)
    if capture > state.settings.max_capture_bytes:
        raise APIError(400, f"capture: the activations asked for take {capture / 2**20:.1f} MiB, over the "
                            f"server's limit of {state.settings.max_capture_bytes / 2**20:g} MiB; capture "
                            f"fewer hooks, positions or choices", "capture")
    requests = []
    state.inflight += 1
    try:
        for index, ids, options in work:
            requests.append(await engine.add(ids, options, f"{completion_id}-{index}", outputs))
    except QueueFull as error:
        raise APIError(503, str(error), kind="service_unavailable",
                       headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    except GPT2EngineError as error:  # the engine's word on whether it fits the context
        too_long = len(work[len(requests)][1]) >= context
        raise APIError(400, str(error), "prompt" if too_long else "max_tokens") from None
    finally:
        if len(requests) < len(work):  # refused: take back what was added
            state.inflight -= 1
            for request in requests:
                engine.abort(request.request_id)
    metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests[:: body.n]))
    choices = [Choice(i, tokenizer, body.logprobs is not None, covers_prompt=body.echo) for i, _, _ in work]
    return Run(completion_id, state.settings.model_name, requests, choices, outputs,
               time.monotonic(), body.echo, body.n)


async def outputs_of(state: State, run: Run) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, chunk choice) for each engine output, with the metrics kept; aborts the
    run's unfinished requests however the caller stops listening."""
    (engine, metrics), index = state.ready(), {r.request_id: i for i, r in enumerate(run.requests)}
    echoed: set[int] = set()
    last_token: dict[int, float] = {}  # choice -> when its latest token came
    try:
        while run.unfinished():
            output = await run.outputs.get()
            i = index[output.request.request_id]
            choice, now = run.choices[i], time.monotonic()
            if run.echo and i not in echoed:
                echoed.add(i)
                yield i, choice.echo(output.request)
            if output.token_id is not None:
                metrics.generation_tokens.inc()
                if i in last_token:
                    metrics.inter_token_latency.observe(now - last_token[i])
                else:
                    metrics.time_to_first_token.observe(now - run.arrival)
                last_token[i] = now
            yield i, choice.take(output)
            if output.finished:
                reason = output.request.finish_reason
                metrics.finished.labels(reason).inc()
                metrics.e2e_latency.observe(now - run.arrival)
                if reason == "abort":
                    metrics.aborted.inc()
    finally:
        state.inflight -= 1
        for request in run.requests:
            if not request.finished:  # the client went away
                engine.abort(request.request_id)
                metrics.finished.labels("abort").inc()
                metrics.aborted.inc()


def failure(run: Run) -> APIError | None:
    failed = [r for r in run.requests if r.finish_reason == "error"]
    if failed:
        return APIError(500, f"generation failed: {failed[0].error}", kind="internal_server_error")
    return None


def total_usage(run: Run) -> dict[str, Any]:
    firsts = run.requests[:: run.n]  # each prompt counted once, as its first choice got it
    return usage(sum(len(r.prompt_ids) for r in firsts), sum(len(r.output_ids) for r in run.requests),
                 sum(r.cached_tokens for r in firsts))


async def finish_completion(state: State, run: Run, raw: Request, chat: bool = False) -> JSONResponse:
    """Collect the whole completion (in the chat shape if `chat`); a client that goes away aborts it."""

    async def collect() -> None:
        async for _ in outputs_of(state, run):
            pass

    task = asyncio.ensure_future(collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            return JSONResponse({}, status_code=499)
    task.result()
    error = failure(run)
    if error is not None:
        return error_response(error)
    choices = [c.as_dict() for c in run.choices]
    if chat:
        return JSONResponse(completion(run.completion_id, run.model, [chat_choice(c) for c in choices],
                                       total_usage(run), "chat.completion"))
    return JSONResponse(completion(run.completion_id, run.model, choices, total_usage(run)))


async def stream_completion(
    state: State, run: Run, body: CompletionRequest, chat: bool = False
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece (in the chat shape if `chat`, each choice's first
    saying the role), then usage if asked, then [DONE]."""
    started: set[int] = set()
    shape = functools.partial(completion, kind="chat.completion.chunk") if chat else completion
    async for i, chunk in outputs_of(state, run):
        if chunk["text"] or chunk["finish_reason"] or chunk["logprobs"] or (chat and i not in started):
            if chat:
                chunk = chat_delta(chunk, first=i not in started)
                started.add(i)
            yield sse(shape(run.completion_id, run.model, [chunk], None))
    error = failure(run)
    if error is not None:
        yield sse(error.body())
    if body.stream_options and body.stream_options.include_usage:
        yield sse(shape(run.completion_id, run.model, [], total_usage(run)))
    yield "data: [DONE]\n\n"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
