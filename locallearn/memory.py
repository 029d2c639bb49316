"""Where training memory goes: per-layer activation costs, memory-balanced splits, and peak-memory estimates.

Two tools, both honest on a CPU:

* :func:`estimate_peak` runs real training steps of a :class:`LocalLearner` on *fake* tensors
  (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage) under PyTorch's ``MemTracker``, which
  follows every tensor's lifetime and reports the peak split into parameters, gradients, optimizer state,
  activations and temporaries. ResNet-152 at batch 256 is estimated on a laptop. With ``fake=False`` the same
  tracker counts real tensors, which is how the estimate is checked (``tests/test_memory.py``).
* :func:`balanced_boundaries` picks the K−1 cuts that minimise the largest block's activation memory plus its
  auxiliary net's, from costs measured per layer and per possible cut (InfoPro* moves cuts earlier for the same
  reason: early high-resolution layers dominate).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from locallearn.assembly import assemble
from locallearn.data import Batch
from locallearn.errors import UserError
from locallearn.models import resolve_split
from locallearn.module_copy import clone_module, fake_copy


def saved_bytes(fn, *args, exclude: nn.Module | None = None) -> tuple[Any, int]:
    """Run ``fn(*args)`` and return its result and the bytes autograd saves for backward (each storage once).

    The saved tensors are what a block keeps alive between its forward and its backward: its activation memory.
    Tensors of ``exclude`` (the parameters, which autograd saves too but which exist anyway) are not counted.
    """
    skip = {storage_key(t) for t in [*exclude.parameters(), *exclude.buffers()]} if exclude else set()
    seen: dict[StorageWeakRef, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def storage_key(t: Tensor) -> StorageWeakRef:
    """Identity of a tensor's storage that works for fake tensors too (a data pointer does not)."""
    return StorageWeakRef(t.untyped_storage())


def _output_bytes(h: Tensor) -> int:
    return h.numel() * h.element_size()


def layer_costs(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> list[int]:
    """Saved-activation bytes of each atomic layer for a batch of ``batch`` (train mode, real tensors).

    Activation memory is linear in the batch size, so costs measured at a small batch rank splits exactly as at the
    training batch.
    """
    was_training = model.training
    model.train()
    h = torch.zeros(batch, *input_shape, requires_grad=True)
    costs = []
    for layer in model.layers:
        h, cost = saved_bytes(layer, h, exclude=layer)
        costs.append(cost)
        h = h.detach().requires_grad_(True)
    model.train(was_training)
    return costs


def head_costs(
    model: nn.Module,
    method: str,
    options: dict[str, Any] | None,
    input_shape: tuple[int, ...],
    batch: int = 2,
    recompute_aux: bool = False,
) -> list[int]:
    """Bytes the method's auxiliary net keeps for backward (plus the block output it reads) at every possible cut.

    Entry j is the cost of a block that ends just before layer j (j = 1 .. L−2), from a throw-away copy of the model
    cut after every feature layer (:func:`locallearn.assembly.assemble`); entry 0 and the last are 0. Each
    auxiliary-net segment (``LocalMethod.aux_segment``: MAN's copies, a head, a decoder) is measured on its own.
    Stored, the segments' activations add up; with ``recompute_aux`` (``checkpointing="aux"``) only the inputs of the
    segments stay and one segment at a time is rebuilt in backward, so the cost is the inputs plus the largest segment.
    """
    probe_model = clone_module(model)
    n = probe_model.num_layers() - 1  # feature layers: a block after every one
    bounds = resolve_split(probe_model, "layerwise", n)
    blocks, method_module = assemble(probe_model, method, bounds, input_shape, options)
    segments: list[int] = []
    inputs: dict[StorageWeakRef, int] = {}
    if recompute_aux:
        skip = {storage_key(t) for t in [*method_module.parameters(), *method_module.buffers()]}

        def probing_segment(modules, fn, *args):
            own = {storage_key(a): a.untyped_storage().nbytes() for a in args if isinstance(a, Tensor)}
            inputs.update(own)  # a recomputed segment keeps only its inputs between forward and backward
            seen: dict[StorageWeakRef, int] = {}

            def pack(t: Tensor) -> Tensor:
                key = storage_key(t)
                if key not in skip and key not in own:
                    seen[key] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # innermost: the outer count skips it
                out = fn(*args)
            segments.append(sum(seen.values()))
            return out

        method_module.aux_segment = probing_segment  # instance attribute: this method is thrown away
    raw = torch.rand(batch, *input_shape)
    batch_obj = Batch(raw, torch.arange(batch) % 2, raw)
    costs = [0] * (probe_model.num_layers())
    h = raw
    with torch.no_grad():
        outputs = []
        for block in blocks[:-1]:
            h = block(h)
            outputs.append(h)
    for k, out in enumerate(outputs):
        out = out.detach().requires_grad_(True)
        segments.clear()
        inputs.clear()
        _, rest = saved_bytes(lambda o, k=k: method_module.local_loss(k, o, batch_obj).loss, out, exclude=method_module)
        inputs.pop(storage_key(out), None)  # counted below as the block output
        inputs.pop(storage_key(raw), None)  # the batch exists anyway
        aux = sum(inputs.values()) + max(segments, default=0)  # both 0 unless recompute_aux
        costs[k + 1] = rest + aux + _output_bytes(out)
    return costs


def split_costs(
    model: nn.Module,
    method: str,
    options: dict[str, Any] | None,
    input_shape: tuple[int, ...],
    recompute_aux: bool = False,
) -> tuple[list[int], list[int]]:
    """(per-layer, per-cut) saved bytes at batch 2: the two inputs of :func:`balanced_boundaries`.

    Computed on fake tensors (shapes and dtypes, no storage, whatever device ``model`` is on): planning allocates
    neither the activations nor the throw-away auxiliary nets at every possible cut, which for DGL's heads on a
    ResNet-101 at 224×224 were several GiB. Byte counts are those of real tensors (tested). Cached per model
    structure, method, options, input shape and recomputation, so ``bench`` and the learner plan once.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (
        type(model).__qualname__,
        tuple((name, tuple(p.shape)) for name, p in model.named_parameters()),
        repr(model),
        method,
        repr(sorted((options or {}).items())),
        tuple(input_shape),
        recompute_aux,
    )
    if key not in _COSTS:
        with FakeTensorMode() as mode:
            fake = fake_copy(model, mode)
            cuts = head_costs(fake, method, options, input_shape, recompute_aux=recompute_aux)
            layers = layer_costs(fake, input_shape)
        _COSTS[key] = (layers, cuts)
    layers, cuts = _COSTS[key]
    return list(layers), list(cuts)


_COSTS: dict[tuple, tuple[list[int], list[int]]] = {}


def balanced_boundaries(layer_cost: list[int], cut_cost: list[int], k: int) -> list[int]:
    """The K−1 boundaries minimising max over blocks of (Σ layer costs + the auxiliary cost at its end).

    ``layer_cost`` has one entry per atomic layer (the classifier last, always in the last block); ``cut_cost[j]``
    is the auxiliary cost of a block ending just before layer j. Exact dynamic programming, O(K·L²).
    """
    n = len(layer_cost) - 1  # feature layers; boundaries lie in 1..n-1
    if not 1 <= k <= n:
        raise UserError(f"K={k} does not fit a model with {n} layers to split: choose 1 <= K <= {n}")
    prefix = [0]
    for c in layer_cost:
        prefix.append(prefix[-1] + c)
    total = len(layer_cost)

    def block(i: int, j: int) -> int:  # layers i..j-1; the last block (j = total) has no auxiliary net
        return prefix[j] - prefix[i] + (cut_cost[j] if j < total else 0)

    inf = float("inf")
    # best[m][j]: minimal max cost of splitting layers 0..j-1 into m blocks
    best = [[inf] * (total + 1) for _ in range(k + 1)]
    arg = [[0] * (total + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for m in range(1, k + 1):
        ends = [total] if m == k else range(m, n)
        for j in ends:
            for i in range(m - 1, j):
                if best[m - 1][i] == inf:
                    continue
                cost = max(best[m - 1][i], block(i, j))
                if cost < best[m][j]:
                    best[m][j], arg[m][j] = cost, i
    bounds, j = [], total
    for m in range(k, 1, -1):
        j = arg[m][j]
        bounds.append(j)
    return sorted(bounds)


def split_cost(layer_cost: list[int], cut_cost: list[int], bounds: list[int]) -> int:
    """The largest block's activation + auxiliary cost under ``bounds`` (what :func:`balanced_boundaries` minimises)."""
    edges = [0, *bounds, len(layer_cost)]
    return max(sum(layer_cost[a:b]) + (cut_cost[b] if b < len(layer_cost) else 0) for a, b in zip(edges, edges[1:]))


def _frozen_safe_tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenSafeTracker(MemTracker):
        """MemTracker registers a gradient hook on every parameter, which PyTorch refuses for frozen ones (MAN's EMA
        copies). Unfreeze them only while the hooks are registered; frozen again, they never produce a gradient."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            frozen = [p for p in module.parameters() if not p.requires_grad]
            for p in frozen:
                p.requires_grad_(True)
            try:
                return super()._track_module_params_and_buffers(module, install_grad_hooks)
            finally:
                for p in frozen:
                    p.requires_grad_(False)

    return FrozenSafeTracker


def active_fake_mode():
    """The ``FakeTensorMode`` in force, or None."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode)), None)


@dataclass
class MemoryEstimate:
    """Peak training memory in bytes and its parts at that moment (MemTracker's categories)."""

    peak: int
    parts: dict[str, int]


def estimate_peak(
    build, input_shape: tuple[int, ...], batch_size: int, num_classes: int, *, steps: int = 2, fake: bool = True
) -> MemoryEstimate:
    """Peak memory of ``steps`` training steps of the learner that ``build()`` returns.

    Args:
        build: a callable returning a fresh :class:`LocalLearner`; it is called inside ``FakeTensorMode`` when
            ``fake`` so that no real memory is allocated.
        input_shape: (C, H, W).
        batch_size: the training batch.
        num_classes: label range.
        steps: training steps tracked (the second has the optimizer state, so ≥ 2).
        fake: fake tensors (an estimate of any size) or real tensors (a measurement).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _FrozenSafeTracker = _frozen_safe_tracker_class()
    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    with ctx:
        learner = build()
        x = torch.rand(batch_size, *input_shape)
        y = torch.randint(0, num_classes, (batch_size,))
        tracker = _FrozenSafeTracker()
        tracker.track_external(learner.model, learner.method, *learner.optimizers)
        with tracker:
            for _ in range(steps):
                learner.train_step(Batch(x, y, x))
                tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")
    parts: dict[str, int] = {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = key if isinstance(key, str) else key.value
            parts[name] = parts.get(name, 0) + int(value)
    return MemoryEstimate(peak=parts.pop("Total", sum(parts.values())), parts=parts)
