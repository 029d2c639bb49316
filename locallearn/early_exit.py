"""Anytime inference from the local heads: a trained learner as an early-exit network (issue 29).

Every locally trained network ends with K classifiers, one per block: the auxiliary classifier each block learned
from (DGL's and AugLocal's heads, InfoPro's task head, MAN's and MAN++'s auxiliary nets with their copies of the next
block's first layer) and the network's own. Early-exit networks (BranchyNet, Teerapittayanon et al., ICPR 2016;
MSDNet, Huang et al., ICLR 2018) train such exits on purpose with one end-to-end loss; local learning has them for
free. :class:`EarlyExit` runs the blocks in order and, for each sample, answers with the first auxiliary classifier
whose top softmax probability reaches ``threshold`` — the confidence criterion of BranchyNet's entropy test and
MSDNet's anytime setting — and with the network's own classifier otherwise. Samples that have exited leave the
batch: later blocks run on the rest only, which is where the compute is saved.

Code names: ``blocks[k]`` is the paper's block k (``f_k``); ``method.aux_logits(k, h)`` its auxiliary classifier
(the ``w_k`` of DGL's ``L(w_k, f_k(h))``); ``threshold`` is the confidence threshold τ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from locallearn.errors import UserError


class EarlyExit(nn.Module):
    """The learner's blocks and auxiliary classifiers as one inference module with exits.

    ``forward(x)`` returns ``(logits, exits)``: the class scores each sample answered with ``[N, classes]`` and the
    index of the block that answered ``[N]`` (``K - 1``: the network's own classifier). Blocks without a classifier
    are passed through. Inference only: the module is put in evaluation mode and runs without gradients.

    Args:
        learner: a trained :class:`locallearn.learner.LocalLearner` (built on the first batch if it is not yet).
        threshold: τ in [0, ∞): a sample exits at the first auxiliary classifier whose top softmax probability is
            at least τ. Above 1 no sample exits early (the plain network's answers); 0 answers every sample with the
            first auxiliary classifier.
    """

    def __init__(self, learner: Any, threshold: float) -> None:
        super().__init__()
        if not isinstance(threshold, (int, float)) or threshold != threshold or threshold < 0:
            raise UserError(f"early_exit threshold must be a number >= 0 (a softmax probability), got {threshold!r}")
        if learner.method.name in ("e2e", "softhebb"):
            what = "trains the network's own classifier only" if learner.method.name == "e2e" else "has no heads"
            raise UserError(
                f"early_exit needs auxiliary classifiers, and {learner.method.name} {what}: use a learner trained "
                "with dgl, infopro, auglocal or a MAN variant"
            )
        self.threshold = float(threshold)
        self._learner = (learner,)  # a tuple: the learner is not a module; its blocks and method are registered below
        self.eval()
        if learner.built:
            self._attach()

    def _attach(self) -> None:
        learner = self._learner[0]
        self.blocks = nn.ModuleList(learner.blocks)
        self.method = learner.method
        self.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "blocks"):  # built on the first batch, as train_step does
            learner = self._learner[0]
            learner.build(tuple(x.shape[1:]))
            self._attach()
        return exit_rule(list(self.blocks), self.method.aux_logits, x, self.threshold)


def exit_rule(
    blocks: Sequence[Callable[[Tensor], Tensor]],
    head: Callable[[int, Tensor], Tensor | None],
    x: Tensor,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    """Run ``blocks`` in order; after block k (not the last) ``head(k, h)`` gives its classifier's logits (None: no
    classifier), and the samples whose top softmax probability reaches ``threshold`` leave with them; the last
    block's output answers the rest. Returns (logits, exit block per sample). Shared by :class:`EarlyExit` and the
    exported early-exit graphs (:func:`locallearn.export.load_early_exit`)."""
    last = len(blocks) - 1
    exits = torch.full((x.shape[0],), last, dtype=torch.long, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)  # which samples are still running
    answered: Tensor | None = None
    h = x
    for k, block in enumerate(blocks):
        h = block(h)
        logits = h if k == last else head(k, h)
        if logits is None:
            continue
        if answered is None:
            answered = logits.new_empty((x.shape[0], logits.shape[1]))
        if k == last:
            answered[rows] = logits
            break
        done = logits.softmax(dim=1).amax(dim=1) >= threshold
        answered[rows[done]] = logits[done]
        exits[rows[done]] = k
        rows, h = rows[~done], h[~done]
        if rows.numel() == 0:
            break
    return answered, exits
