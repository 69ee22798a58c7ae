"""One request's hook points across its forward passes: the activations it captures and the
steering it adds (hooks.py names them, model.py calls them).

A request whose hooks are all on the residual stream (and ln_final) decodes in the batch's fused
step on the CPU, which taps those points (kernels/step.c); any other runs through the model's own
forward pass, alone in its row (runner.py). Either way the requests beside it in a batch compute
exactly what they would without it. Its activations arrive a prefill chunk or one decoded
position at a time and are joined here.
"""

from __future__ import annotations

import torch

from gpt2engine.hooks import Hooks, Steering, split_name
from gpt2engine.kernels.step import tap_index


class RequestHooks:
    def __init__(self, capture: tuple[str, ...], steering: tuple[Steering, ...], n_layer: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.capture = capture
        self.dtype = dtype
        steered = [s.hook for s in steering]
        self.taps = {name: tap_index(name, n_layer) for name in (*capture, *steered)}
        # whether the fused step can run it: its taps add one vector per point
        self.in_step = None not in self.taps.values() and len(set(steered)) == len(steered)
        # (hook, coefficient * vector (C,), first position steered), in the order given
        self.steering = [(s.hook, s.coefficient * torch.tensor(s.vector, dtype=torch.float32, device=device),
                          s.start) for s in steering]
        self.pieces: dict[str, list[torch.Tensor]] = {name: [] for name in capture}
        self.covered = 0  # positions captured so far, from 0

    def for_positions(self, start: int, stop: int) -> Hooks:
        """The hooks of one forward pass over positions [start, stop) of the request's row."""
        steer: dict[str, list[torch.Tensor]] = {}
        for hook, add, first in self.steering:
            if first >= stop:
                continue
            if first > start:  # steered from a position inside this pass
                add = add * (torch.arange(start, stop, device=add.device) >= first)[:, None]  # (T, C)
            steer.setdefault(hook, []).append(add.to(self.dtype))
        return Hooks(self.capture, steer)

    def step_steering(self, position: int) -> dict[int, torch.Tensor]:
        """The fused step's taps -> the vector (C,) added there, at `position`."""
        return {self.tap(hook): add for hook, add, first in self.steering if position >= first}

    def tap(self, name: str) -> int:
        index = self.taps[name]
        assert index is not None  # in_step
        return index

    def keep_step(self, captured: dict[int, torch.Tensor], row: int, position: int) -> None:
        """What the fused step captured in `row` (taps -> (B, C)), at `position`."""
        for name in self.capture:
            self.pieces[name].append(captured[self.tap(name)][row : row + 1].clone())
        self.covered = position + 1

    def keep(self, hooks: Hooks, stop: int) -> None:
        """What a pass ending at position `stop` captured, its batch of one dropped."""
        for name in self.capture:
            self.pieces[name].append(hooks.cache[name][0].to("cpu", torch.float32))
        self.covered = stop

    def activations(self) -> dict[str, torch.Tensor]:
        """Each name's activations over positions 0..covered-1, in TransformerLens' shapes without
        the batch: (pos, ...), and (head, query_pos, key_pos) for the pattern, zero above the diagonal."""
        out = {}
        for name, pieces in self.pieces.items():
            if split_name(name)[1] != "attn.hook_pattern":
                out[name] = torch.cat(pieces) if pieces else torch.empty(0)
                continue
            n = self.covered
            pattern = torch.zeros(pieces[0].shape[0], n, n) if pieces else torch.empty(0)
            row = 0
            for piece in pieces:  # (nh, T, L): queries row..row+T-1 over keys 0..L-1
                pattern[:, row : row + piece.shape[1], : piece.shape[2]] = piece
                row += piece.shape[1]
            out[name] = pattern
        return out
