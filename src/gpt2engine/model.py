"""GPT-2 as plain nn.Modules, readable top to bottom.

Shapes: B batch, T tokens in this call, S cache slots, C n_embd, nh heads, hs head size, V vocab.
Module names follow Hugging Face's GPT-2 (minus the `transformer.` prefix) so that the weight
surgery in weights.py is a short list of transposes, not a renaming table.
This file knows nothing of files, tokenizers or sampling: `GPT2.from_pretrained` and
`save_pretrained` are given to the class by pretrained.py, above the loading that needs this file.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from gpt2engine.config import ACTIVATIONS, GPT2Config
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import NO_HOOKS, Hooks, check_hooks, hook_names
from gpt2engine.kernels import gelu_tanh, linear, prefill_attention


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros whose memory is taken only where written: on the CPU an anonymous mapping, whose pages
    the kernel fills with zeros on first touch, so a cache sized for the whole context costs the
    positions in use, not the context (torch.zeros writes, and so takes, every page up front)."""
    count = math.prod(shape)
    if torch.device(device).type != "cpu" or count == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, count * dtype.itemsize)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


def chunk_start(positions: torch.Tensor) -> int | None:
    """The first position of a prefill chunk on the CPU (one row, T > 1 consecutive positions)."""
    # positions: (B, T)
    B, T = positions.shape
    if B != 1 or T < 2 or positions.device.type != "cpu":
        return None
    start = int(positions[0, 0])
    return start if torch.equal(positions[0], torch.arange(start, start + T)) else None


class KVCache:
    """One layer's keys and values, preallocated for `max_len` positions, written in place.

    Slot p holds the token at position p of its row, so rows of different lengths share one
    buffer, and the buffers never change shape: the decode step can be compiled or captured.
    `rows(start, stop)` is a view of some rows (the engine prefills one request's row while the
    others decode); attention reads only the first `length` slots, the longest row in use.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # (B, nh, S, hs) each

    @classmethod
    def empty(
        cls, batch_size: int, max_len: int, n_head: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> KVCache:
        shape = (batch_size, n_head, max_len, head_dim)
        return cls(zeros_on_demand(shape, dtype, device), zeros_on_demand(shape, dtype, device))

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache(self.k[start:stop], self.v[start:stop])

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
        start: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T), k, v: (B, nh, T, hs) -> slots 0..length-1 (B, nh, L, hs) twice
        # start: chunk_start(positions), where the caller has it
        T = k.shape[2]
        if start is not None:  # a prefill chunk
            self.k[:, :, start : start + T] = k  # a slice copy, faster than a scatter
            self.v[:, :, start : start + T] = v
        else:
            index = positions[:, None, :, None].expand_as(k)
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k[:, :, :length], self.v[:, :, :length]


class Linear(nn.Linear):
    """nn.Linear whose products on the CPU run on our own kernel, which reads the weights at the
    memory bandwidth, and whose weight may be stored in a smaller format (formats.py) with a
    per-row `scale`; see kernels/."""

    scale: torch.Tensor | None  # a buffer: (out,) for int8 weights

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("scale", None)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, skipped on the meta device as in embedding_init (there it
        also brings in torch's code for it)."""
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.scale)


class Embedding(nn.Embedding):
    """nn.Embedding whose table may be stored in a smaller format (formats.py), as the tied LM
    head that shares it; int8 rows are widened to float32 as they are looked up."""

    scale: torch.Tensor | None  # a buffer: (num,) for an int8 table

    def __init__(self, num: int, dim: int, weight: torch.Tensor) -> None:
        super().__init__(num, dim, _weight=weight)
        self.register_buffer("scale", None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (B, T) -> (B, T, C); bfloat16 rows become float32 when the positions are added
        rows = F.embedding(idx, self.weight)
        return rows if self.scale is None else rows.float() * self.scale[idx][..., None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.layer = config.n_head, layer_idx
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: KVCache | None, hooks: Hooks = NO_HOOKS,
    ) -> torch.Tensor:
        # x: (B, T, C), positions: (B, T), mask: (B, 1, T, L) or None for plain causal -> (B, T, C)
        B, T, C = x.shape
        nh, layer = self.n_head, self.layer
        qkv = self.c_attn(x)
        q, k, v = (t.view(B, T, nh, C // nh) for t in qkv.split(C, dim=2))  # (B, T, nh, hs) each
        for t, name in ((q, "attn.hook_q"), (k, "attn.hook_k"), (v, "attn.hook_v")):
            hooks(t, name, layer)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        explicit = hooks.wants("attn.hook_pattern", layer)  # then the weights are computed explicitly
        y = None
        if cache is not None:
            assert mask is not None  # hidden_states masks whenever there is a cache
            start = chunk_start(positions)  # a prompt's chunk on the CPU: our causal kernel (kernels/)
            k, v = cache.update(positions, k, v, mask.shape[-1], start)  # (B, nh, L, hs)
            if start is not None and not explicit:
                y = prefill_attention(qkv, cache.k, cache.v, start, nh, self.scale)  # (B, T, C) or None
        if y is None:
            if explicit:
                scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, L)
                if mask is None:
                    mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
                weights = hooks((scores + mask).softmax(dim=-1), "attn.hook_pattern", layer)
                y = weights @ v  # (B, nh, T, hs)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
                )  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, C)
        hooks(y.view(B, T, nh, C // nh), "attn.hook_z", layer)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer = layer_idx
        self.c_fc = Linear(config.n_embd, config.mlp_width)
        self.act = nn.GELU(approximate=ACTIVATIONS[config.activation_function])
        self.c_proj = Linear(config.mlp_width, config.n_embd)

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        # x: (B, T, C) -> (B, T, C)
        h = hooks(self.c_fc(x), "mlp.hook_pre", self.layer)  # (B, T, n_inner)
        many = (self.act.approximate == "tanh" and h.numel() >= 2**16 and h.device.type == "cpu"
                and not h.requires_grad)  # a GPU runs torch's GELU as one kernel
        return self.c_proj(hooks(gelu_tanh(h) if many else self.act(h), "mlp.hook_post", self.layer))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, layer_idx)
        self.layer = layer_idx

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
        cache: KVCache | None, hooks: Hooks = NO_HOOKS,
    ) -> torch.Tensor:
        # x: (B, T, C) -> (B, T, C); each hook point named as TransformerLens names it (hooks.py)
        layer = self.layer
        x = hooks(x, "hook_resid_pre", layer)
        attn_out = hooks(self.attn(self.ln_1(x), positions, mask, cache, hooks), "hook_attn_out", layer)
        x = hooks(x + attn_out, "hook_resid_mid", layer)
        mlp_out = hooks(self.mlp(self.ln_2(x), hooks), "hook_mlp_out", layer)
        return hooks(x + mlp_out, "hook_resid_post", layer)


def embedding_init(num: int, dim: int) -> torch.Tensor:
    """GPT-2's N(0, 0.02) table, skipped on the meta device, where the loader builds the model:
    torch's meta normal_ costs seconds of imports and its values are discarded."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)
    return weight


class GPT2(nn.Module):
    if TYPE_CHECKING:  # given to the class by pretrained.py, which owns loading and imports this file
        from_pretrained: ClassVar[Callable[..., GPT2]]
        save_pretrained: Callable[..., None]

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        V, P, C = config.vocab_size, config.n_positions, config.n_embd
        self.wte = Embedding(V, C, embedding_init(V, C))  # shared with the head: may be formatted
        self.wpe = nn.Embedding(P, C, _weight=embedding_init(P, C))
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding (again after weights are assigned)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
            self.lm_head.scale = self.wte.scale

    def make_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """A preallocated KV cache, one KVCache per layer, for `max_len` positions per row."""
        if max_len > self.config.n_positions:
            raise GPT2EngineError(
                f"a cache of {max_len} positions exceeds the model's context "
                f"of {self.config.n_positions}"
            )
        dtype = dtype or self.dtype
        device = device or self.device
        c = self.config
        return [KVCache.empty(batch_size, max_len, c.n_head, c.head_dim, dtype, device) for _ in self.h]

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def blocks(self) -> list[Block]:
        """The decoder blocks, typed (iterating `h`, an nn.ModuleList, gives plain Modules)."""
        return cast("list[Block]", list(self.h))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and the cache (the weights' may be smaller: formats.py)."""
        return self.ln_f.weight.dtype

    def hidden_states(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None,
        cache: list[KVCache] | None = None, length: int | None = None, hooks: Hooks = NO_HOOKS,
        stop_at_layer: int | None = None,
    ) -> torch.Tensor:
        # idx: (B, T) token ids, positions: (B, T) or None for 0..T-1 -> final hidden (B, T, C)
        # With a cache, attention reads its first `length` slots (default: all of them). `hooks`
        # records and steers activations at the named points (hooks.py). With `stop_at_layer` L, only
        # the blocks before it run, and the residual stream there (B, T, C), block L's
        # hook_resid_pre, is returned.
        B, T = idx.shape
        if positions is None:
            if self.config.n_positions < T:
                raise GPT2EngineError(
                    f"input of {T} tokens is longer than the model's context "
                    f"of {self.config.n_positions}"
                )
            positions = torch.arange(T, device=idx.device).expand(B, T)
        mask = None  # plain causal attention over the T tokens of this call
        if cache is not None:  # a query at position p sees the cache slots 0..p of its row
            slots = torch.arange(length or cache[0].k.shape[2], device=idx.device)
            hidden = (slots > positions[..., None])[:, None]  # (B, 1, T, L)
            # additive, not boolean: torch's CPU attention runs a third faster with it
            mask = torch.zeros(hidden.shape, dtype=self.dtype, device=idx.device).masked_fill_(
                hidden, float("-inf"))
        x = hooks(self.wte(idx), "hook_embed") + hooks(self.wpe(positions), "hook_pos_embed")
        caches: list[KVCache | None] = list(cache) if cache else [None] * len(self.h)
        for block, layer_cache in zip(self.h[:stop_at_layer], caches, strict=False):
            x = block(x, positions, mask, layer_cache, hooks)
        if stop_at_layer is not None:
            return hooks(x, "hook_resid_pre", stop_at_layer) if stop_at_layer < len(self.h) else x
        return hooks(self.ln_f(x), "ln_final.hook_normalized")

    def forward(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None,
        cache: list[KVCache] | None = None, length: int | None = None, hooks: Hooks = NO_HOOKS,
    ) -> torch.Tensor:
        # idx: (B, T), positions: (B, T) or None -> logits (B, T, V)
        return self.lm_head(self.hidden_states(idx, positions, cache, length, hooks))

    @torch.inference_mode()
    def run_with_cache(
        self, idx: torch.Tensor, names: list[str] | None = None, hooks: Hooks | None = None,
        stop_at_layer: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TransformerLens' `run_with_cache`: the logits and the activations at `names` (default:
        every hook point), float32 in TransformerLens' shapes (hooks.py). `hooks` instead of `names`
        also steers (its capture is then what is recorded). With `stop_at_layer`, as TransformerLens,
        only the blocks before it run and the residual stream there comes back in place of logits
        (what an activation dataset needs of a middle layer: not the rest, nor the LM head)."""
        # idx: (B, T) -> logits (B, T, V) or residual (B, T, C), float32; {name: (B, T, ...) float32}
        if hooks is None:
            hooks = Hooks(check_hooks(names if names is not None else hook_names(self.config.n_layer),
                                      self.config.n_layer))
        hidden = self.hidden_states(idx.to(self.device), hooks=hooks, stop_at_layer=stop_at_layer)
        out = hidden if stop_at_layer is not None else self.lm_head(hidden)
        missing = [name for name in hooks.capture if name not in hooks.cache]
        if missing:
            raise GPT2EngineError(f"{missing[0]!r} comes after stop_at_layer={stop_at_layer}")
        return out.float(), {name: hooks.cache[name].float() for name in hooks.capture}
