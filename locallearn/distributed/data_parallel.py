"""Data-parallel local learning: every rank holds all K blocks and trains them on its shard of each batch.

Why not ``DistributedDataParallel``: DDP reduces gradients in hooks fired by one ``backward()`` over the whole model
and expects every forward to go through its wrapper. Local learning runs K backward passes and K optimizer steps per
batch, one per block, and block k's auxiliary net is called by the method, not by the block. Wrapping each block with
its auxiliary net in its own DDP would need the method's forward to go through each wrapper; reducing by hand is
shorter and lets the guard see reduced values. So block k's gradients are averaged right after block k's own
backward, in one flat all-reduce per block and dtype (the bucket DDP would make), with block k's loss in the same
message: :meth:`LocalLearner.step_block` calls :meth:`DataParallel.sync_gradients` before the non-finite guard, so
every rank sees the same averaged loss and gradients and steps or skips alike.

What is identical on every rank after every step:

* parameters (same start: rank 0's weights are broadcast when wrapping; same averaged gradients, same optimizer);
* MAN's EMA copies (updated from identical parameters, by the same arithmetic);
* buffers (BatchNorm running statistics): each rank normalises with its own shard's batch statistics, as DDP does,
  and rank 0's buffers are broadcast after every step (DDP's ``broadcast_buffers=True``). ``sync_bn`` (CUDA only:
  torch's ``SyncBatchNorm`` runs on GPUs) makes the batch statistics global instead.

What differs from one process training on the whole batch: the BatchNorm batch statistics (per shard, unless
``sync_bn``) and the order of floating-point sums. ``--batch-size`` is the global batch: each of N ranks trains on
B/N examples of the same seeded batch a single process would train on, so the schedule, the step count and the
checkpoints are those of a single-process run.

Inside a pipeline (:mod:`locallearn.distributed.pipeline`, ``--dist.replicas``) the same exchange runs over a
subgroup: the replicas of one pipeline stage average the gradients of that stage's blocks only (``group`` and
``blocks``), and the group's first rank is the source of the broadcasts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from locallearn.distributed.context import DistContext
from locallearn.errors import UserError


def _flatten(tensors: list[Tensor]) -> list[tuple[list[Tensor], Tensor]]:
    """``tensors`` grouped by dtype, each group with one flat copy (the bucket a collective sends)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    return [(group, torch.cat([t.reshape(-1) for t in group])) for group in by_dtype.values()]


def _unflatten(group: list[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` back into the tensors of ``group``, in place."""
    offset = 0
    for t in group:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


def block_tensors(learner: Any, blocks: range) -> list[Tensor]:
    """The parameters and buffers of ``blocks`` and of their auxiliary nets (``method.block_state``), each once."""
    out: list[Tensor] = []
    for b in blocks:
        out += [*learner.blocks[b].parameters(), *learner.blocks[b].buffers()]
        for item in learner.method.block_state(b):
            out += [item] if isinstance(item, torch.Tensor) else [*item.parameters(), *item.buffers()]
    return _unique(out)


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` without repeats (shared tensors such as tied weights once), in order."""
    seen: set[int] = set()
    unique = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


def _flat_collective(tensors: list[Tensor], collective, divide: int = 1) -> None:
    """Run ``collective`` (an in-place ``dist`` call on one tensor) over ``tensors`` flattened, one call per dtype,
    then divide by ``divide`` and copy the results back in place."""
    for group, flat in _flatten(tensors):
        collective(flat)
        if divide != 1:
            flat.div_(divide)
        _unflatten(group, flat)


def _flat_reduce(tensors: list[Tensor], world: int, group=None) -> None:
    """Average ``tensors`` across the ``world`` ranks of ``group`` in place (SUM, then divide: gloo has no AVG)."""
    _flat_collective(tensors, lambda flat: dist.all_reduce(flat, group=group), divide=world)


class _InFlight:
    """One block's gradient average in flight: the flat buffers (one per dtype) and their ``all_reduce`` works,
    started asynchronously; :meth:`finish` waits, divides and copies the averages back in place."""

    def __init__(self, tensors: list[Tensor], world: int, group=None) -> None:
        self.world = world
        self.groups = _flatten(tensors)
        self.works = [dist.all_reduce(flat, async_op=True, group=group) for _, flat in self.groups]

    def finish(self) -> None:
        for work, (group, flat) in zip(self.works, self.groups):
            work.wait()
            flat.div_(self.world)
            _unflatten(group, flat)


def _flat_broadcast(tensors: list[Tensor], src: int = 0, group=None) -> None:
    """``tensors`` of (global) rank ``src`` on every rank of ``group``, in place."""
    _flat_collective(tensors, lambda flat: dist.broadcast(flat, src=src, group=group))


def convert_sync_batchnorm(learner: Any, device: torch.device) -> None:
    """Replace every BatchNorm of the blocks and auxiliary nets by ``nn.SyncBatchNorm`` (same parameters and
    buffers, so the optimizers still hold them). CUDA only: torch's SyncBatchNorm refuses CPU tensors."""
    if device.type != "cuda":
        raise UserError(
            "--dist.sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); on CPU leave it off: each rank "
            "normalises with its shard's statistics and rank 0's running statistics are broadcast every step"
        )
    learner.blocks = [nn.SyncBatchNorm.convert_sync_batchnorm(block) for block in learner.blocks]
    for name, child in list(learner.method.named_children()):
        setattr(learner.method, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


class DataParallel:
    """Make ``learner`` train data-parallel over the process group of ``ctx``.

    Sets the learner's ``grad_sync`` (gradients and loss of block k averaged before its step) and ``eval_reduce``
    (evaluation counts summed), and broadcasts rank 0's parameters and buffers so every rank starts alike.
    Call :meth:`train_step` instead of ``learner.train_step``: it also broadcasts the buffers after the step.

    ``group`` (a ``dist.new_group``; None: every rank) and ``blocks`` (None: all) narrow the exchange to the ranks
    of the group and the state of those blocks: a pipeline stage's replicas (:mod:`locallearn.distributed.pipeline`).

    Example (under ``torchrun --nproc-per-node 2``)::

        ctx = init_from_env(torch.device("cpu"))
        dp = DataParallel(LocalLearner(model, "dgl", 4, input_shape=(3, 32, 32)), ctx)
        for x, y in my_sharded_loader:  # each rank its own examples
            dp.train_step(x, y)
    """

    def __init__(
        self, learner: Any, ctx: DistContext, overlap: bool = True, group=None, blocks: range | None = None
    ) -> None:
        if not learner.built:
            raise UserError("DataParallel needs a built learner: pass input_shape=(C, H, W) to LocalLearner")
        self.learner, self.ctx, self.group, self.blocks = learner, ctx, group, blocks
        self.size = ctx.world if group is None else dist.get_world_size(group)  # the ranks averaged over
        self.src = 0 if group is None else dist.get_global_rank(group, 0)  # the source of broadcasts
        self.in_flight: dict[int, tuple[_InFlight, Tensor | None]] = {}
        learner.grad_sync = self.sync_gradients
        learner.grad_sync_start = self.start_gradients if overlap else None
        if group is None:
            learner.eval_reduce = self.sum_counts
        learner.where = f" on rank {ctx.rank}"
        self.broadcast_state()

    def _state_tensors(self, buffers_only: bool = False) -> list[Tensor]:
        if self.blocks is not None:
            owned = block_tensors(self.learner, self.blocks)
            return [t.data for t in owned if not buffers_only or not isinstance(t, nn.Parameter)]
        modules = (self.learner.model, self.learner.method)
        out = [b for m in modules for b in m.buffers()]
        if not buffers_only:
            out = [p.data for m in modules for p in m.parameters()] + out
        return _unique(out)

    @torch.no_grad()
    def broadcast_state(self) -> None:
        """The source rank's parameters and buffers on every rank of the group."""
        _flat_broadcast(self._state_tensors(), self.src, self.group)

    @staticmethod
    def _message(optimizer: torch.optim.Optimizer, loss: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        extra = None if loss is None else loss.detach().float().reshape(1).clone()
        return grads + ([] if extra is None else [extra]), extra

    @torch.no_grad()
    def start_gradients(self, k: int, optimizer: torch.optim.Optimizer, loss: Tensor | None) -> None:
        """Start averaging block k's gradients (and loss) without waiting: the engine calls this right after block
        k's backward and steps block k only after block k+1's backward, so the exchange runs behind that work
        (:func:`locallearn.engine.train_blocks`); :meth:`sync_gradients` then waits for it."""
        tensors, extra = self._message(optimizer, loss)
        self.in_flight[k] = (_InFlight(tensors, self.size, self.group), extra)

    @torch.no_grad()
    def sync_gradients(self, k: int, optimizer: torch.optim.Optimizer, loss: Tensor | None) -> Tensor | None:
        """Average block k's gradients (and its loss) over the ranks, in place; returns the averaged loss. Waits for
        the exchange :meth:`start_gradients` began, or makes it now (blocking).

        Every rank must hold gradients for the same parameters (the same model on the same code path does); a
        parameter without a gradient on every rank is left without one."""
        if k in self.in_flight:
            exchange, extra = self.in_flight.pop(k)
            exchange.finish()
        else:
            tensors, extra = self._message(optimizer, loss)
            _flat_reduce(tensors, self.size, self.group)
        return extra.reshape(()) if extra is not None else None

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """The source rank's floating buffers (BatchNorm running statistics) on every rank, as DDP's
        ``broadcast_buffers``."""
        floating = [b for b in self._state_tensors(buffers_only=True) if b.is_floating_point()]
        if floating:
            _flat_broadcast(floating, self.src, self.group)

    def sum_counts(self, sums: Tensor) -> None:
        dist.all_reduce(sums)

    def train_step(self, x, y=None, **kwargs) -> dict[str, Tensor]:
        """``learner.train_step`` on this rank's shard, gradients averaged block by block, then the buffers synced."""
        stats = self.learner.train_step(x, y, **kwargs)
        self.after_step(stats, getattr(x, "y", y))
        return stats

    def after_step(self, stats: dict[str, Tensor], labels: Tensor | None) -> None:
        """After a step: the buffers synced and the training accuracies made the whole batch's."""
        self.sync_buffers()
        global_accuracies(stats, labels, self.group)

    def agree_stop(self, signum: int | None) -> int | None:
        """The signal any rank received (the largest number), or None: every rank stops at the same step."""
        return agree_stop(signum, self.ctx.device, self.group)


def agree_stop(signum: int | None, device: torch.device, group=None) -> int | None:
    """The signal any rank of ``group`` received (the largest number), or None, on every rank of it."""
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item()) or None


@torch.no_grad()
def global_accuracies(stats: dict[str, Tensor], labels: Tensor | None, group=None) -> None:
    """Replace each block's training accuracy (``acc/k``) in ``stats`` with the whole batch's, not this rank's
    shard's: one small all-reduce of (accuracy × shard size, shard size), so unequal shards weigh right. The losses
    are already averaged with the gradients (:meth:`DataParallel.sync_gradients`)."""
    keys = [key for key in stats if key.startswith("acc/")]
    if not keys or labels is None:
        return
    n = float(labels.shape[0])
    shard = torch.full((1,), n, dtype=torch.float64, device=labels.device)
    flat = torch.cat([torch.stack([stats[key].detach().double().reshape(()) for key in keys]) * n, shard])  # no sync
    dist.all_reduce(flat, group=group)
    for i, key in enumerate(keys):
        stats[key] = (flat[i] / flat[-1]).to(device=stats[key].device, dtype=stats[key].dtype)


def gather_to_writer(obj: Any, ctx: DistContext) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, …]`` on rank 0, None on the others."""
    out = [None] * ctx.world if ctx.is_writer else None
    dist.gather_object(obj, out, dst=0)
    return out
