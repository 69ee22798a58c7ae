"""`gpt2 serve`: uvicorn in front of the app, the model loading behind it, and a graceful stop.

The socket opens at once (/health answers 503 while the weights load). SIGTERM or Ctrl-C drains:
new requests get 503, the ones in flight have `shutdown_timeout` seconds to finish, the rest are
aborted, and the process exits 0. A second Ctrl-C stops at once; a repeated SIGTERM is ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from gpt2engine.engine import Engine
from gpt2engine.errors import GPT2EngineError
from gpt2engine.server.app import State, create_app
from gpt2engine.server.settings import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: State, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.load_error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state, loop = self.state, self.loop
        if state.status == "draining" or loop is None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now; a repeated SIGTERM changes nothing
                self.should_exit = self.force_exit = True
            return
        state.status = "draining"
        loop.call_soon_threadsafe(lambda: loop.create_task(self.drain()))

    async def drain(self) -> None:
        state = self.state
        deadline = time.monotonic() + self.shutdown_timeout
        while state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.inflight and state.loaded is not None:
            print(f"gpt2 serve: aborting {state.inflight} request(s) still running after "
                  f"{self.shutdown_timeout:g} s", file=sys.stderr, flush=True)
            state.engine.abort_all()
            finish_by = time.monotonic() + 2
            while state.inflight and time.monotonic() < finish_by:
                await asyncio.sleep(0.05)
        self.should_exit = True

    def fail_loading(self, message: str) -> None:
        self.load_error = message
        self.should_exit = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    load: Callable[[], Engine], settings: Settings, host: str, port: int, shutdown_timeout: float,
    describe: str,
) -> int:
    """Run the server until SIGTERM or Ctrl-C; 0 after a clean stop, 1 if loading failed."""
    if settings.api_key is None and not is_loopback(host):
        print(f"gpt2 serve: warning: listening on {host} without an API key: anyone who can reach "
              "it can use it (set --api-key or GPT2ENGINE_API_KEY)", file=sys.stderr, flush=True)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family)
    except OSError as error:
        raise GPT2EngineError(f"cannot listen on {host}:{port} ({error.strerror})") from None
    holder: list[DrainingServer] = []
    app = create_app(settings, load, lambda message: holder[0].fail_loading(message))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(config, app.state.engine_state, shutdown_timeout)
    holder.append(server)
    print(f"gpt2 serve: {describe}; listening on http://{host}:{port} (/health says 200 when "
          "loaded)", file=sys.stderr, flush=True)
    with listener:
        asyncio.run(server.serve(sockets=[listener]))
    if server.load_error is not None:
        raise GPT2EngineError(server.load_error)
    return 0
