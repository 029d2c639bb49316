"""The training step and evaluation loop: nothing method-specific lives here.

For each block k: ``out = block_k(h)``; ``loss_k = method.local_loss(k, out, batch)``; ``loss_k.backward()``; then
``h = out.detach()``. Block k's autograd graph is released by its own backward before block k+1 runs, so the peak
activation memory is that of one block and its auxiliary net, not of the whole network.

Step order (``step_order``):

* ``"per_block"`` (default, DGL's order): block k's optimizer steps and its gradients are freed right after its own
  backward. Only one block's gradients exist at a time (less memory than holding all K), and a block never waits for
  the blocks after it — the property pipelining across devices needs. For every method whose block k reads nothing
  of block k+1 this gives bit-for-bit the same result as ``"after_all"``, because block k+1's input is detached
  before block k's parameters change (tested in ``tests/test_engine.py``).
* ``"after_all"`` (the InfoPro/MAN reference code: one ``optimizer.step()`` per iteration after every backward).
  It holds every block's gradients at once (more memory) and gives the same weights as ``"per_block"`` for every
  method, MAN included: block k's EMA update reads block k+1's layer in the same state under both orders (before
  block k+1's step with ``ema_timing="before_next_step"``, right after it with ``"after_next_step"``), tested.

Under data parallelism with overlap (``learner.grad_sync_start``, :mod:`locallearn.distributed.data_parallel`),
``"per_block"`` starts block k's gradient average right after its backward and steps block k right after block
k+1's backward instead, so the exchange runs behind block k+1's forward and backward. The same weights, bit for
bit, by the argument above: block k+1's input was detached before block k's step, and block k steps before block
k+1 does. Two blocks' gradients exist at a time instead of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.losses import at_least_fp32

TOP_K = 5  # the second accuracy ImageNet papers report (top-5)


class LocalLearner(Protocol):
    """What the engine reads of a learner (:class:`locallearn.learner.LocalLearner` is the one locallearn has): the
    blocks, the method, and block k's backward and optimizer step. Typed as a protocol so that the engine sits below
    the learner and imports nothing of it."""

    blocks: Sequence[nn.Module]
    method: Any  # a locallearn.methods.LocalMethod
    model: nn.Module
    device: torch.device
    step_order: str
    optimizers: Sequence[torch.optim.Optimizer]
    grad_sync_start: Callable[[int, torch.optim.Optimizer, Tensor | None], None] | None

    def autocast(self) -> ContextManager: ...

    def learns(self, k: int) -> bool: ...

    def forward_loss(self, k: int, h: Tensor, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]: ...

    def backward(self, k: int, loss: Tensor) -> None: ...

    def step_block(self, k: int, loss: Tensor | None = None, stats: dict[str, Tensor] | None = None) -> Any: ...


def autocast_context(device: torch.device, amp: str | None) -> ContextManager:
    """bf16 or fp16 autocast when asked for, else a no-op context (nanoGPT's ``ctx``)."""
    if amp in (None, "", "none"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def train_step(learner: LocalLearner, batch) -> dict[str, Tensor]:
    """One optimisation step of every block on ``batch``; returns detached per-block losses and accuracies."""
    stats, _ = train_blocks(learner, batch, batch.x, range(len(learner.blocks)))
    return stats


def train_blocks(
    learner: LocalLearner,
    batch,
    h: Tensor,
    blocks: range,
    before_block: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Train the contiguous ``blocks`` on input ``h`` (the output of the block before them, or ``batch.x``).

    Returns the detached per-block statistics and the detached output of the last of them. A pipeline stage
    (:mod:`locallearn.distributed.pipeline`) runs its own range of blocks with this; :func:`train_step` runs all.
    ``before_block(k)`` runs before block k's forward, ``after_step(k)`` after its optimizer step:
    the stage waits for, and sends, the parameters that cross stages there.
    """
    stats: dict[str, Tensor] = {}

    def step(k: int) -> None:  # block k's optimizer step (the guard may replace its loss by the reduced one)
        stats[f"loss/{k}"] = learner.step_block(k, stats[f"loss/{k}"], stats)
        if after_step is not None:
            after_step(k)

    learning = [k for k in blocks if learner.learns(k)]  # a method's phase may train only some blocks
    start_sync = learner.grad_sync_start if learner.step_order == "per_block" else None
    deferred: int | None = None  # a block whose gradient exchange is in flight: it steps after the next backward
    for k in blocks:
        if not learning or k > learning[-1]:
            break  # nothing after the last learning block needs to run
        if not learner.learns(k):
            with torch.no_grad(), learner.autocast():  # frozen in this phase (evaluation mode, set by the learner)
                h = learner.blocks[k](h)
            continue
        if before_block is not None:
            before_block(k)
        with learner.autocast():
            out, loss, logits = learner.forward_loss(k, h, batch)  # block k and its local loss (compiled or not)
        learner.backward(k, loss)  # frees block k's graph: the memory saving of local learning happens here
        stats[f"loss/{k}"] = loss.detach()
        if start_sync is not None:  # data parallel: block k's exchange runs behind block k+1's forward and backward
            start_sync(k, learner.optimizers[k], stats[f"loss/{k}"])
            if deferred is not None:
                step(deferred)
            deferred = k
        elif learner.step_order == "per_block":
            step(k)
        if logits is not None:
            stats[f"acc/{k}"] = (logits.detach().argmax(1) == batch.y).float().mean()
        h = out.detach()  # the gradient boundary
    if deferred is not None:
        step(deferred)
    if learner.step_order == "after_all":
        for k in learning:
            step(k)
    return stats, h


@torch.no_grad()
def eval_blocks(learner: LocalLearner, h: Tensor, y: Tensor, blocks: range, sums: Tensor) -> Tensor:
    """Forward the contiguous ``blocks`` on ``h`` in inference mode, adding to ``sums`` (one row per block of the
    model: correct predictions of its classifier; the last block's row also holds the summed test loss).

    Returns the output of the last of ``blocks``. Inference runs the plain backbone; auxiliary nets are only read to
    report per-block accuracy. Columns: correct predictions, "has a classifier" (> 0 once a batch went through a
    block with a head), summed loss, examples, top-5 correct predictions and "top-5 counted" (the last four on the
    last block's row; top-5 is ImageNet's second figure, InfoPro Table 4, counted only with more than 5 classes)."""
    num_blocks = len(learner.blocks)
    method = learner.method
    for k in blocks:
        with learner.autocast():
            h = learner.blocks[k](h)
            logits = h if k == num_blocks - 1 else method.aux_logits(k, h)
        if logits is not None:
            sums[k, 0] += (logits.argmax(1) == y).sum()
            sums[k, 1] = 1  # this block has a classifier
        if k == num_blocks - 1:
            sums[k, 2] += F.cross_entropy(at_least_fp32(h), y, reduction="sum").double()
            sums[k, 3] += y.numel()
            if h.shape[1] > TOP_K:
                sums[k, 4] += (h.topk(TOP_K, dim=1).indices == y[:, None]).any(1).sum()
                sums[k, 5] = 1
    return h


def eval_sums(learner: LocalLearner) -> Tensor:
    """Zeroed accumulators for :func:`eval_blocks`: ``[K, 6]`` float64 (correct, has head, loss sum, examples,
    top-5 correct, top-5 counted)."""
    return torch.zeros(len(learner.blocks), 6, dtype=torch.float64, device=learner.device)


def eval_report(sums: Tensor) -> dict:
    """The evaluation dict from (possibly all-reduced) :func:`eval_blocks` sums; ``test_top5_accuracy`` is None
    with 5 classes or fewer (where every label is in the top 5)."""
    rows = sums.cpu().tolist()
    total = rows[-1][3]
    accs = [r[0] / max(total, 1) if r[1] > 0 else None for r in rows]
    top5 = rows[-1][4] / max(total, 1) if rows[-1][5] > 0 else None
    return {
        "test_accuracy": accs[-1],
        "test_top5_accuracy": top5,
        "test_loss": rows[-1][2] / max(total, 1),
        "block_accuracies": accs,
    }


@torch.no_grad()
def evaluate(learner: LocalLearner, batches: Iterable, reduce=None) -> dict:
    """Test accuracy of the network and of each block's auxiliary classifier (in block order).

    ``reduce``, when given, sums the accumulators across processes in place (data-parallel evaluation, each
    process on its shard of the test set) before the accuracies are computed. Counts are float64: exact up to 2^53.
    """
    model, method = learner.model, learner.method
    was_training = model.training
    model.eval()
    method.eval()
    sums = eval_sums(learner)
    everything = range(len(learner.blocks))
    for batch in batches:
        eval_blocks(learner, batch.x, batch.y, everything, sums)
    model.train(was_training)
    method.train(was_training)
    if reduce is not None:
        reduce(sums)
    return eval_report(sums)
