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
  It matters only for MAN, whose EMA copy in block k reads block k+1's live layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from locallearn.losses import at_least_fp32

if TYPE_CHECKING:
    from locallearn.learner import LocalLearner


def autocast_context(device: torch.device, amp: str | None) -> ContextManager:
    """bf16 autocast when asked for, else a no-op context (nanoGPT's ``ctx``)."""
    if amp in (None, "", "none"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(learner: LocalLearner, batch) -> dict[str, Tensor]:
    """One optimisation step of every block on ``batch``; returns detached per-block losses and accuracies."""
    stats: dict[str, Tensor] = {}
    h = batch.x
    for k, block in enumerate(learner.blocks):
        with learner.autocast():
            out = block(h)
            loss, logits = learner.method.local_loss(k, out, batch)
        loss.backward()  # frees block k's graph: the memory saving of local learning happens here
        stats[f"loss/{k}"] = loss.detach()
        if learner.step_order == "per_block":
            learner.step_block(k, stats[f"loss/{k}"])
        if logits is not None:
            stats[f"acc/{k}"] = (logits.detach().argmax(1) == batch.y).float().mean()
        h = out.detach()  # the gradient boundary
    if learner.step_order == "after_all":
        for k in range(len(learner.blocks)):
            learner.step_block(k, stats[f"loss/{k}"])
    return stats


@torch.no_grad()
def evaluate(learner: LocalLearner, batches: Iterable) -> dict:
    """Test accuracy of the network and of each block's auxiliary classifier (in block order).

    Inference runs the plain backbone; auxiliary nets are only read to report per-block accuracy.
    """
    model, method = learner.model, learner.method
    was_training = model.training
    model.eval()
    method.eval()
    num_blocks = len(learner.blocks)
    correct = [torch.zeros((), dtype=torch.long, device=learner.device) for _ in range(num_blocks)]
    has_head = [False] * num_blocks
    loss_sum = torch.zeros((), device=learner.device)
    total = 0
    for batch in batches:
        h = batch.x
        for k, block in enumerate(learner.blocks):
            with learner.autocast():
                h = block(h)
                logits = h if k == num_blocks - 1 else method.aux_logits(k, h)
            if logits is not None:
                has_head[k] = True
                correct[k] += (logits.argmax(1) == batch.y).sum()
        loss_sum += F.cross_entropy(at_least_fp32(h), batch.y, reduction="sum")
        total += batch.y.numel()
    model.train(was_training)
    method.train(was_training)
    accs = [c.item() / max(total, 1) if has else None for c, has in zip(correct, has_head)]
    return {"test_accuracy": accs[-1], "test_loss": loss_sum.item() / max(total, 1), "block_accuracies": accs}
