"""The Python side of step.c: a model's whole decode step as one C call.

The structs below mirror step.c's and kernels.h's. They hold the addresses of the model's tensors
and of one cache, so a DecodeStep is built once for a model as it is and its cache
(engine/runner.py), and keeps references to all of those tensors.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int, c_void_p

import torch

from gpt2engine.hooks import RESIDUAL_HOOKS, split_name
from gpt2engine.kernels import FORMAT_CODES, MAX_ATTENTION_SLOTS, CFunction, compiled
from gpt2engine.model import GPT2, Embedding, KVCache, Linear

ACTIVATION_CODES = {"tanh": 2, "none": 3}  # kernels.h: GELU_TANH, GELU_ERF


def tap_index(name: str, n_layer: int) -> int | None:
    """step.c's tap for a hook point: 3 layer + (0 resid_pre, 1 resid_mid, 2 resid_post), 3 n_layer
    for ln_final.hook_normalized; None for the points only the model's forward pass has."""
    if name == "ln_final.hook_normalized":
        return 3 * n_layer
    layer, short = split_name(name)
    return None if layer is None or short not in RESIDUAL_HOOKS else 3 * layer + RESIDUAL_HOOKS.index(short)


class Weight(ctypes.Structure):
    _fields_ = [("data", c_void_p), ("scale", c_void_p), ("bias", c_void_p), ("format", c_int),
                ("in_features", c_int), ("out_features", c_int)]


class Layer(ctypes.Structure):
    _fields_ = [("ln_1_weight", c_void_p), ("ln_1_bias", c_void_p), ("attn", Weight), ("attn_proj", Weight),
                ("ln_2_weight", c_void_p), ("ln_2_bias", c_void_p), ("fc", Weight), ("mlp_proj", Weight),
                ("k_cache", c_void_p), ("v_cache", c_void_p), ("attn_scale", c_float)]


class Model(ctypes.Structure):
    _fields_ = [("n_layer", c_int), ("n_embd", c_int), ("n_head", c_int), ("n_inner", c_int),
                ("max_len", c_int), ("activation", c_int), ("eps", c_float), ("wte", Weight),
                ("wpe", c_void_p), ("layers", POINTER(Layer)), ("ln_f_weight", c_void_p),
                ("ln_f_bias", c_void_p), ("head", Weight)]


def address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def weight(module: Linear | Embedding) -> Weight:
    w = module.weight
    return Weight(address(w), address(module.scale), address(getattr(module, "bias", None)),
                  FORMAT_CODES[w.dtype], w.shape[1], w.shape[0])


def fits(model: GPT2, cache: list[KVCache]) -> bool:
    """Whether step.c can run this model over this cache: on the CPU, in float32 with weights in
    one of our formats, contiguous, outside autograd, within the attention's slot limit."""
    formatted = {id(m.weight) for m in model.modules() if isinstance(m, Linear)} | {id(model.wte.weight)}
    for t in [*model.parameters(), *model.buffers(), *(c.k for c in cache), *(c.v for c in cache)]:
        wanted = FORMAT_CODES if id(t) in formatted else (torch.float32,)
        if t.device.type != "cpu" or t.dtype not in wanted or not t.is_contiguous() or t.requires_grad:
            return False
    act = model.blocks[0].mlp.act.approximate
    return (len(cache) == len(model.h) and act in ACTIVATION_CODES
            and 0 < cache[0].k.shape[2] <= MAX_ATTENTION_SLOTS)


class DecodeStep:
    """One decode step of `model` over `cache` (its rows 0..B-1) in one call of step.c."""

    def __init__(self, model: GPT2, cache: list[KVCache], kernel: CFunction) -> None:
        c = model.config
        self.cache, self.kernel = cache, kernel
        # the tensors whose addresses the structs hold, kept alive even if the model's are replaced
        self.tensors = [*model.parameters(), *model.buffers()]
        self.layers = (Layer * c.n_layer)(*(
            Layer(address(b.ln_1.weight), address(b.ln_1.bias), weight(b.attn.c_attn), weight(b.attn.c_proj),
                  address(b.ln_2.weight), address(b.ln_2.bias), weight(b.mlp.c_fc), weight(b.mlp.c_proj),
                  address(layer.k), address(layer.v), b.attn.scale)
            for b, layer in zip(model.blocks, cache, strict=True)))
        self.struct = Model(c.n_layer, c.n_embd, c.n_head, c.mlp_width, cache[0].k.shape[2],
                            ACTIVATION_CODES[model.blocks[0].mlp.act.approximate], c.layer_norm_epsilon,
                            weight(model.wte), address(model.wpe.weight), self.layers,
                            address(model.ln_f.weight), address(model.ln_f.bias), weight(model.lm_head))
        self.vocab_size, self.rows, self.max_len = c.vocab_size, cache[0].k.shape[0], cache[0].k.shape[2]
        self.n_layer, self.n_embd = c.n_layer, c.n_embd

    @classmethod
    def build(cls, model: GPT2, cache: list[KVCache]) -> DecodeStep | None:
        """The fused step for this model and cache, or None where it does not apply (then the
        caller runs model.forward, torch's path)."""
        kernels = compiled()
        if kernels is None or not fits(model, cache):
            return None
        return cls(model, cache, kernels.decode_step)

    def __call__(self, tokens: list[int], positions: list[int], steer: dict[int, torch.Tensor] | None = None,
                 capture: dict[int, torch.Tensor] | None = None,
                 rows: list[int] | None = None) -> torch.Tensor:
        # tokens, positions: B each -> logits (B, V); step row b feeds cache row rows[b] (default b)
        # steer: tap -> (B, C) added there; capture: tap -> (B, C) written there (tap_index)
        B = len(tokens)
        rows = list(range(B)) if rows is None else rows
        if not (0 < B == len(positions) == len(rows) and 0 <= min(tokens) <= max(tokens) < self.vocab_size
                and 0 <= min(positions) <= max(positions) < self.max_len
                and 0 <= min(rows) <= max(rows) < self.rows):
            raise ValueError("decode step: tokens, positions or rows out of range")
        ids, where, cache_rows = torch.tensor(tokens), torch.tensor(positions), torch.tensor(rows)
        logits = torch.empty(B, self.vocab_size)
        self.kernel(ctypes.byref(self.struct), ids.data_ptr(), where.data_ptr(), cache_rows.data_ptr(), B,
                    logits.data_ptr(), torch.get_num_threads(), self.taps(steer, B), self.taps(capture, B))
        return logits

    def taps(self, tensors: dict[int, torch.Tensor] | None, B: int) -> ctypes.Array | None:
        """step.c's table of tap pointers (NULL where a tap is unused), or None for no taps."""
        if not tensors:
            return None
        table = (c_void_p * (3 * self.n_layer + 1))()
        for index, t in tensors.items():
            if t.shape != (B, self.n_embd) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("decode step: a tap must be a contiguous float32 (B, C) tensor")
            table[index] = t.data_ptr()
        return table
