"""GPT-2 hyper-parameters: the presets of the released sizes and the reading of `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2engine.errors import GPT2EngineError

# Hugging Face's names for the activations we implement -> torch's GELU `approximate` argument.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # the context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise GPT2EngineError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise GPT2EngineError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise GPT2EngineError(
                f"config: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str) -> GPT2Config:
        try:
            return PRESETS[name.removeprefix("openai-community/")]
        except KeyError:
            raise GPT2EngineError(
                f"unknown preset {name!r} (known: {', '.join(PRESETS)})"
            ) from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPT2Config:
        """Read a Hugging Face `config.json` dict; `n_ctx` stands in for `n_positions`."""
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise GPT2EngineError(f"config: model_type is {model_type!r}, not a GPT-2 checkpoint")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        if "n_positions" not in values and "n_ctx" in raw:
            values["n_positions"] = raw["n_ctx"]
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: Path) -> GPT2Config:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GPT2EngineError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise GPT2EngineError(f"{path}: not a readable JSON config ({error})") from None
        if not isinstance(raw, dict):
            raise GPT2EngineError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' GPT2LMHeadModel reads back."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **dataclasses.asdict(self),
            "n_ctx": self.n_positions,
        }


PRESETS = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_embd=768, n_layer=6, n_head=12),
}
