"""Activation recomputation (``torch.utils.checkpoint``) that leaves training state exactly as without it.

Two places trade compute for memory this way:

* ``checkpointing="stage"``: each stage of a block is recomputed in the backward pass, the baseline local learning is
  measured against (and a knob that composes with it);
* ``checkpointing="aux"``: each *segment of a block's auxiliary net* (MAN's copies of the next layer, a classifier
  head, a reconstruction decoder) is recomputed in its own backward. The auxiliary net is several branches read from
  one block output; without recomputation all their activations are alive together at the start of the block's
  backward, with it only one segment's at a time. On MAN's ImageNet heads the auxiliary net holds more activations
  than the block it trains (``docs/benchmarks/memory.md``), so this is where local learning's peak can still shrink.

A plain ``torch.utils.checkpoint`` runs BatchNorm twice per step, so running statistics take two momentum updates
from the same batch. :func:`checkpoint` snapshots the BatchNorm buffers of the modules it is given when the
recomputation starts and restores them when it ends, so parameters *and* buffers after a step are bit-identical to
a run without recomputation (tested). The recomputation replays the forward's RNG state (dropout) as well.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import checkpoint as torch_checkpoint


@contextlib.contextmanager
def batchnorm_stats_restored(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore every BatchNorm running statistic under ``modules`` to its value on entry, however the block exits
    (the checkpoint's early stop leaves a recomputation by an exception)."""
    saved = [
        (buf, buf.detach().clone())
        for module in modules
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _contexts(modules: tuple[nn.Module, ...]) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), batchnorm_stats_restored(modules)


def checkpoint(fn: Callable[..., Any], *args: Any, modules: Iterable[nn.Module]) -> Any:
    """``fn(*args)``, its activations recomputed in backward instead of stored (non-reentrant
    ``torch.utils.checkpoint``); ``modules`` are those ``fn`` runs, whose BatchNorm statistics the recomputation must
    not move. Without autograd recording (evaluation, ``no_grad``) it simply calls ``fn``.

    In a compiled block (:mod:`locallearn.compiled`) the checkpoint is traced into the block's graph as it is, with no
    context of ours: AOTAutograd recomputes the segment's pure operations in the backward graph, while buffer updates
    (BatchNorm statistics) stay in the forward graph, once. Same state as eager, tested."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    context_fn = functools.partial(_contexts, tuple(modules))
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
