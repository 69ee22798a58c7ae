"""GPT-2 hyper-parameters: the presets of the released sizes and the reading of `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2engine.errors import GPT2EngineError

MAX_CONFIG_BYTES = 2**20
# Hugging Face's names for the activations we implement -> torch's GELU `approximate` argument.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


# Bounds on what a config.json may ask for: far above every GPT-2 (xl: 48 layers, 1600 wide,
# 1024 positions, 50257 tokens), low enough that a hostile few-byte config is refused at once.
LIMITS = {"vocab_size": 2**22, "n_positions": 2**17, "n_embd": 2**16, "n_layer": 1024,
          "n_head": 1024, "n_inner": 2**18}


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
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if name == "n_inner" and value is None:
                continue
            if type(value) is not int or not 0 < value <= limit:
                raise GPT2EngineError(f"config: {name} must be an integer in [1, {limit}], got {value!r}")
        eps = self.layer_norm_epsilon
        if type(eps) not in (int, float) or not 0 < eps < 1:  # NaN fails both comparisons
            raise GPT2EngineError(f"config: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        for name in ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if type(getattr(self, name)) is not bool:
                raise GPT2EngineError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise GPT2EngineError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise GPT2EngineError(
                f"config: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )

    def parameter_count(self) -> int:
        """Parameters the config asks for (the tied head counted once), known before building."""
        C, hidden = self.n_embd, self.mlp_width
        block = 4 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * hidden + hidden) + (hidden * C + C)
        head = 0 if self.tie_word_embeddings else self.vocab_size * C
        return (self.vocab_size + self.n_positions) * C + self.n_layer * block + 2 * C + head

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
            with open(path, "rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise GPT2EngineError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
            raw = json.loads(data.decode("utf-8"))
        except FileNotFoundError:
            raise GPT2EngineError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise GPT2EngineError(f"{path}: not a readable JSON config ({error})") from None
        except RecursionError:
            raise GPT2EngineError(f"{path}: JSON nested too deeply; not a config") from None
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
