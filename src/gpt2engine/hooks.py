"""Hook points: the activations inside the model, named as TransformerLens names them, so that a
researcher's code and the sparse autoencoders trained on TransformerLens' activations map one to one.

`Hooks` is what one forward pass records (`capture`) and adds (`steer`, activation addition); model.py
calls it at each point. Names are checked here against a config before any work is done. The
shapes are TransformerLens' too: (B, T, C) for the residual stream, (B, T, nh, hs) for q, k, v and
z, (B, nh, T, L) for the attention pattern over the L positions attended, (B, T, n_inner) for the
MLP's hidden activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2engine.errors import GPT2EngineError

if TYPE_CHECKING:
    import torch

    from gpt2engine.config import GPT2Config

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")  # the steerable ones
LAYER_HOOKS = (  # blocks.{L}.<name>, in the order a block computes them
    "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
MODEL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized")


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of a model with `n_layer` blocks, in the order the forward pass meets them."""
    blocks = [f"blocks.{layer}.{name}" for layer in range(n_layer) for name in LAYER_HOOKS]
    return [*MODEL_HOOKS[:2], *blocks, MODEL_HOOKS[2]]


def split_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.hook_q' -> (3, 'attn.hook_q'); 'hook_embed' -> (None, 'hook_embed')."""
    if name.startswith("blocks."):
        layer, _, rest = name[len("blocks."):].partition(".")
        if layer.isdigit() and rest:
            return int(layer), rest
    return None, name


def check_hook(name: object, n_layer: int | None, steering: bool = False) -> str:
    """`name` if it is a hook point of a model with `n_layer` blocks (None: any number; a residual
    one, for steering); otherwise an error that lists what exists."""
    allowed = RESIDUAL_HOOKS if steering else LAYER_HOOKS
    layers = "L" if n_layer is None else f"{{0..{n_layer - 1}}}"
    listing = (f"blocks.{layers}.{{{', '.join(allowed)}}}"
               + ("" if steering else f", {', '.join(MODEL_HOOKS)}"))
    if not isinstance(name, str):
        raise GPT2EngineError(f"a hook name is a string, got {name!r}; hooks are {listing}")
    layer, short = split_name(name)
    if layer is None and not steering and name in MODEL_HOOKS:
        return name
    if layer is not None and short in allowed:
        if n_layer is None or layer < n_layer:
            return name
        raise GPT2EngineError(
            f"hook {name!r}: layer {layer} is out of range, the model has layers 0..{n_layer - 1}")
    what = "a steerable (residual) hook" if steering else "a hook point"
    raise GPT2EngineError(f"{name!r} is not {what}; hooks are {listing}")


def check_hooks(names: Iterable[object], n_layer: int) -> tuple[str, ...]:
    """The names, checked and without repeats, in the order given."""
    return tuple(dict.fromkeys(check_hook(name, n_layer) for name in names))


def position_shape(name: str, config: GPT2Config, keys: int) -> tuple[int, ...]:
    """The shape of one position's activation at `name`, without batch or position (the pattern's
    row covers `keys` positions attended)."""
    _, short = split_name(name)
    if short in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"):
        return (config.n_head, config.head_dim)
    if short == "attn.hook_pattern":
        return (config.n_head, keys)
    if short in ("mlp.hook_pre", "mlp.hook_post"):
        return (config.mlp_width,)
    return (config.n_embd,)


def capture_bytes(names: Iterable[str], config: GPT2Config, positions: int) -> int:
    """The float32 bytes that capturing `names` over `positions` positions (from 0) takes; known
    before any work, so a server can refuse an oversized request up front."""
    total = 0
    for name in names:
        if split_name(name)[1] == "attn.hook_pattern":  # query p attends to keys 0..p: a full square
            total += config.n_head * positions * positions
        else:
            total += math.prod(position_shape(name, config, 0)) * positions
    return 4 * total


@dataclass(frozen=True)
class Steering:
    """Add `coefficient * vector` to the residual stream at `hook`, at every position from `start`
    (activation addition, Turner et al. 2023; llama.cpp's control vectors). Instead of a vector, two
    prompts: the engine takes the difference of their activations at `hook` at their last tokens
    (ActAdd's "Love" - "Hate"; Engine.steering_from_prompts)."""

    hook: str
    vector: Sequence[float] | torch.Tensor | None = None  # (C,)
    coefficient: float = 1.0
    start: int = 0
    from_prompts: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.from_prompts is None):
            raise GPT2EngineError("a steering takes a vector or from_prompts (two prompts), not both")
        if self.from_prompts is not None and not (
                isinstance(self.from_prompts, tuple) and len(self.from_prompts) == 2
                and all(isinstance(p, str) and p for p in self.from_prompts)):
            raise GPT2EngineError("steering from_prompts is two non-empty prompts")
        if not isinstance(self.coefficient, int | float) or isinstance(self.coefficient, bool) \
                or not math.isfinite(self.coefficient):
            raise GPT2EngineError(f"steering coefficient must be a finite number, got {self.coefficient!r}")
        if not isinstance(self.start, int) or isinstance(self.start, bool) or self.start < 0:
            raise GPT2EngineError(f"steering start must be an integer >= 0, got {self.start!r}")
        values = self.vector.tolist() if hasattr(self.vector, "tolist") else self.vector  # type: ignore[union-attr]
        if values is not None and (not isinstance(values, Sequence) or isinstance(values, str) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise GPT2EngineError("a steering vector is a list of finite numbers")

    def check(self, n_layer: int, n_embd: int) -> None:
        """The hook is a residual one of this model and the vector has its width."""
        check_hook(self.hook, n_layer, steering=True)
        if self.vector is not None and len(self.vector) != n_embd:
            raise GPT2EngineError(f"steering vector for {self.hook!r} has {len(self.vector)} values; "
                                  f"the model's residual stream has {n_embd}")


class Hooks:
    """What one forward pass records and adds at the named points. `steer` maps a residual hook to
    the tensors added there in turn, each broadcast against (B, T, C); a captured value is the one
    after steering, the one the model goes on with. `cache` holds what was captured, by name."""

    def __init__(self, capture: Iterable[str] = (),
                 steer: Mapping[str, list[torch.Tensor]] | None = None) -> None:
        self.capture = frozenset(capture)
        self.steer = dict(steer or {})
        self.active = bool(self.capture or self.steer)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, short: str, layer: int | None = None) -> torch.Tensor:
        # x: the activation in TransformerLens' layout -> the same, steered where asked
        if not self.active:
            return x
        name = short if layer is None else f"blocks.{layer}.{short}"
        for add in self.steer.get(name, ()):
            x = x + add
        if name in self.capture:
            self.cache[name] = x
        return x

    def wants(self, short: str, layer: int) -> bool:
        """Whether the point is captured (for one that costs work only when it is: the pattern)."""
        return self.active and f"blocks.{layer}.{short}" in self.capture


NO_HOOKS = Hooks()
