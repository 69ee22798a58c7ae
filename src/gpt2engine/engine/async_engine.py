"""The engine on a thread of its own, for asyncio callers (the HTTP server, Ray replicas).

The engine stays single-threaded: callers hand it requests and aborts through a queue, and its
thread delivers each step's outputs to the caller's asyncio queue on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from dataclasses import dataclass

from gpt2engine.config import GPT2Config
from gpt2engine.engine.engine import Engine
from gpt2engine.engine.prefix_cache import PrefixCacheStats
from gpt2engine.engine.request import GenerationOptions, Request, StepOutput
from gpt2engine.engine.speculative import SpeculationStats
from gpt2engine.tokenizer import Tokenizer


@dataclass
class _Add:
    prompt: str | list[int]
    options: GenerationOptions
    request_id: str
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    admitted: asyncio.Future


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.destinations: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="gpt2engine-loop", daemon=True)
        self.thread.start()

    async def add(
        self, prompt: str | list[int], options: GenerationOptions, request_id: str,
        outputs: asyncio.Queue,
    ) -> Request:
        """Queue a request whose StepOutputs go to `outputs`; raises what add_request raises."""
        loop = asyncio.get_running_loop()
        admitted = loop.create_future()
        self.inbox.put(_Add(prompt, options, request_id, loop, outputs, admitted))
        return await admitted

    def abort(self, request_id: str) -> None:
        self.inbox.put(request_id)

    def abort_all(self) -> None:
        self.inbox.put(None)

    def close(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=10)

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def config(self) -> GPT2Config:
        return self.engine.model.config

    @property
    def speculation_stats(self) -> SpeculationStats | None:
        """Speculative decoding's counts (None when it is off); read from any thread, as they stand."""
        return None if self.engine.speculation is None else self.engine.speculation.stats

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counts (None when it is off); read from any thread, as they stand."""
        return None if self.engine.prefix_cache is None else self.engine.prefix_cache.stats

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt as checked token ids (Engine.prompt_ids); safe from any thread."""
        return self.engine.prompt_ids(prompt)

    def loop(self) -> None:
        while not self.stopping:
            self.take_messages(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:
                print(f"gpt2engine: engine step failed: {error!r}", file=sys.stderr, flush=True)
                outputs = self.engine.fail_all(error)
            for output in outputs:
                self.deliver(output)

    def take_messages(self, block: bool) -> None:
        """Carry out the adds and aborts that arrived (waiting for one when there is no work)."""
        try:
            message = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(message, _Add):
                self.admit(message)
            elif message is None:  # abort everything (draining) or stop
                self.engine.abort_all()
            else:
                self.engine.abort(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def admit(self, add: _Add) -> None:
        try:
            request = self.engine.add_request(add.prompt, add.options, add.request_id)
        except Exception as error:
            _call(add.loop, _settle, add.admitted, None, error)
            return
        self.destinations[request.request_id] = (add.loop, add.outputs)
        _call(add.loop, _settle, add.admitted, request, None)

    def deliver(self, output: StepOutput) -> None:
        request_id = output.request.request_id
        destination = self.destinations.get(request_id)
        if output.finished:
            self.destinations.pop(request_id, None)
        if destination is not None:
            loop, outputs = destination
            _call(loop, outputs.put_nowait, output)


def _call(loop: asyncio.AbstractEventLoop, function, *args) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
        loop.call_soon_threadsafe(function, *args)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting (its connection closed)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

