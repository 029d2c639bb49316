"""Compiled blocks (issue 30 item 1): each block's forward and local loss as one ``torch.compile`` graph.

A block and its auxiliary net are a small, static graph that no gradient leaves — the natural unit of compilation:
block k's function ``h ↦ (out, loss, logits)`` (``block_k(h)``, then ``method.local_loss(k, out, batch)``) is
compiled on its own, its backward by AOTAutograd with it, and no graph ever spans two blocks. The optimizer step,
the non-finite guard and a method's ``after_step`` (MAN's EMA update) stay eager: they run once per block per step
on a handful of tensors, and keeping them out keeps every method's state handling exactly as it is.

Batch sizes: the graphs are specialised to the first training batch's size (static shapes: the fastest kernels). A
batch of another size — the short last batch of an epoch — runs eagerly instead, so an epoch never triggers a
recompile of every block (``dynamic=False`` would recompile K graphs for it, automatic dynamic shapes would
recompile K graphs as dynamic ones and run every later step slower). Same arithmetic either way, up to float
rounding.

Compile time: the first compiled step compiles every block's forward and backward (tens of seconds on a CPU).
:attr:`CompiledBlocks.seconds` is that step's wall time, which the runner reports as ``compile_seconds`` and leaves
out of the training throughput.

Modes (``--train.compile``): ``default``, ``reduce-overhead`` (CUDA graphs on a GPU; as ``default`` on a CPU),
``max-autotune`` (searches kernels: longer compile).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

BACKEND = "inductor"
"""``torch.compile``'s backend. Tests set "aot_eager": Dynamo's capture and AOTAutograd's joint graph as with
inductor (the parts that decide what a compiled block computes: guards, parameter and buffer updates, the
backward), without generating kernels, which takes most of a compile's minute."""


class CompiledBlocks:
    """Per block, ``forward_loss(k, h, batch) -> (out, loss, logits)``: compiled for the first batch size seen,
    eager for any other. ``blocks`` and ``method`` are the learner's (read at each call, never copied)."""

    def __init__(self, blocks: list[nn.Module], method: Any, mode: str) -> None:
        self.mode = mode
        self.batch_size: int | None = None  # what the graphs are specialised to: the first training batch's size
        self.seconds = 0.0  # wall time of the step that compiled (its compiling and that one step's compute)
        self._eager = [_forward_loss(blocks, method, k) for k in range(len(blocks))]
        options = {"mode": None if mode == "default" or BACKEND != "inductor" else mode, "dynamic": False}
        self._compiled = [torch.compile(fn, backend=BACKEND, **options) for fn in self._eager]

    def __call__(self, k: int, h: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.batch_size is None:
            self.batch_size = h.shape[0]
        fn = self._compiled[k] if h.shape[0] == self.batch_size else self._eager[k]
        return fn(h, batch)

    def compiles(self, batch_size: int) -> bool:
        """Whether a step on ``batch_size`` samples is the one that compiles (the first of the compiled size)."""
        return self.seconds == 0 and batch_size == (self.batch_size or batch_size)


def _forward_loss(blocks: list[nn.Module], method: Any, k: int) -> Callable[[Tensor, Any], tuple]:
    """Block k's ``h ↦ (out, loss, logits)``, as a function with a code object of its own: Dynamo keeps its compiled
    graphs per code object (at most ``recompile_limit``, 8, each), so K blocks sharing one would evict each other's
    graphs and fall back to eager past the eighth."""

    def forward_loss(h: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        out = blocks[k](h)
        loss, logits = method.local_loss(k, out, batch)
        return out, loss, logits

    name = f"block{k}_forward_loss"
    code = forward_loss.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, forward_loss.__globals__, name, None, forward_loss.__closure__)
