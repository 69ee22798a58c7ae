"""What a server is set up with, and its defaults, in plain Python: `gpt2 serve`'s flags take their
defaults from here without importing the server (FastAPI) or torch."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BATCH = 8  # requests decoded together, one cache row each (the library's Engine: 1)
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds for requests in flight to finish on SIGTERM
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_CAPTURE_MIB = 64  # float32 activations one completion may capture (its JSON: 4/3 of it)


@dataclass
class Settings:
    model_name: str  # the name clients pass as `model`
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: str | None = None  # --chat-template: a file or the template (else the checkpoint's)
    max_capture_bytes: int = DEFAULT_MAX_CAPTURE_MIB * 2**20


@dataclass(frozen=True)
class Scaling:
    """How many replicas on Ray Serve: a fixed count, or autoscaling between min and max."""

    replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    upscale_delay: float = 30.0  # seconds of load before adding a replica
    downscale_delay: float = 600.0  # seconds of low load before removing one
