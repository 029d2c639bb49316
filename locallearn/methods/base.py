"""The interface every local-learning method implements, and the registry it is listed in.

Data flow for one batch (the engine runs it; a method never calls ``backward`` or ``step``)::

    h_0 = x
    for k in 0..K-1:
        h_k = block_k(h_{k-1}.detach())
        loss_k, logits_k = method.local_loss(k, h_k, batch)   # the last block: CE on the real classifier
        loss_k.backward(); opt_k.step(); method.after_step(k)

A method owns the auxiliary networks (``nn.Module`` attributes of the method) and says which of its parameters each
block's optimizer steps (``block_params``). Adding a method means one new file in ``locallearn/methods/`` holding a
config dataclass and a ``LocalMethod`` subclass decorated with ``@register_method``.

What a method may take over from the engine, each a general hook with a default that changes nothing:

* ``make_optimizer(k, params, optim)`` and ``block_lr(k, lr, phase, phase_epoch)``: block k's own optimizer and
  schedule (SoftHebb: a plain Hebbian step for its layers, Adam with a step schedule for its classifier);
* ``phases(epochs)``: stretches of the run in which only some blocks learn, each with its length and batch size
  (SoftHebb's unsupervised phase, then the classifier's); a block outside the learning set runs in evaluation mode
  without gradients, and blocks after the last learning one do not run;
* :class:`ForwardTaps`: the inputs and outputs of any module inside a block during its training forward, when a
  loss needs more than the block's output (SoftHebb: its convolution's input and pre-activation u);
* ``report()``: numbers to log at every epoch's end (SoftHebb: filter-norm statistics per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from locallearn import recompute
from locallearn.errors import UserError
from locallearn.feature_heads import width_of
from locallearn.heads import Shape
from locallearn.losses import classification_loss
from locallearn.registry import Registry


@dataclass
class MethodConfig:
    """Options every method shares. Subclasses add their own fields."""


@dataclass
class SetupInfo:
    """What a method needs to build its auxiliary networks.

    Attributes:
        blocks: the K blocks (they share the model's layers).
        shapes: output shape (C, H, W) of each block, from one probe batch.
        num_classes: classes of the task.
        image_shape: (C, H, W) of the input images.
        layer_stages: stage index of the first layer of each block (MAN ramps λ by stage).
        next_layers: for block k < K-1 the first atomic layer of block k+1 (MAN's EMA source), else None.
        model: the whole layered model (AugLocal samples later layers from it).
        bounds: the K-1 block boundaries (block k is ``model.layers[bounds[k-1]:bounds[k]]``).
        layer_shapes: output shape of every atomic layer, canonical ((C, H, W) maps, (T, D) tokens, (D,)
            vectors: :mod:`locallearn.feature_heads`); the last is (num_classes,).
        layouts: layout of every atomic layer's output ("nchw", "nhwc", "tokens", "vector").
        token_pool: how the model's own head pools tokens, ("token" | "avg", prefix tokens), or None.
    """

    blocks: list[nn.Sequential]
    shapes: list[Shape]
    num_classes: int
    image_shape: Shape
    layer_stages: list[int]
    next_layers: list[nn.Module | None]
    model: nn.Module | None = None
    bounds: list[int] | None = None
    layer_shapes: list[Shape] | None = None
    layouts: list[str] | None = None
    token_pool: tuple[str, int] | None = None

    @property
    def feature_width(self) -> int:
        """Width of the classifier's input: channels of the last feature map (64 in a CIFAR ResNet), or the
        model width D of a transformer."""
        if self.layer_shapes and len(self.layer_shapes) > 1:
            return width_of(self.layer_shapes[-2], self.layout(len(self.layer_shapes) - 2))
        return max(s[0] for s in self.shapes[:-1])

    def layout(self, layer: int) -> str:
        """Layout of atomic layer ``layer``'s output ("nchw" for locallearn's own models)."""
        return self.layouts[layer] if self.layouts else "nchw"

    def block_layout(self, k: int) -> str:
        """Layout of block k's output."""
        if not self.layouts or self.bounds is None:
            return "nchw"
        return self.layouts[self.bounds[k] - 1 if k < len(self.bounds) else len(self.layouts) - 1]


@dataclass(frozen=True)
class Phase:
    """A stretch of a run in which only the blocks in ``learning`` learn (see :meth:`LocalMethod.phases`).

    Attributes:
        name: shown in the run log and the metrics ("hebbian", "classifier").
        learning: indices of the blocks that learn; the others keep their weights and run in evaluation mode.
        epochs: length in epochs of the training data.
        batch_size: batch size of this phase; None: the run's ``--batch-size``.
    """

    name: str
    learning: tuple[int, ...]
    epochs: int
    batch_size: int | None = None


class ForwardTaps:
    """The last input and output of watched modules, recorded during training forwards with gradients enabled.

    ``taps.watch("conv0", module)`` registers a forward hook; ``taps.pop("conv0")`` returns ``(input, output)`` of the
    module's last such forward and forgets it (so nothing outlives the block's step). The tensors are those autograd
    keeps for the backward pass anyway: recording them costs no memory. Evaluation forwards are not recorded."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []

    def watch(self, key: str, module: nn.Module) -> None:
        def hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
            if mod.training and torch.is_grad_enabled():
                self._seen[key] = (args[0], output)

        self._handles.append(module.register_forward_hook(hook))

    def pop(self, key: str) -> tuple[Tensor, Tensor]:
        try:
            return self._seen.pop(key)
        except KeyError:
            raise RuntimeError(f"no training forward of {key!r} was recorded before its loss") from None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()


class LocalOutput(NamedTuple):
    loss: Tensor
    logits: Tensor | None  # classifier output of this block's head, for the per-block accuracy; None if it has none


class LocalMethod(nn.Module):
    """Base class: the last block is trained by cross-entropy on the network's own classifier.

    Subclasses implement ``build_aux`` and ``aux_loss`` for blocks ``k < K-1``; the base class handles the last block
    so the engine has no special case (DGL's convention).
    """

    name: str = "base"
    config_class: type[MethodConfig] = MethodConfig
    recompute_aux: bool = False  # set by LocalLearner(checkpointing="aux"): see aux_segment
    aux_summary: str | None = None  # one line for the run log on what build_aux chose (and why), if anything
    uses_raw: bool = False  # its losses read ``batch.raw`` (the [0, 1] images): a pipeline stage then sends them on
    any_model: bool = True  # trains any classifier cut into blocks (False: only its own architectures, e.g. SoftHebb)
    label_smoothing: float = 0.0  # set by LocalLearner(label_smoothing=...): every classifier's cross-entropy reads it

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_class()
        self.num_blocks = 0

    # -- construction --------------------------------------------------------------------------------------------
    def setup(self, info: SetupInfo) -> None:
        """Build the auxiliary networks for ``info.blocks``; called once, before the optimizers are built."""
        self.num_blocks = len(info.blocks)
        self.build_aux(info)

    def build_aux(self, info: SetupInfo) -> None:
        """Create the heads of blocks 0..K-2 (no-op for end-to-end)."""

    def block_params(self, k: int) -> list[nn.Parameter]:
        """The method's trainable parameters that block k's optimizer owns (its auxiliary net)."""
        return []

    def make_optimizer(self, k: int, params: list[nn.Parameter], optim: Any) -> torch.optim.Optimizer | None:
        """Block k's optimizer over ``params`` (its block's and its auxiliary net's), or None for the run's default
        (SGD from ``optim``, an :class:`locallearn.optim.OptimConfig`)."""
        return None

    def block_lr(self, k: int, lr: float, phase: Phase | None, phase_epoch: int) -> float:
        """Learning rate of block k's optimizer for the next step, given the run's schedule value ``lr``, the phase in
        progress (None: the run has no phases) and the epoch within it (0-based)."""
        return lr

    def phases(self, epochs: int) -> list[Phase] | None:
        """The run's phases, given its ``--epochs``; None (the default): one phase of ``epochs`` in which every block
        learns at the run's batch size."""
        return None

    def epoch_phases(self, epochs: int) -> list[tuple[Phase | None, int]]:
        """Every epoch of a run of ``epochs`` as (its phase, its index within the phase): :meth:`phases` laid out epoch
        by epoch, or ``epochs`` epochs of phase None. ``locallearn train`` and :meth:`LocalLearner.fit` both walk it."""
        phases = self.phases(epochs)
        if phases is None:
            return [(None, e) for e in range(epochs)]
        return [(phase, e) for phase in phases for e in range(phase.epochs)]

    def report(self) -> dict[str, float]:
        """Numbers about the method's state for the log and the metrics at the end of every epoch."""
        return {}

    def describe_report(self, report: dict[str, float]) -> str:
        """One log line for :meth:`report`'s numbers."""
        return " ".join(f"{key}={value:.4g}" for key, value in report.items())

    def compile_refusal(self) -> str | None:
        """Why this method's blocks cannot be compiled (``torch.compile``, :mod:`locallearn.compiled`), or None. The
        learner refuses ``compile`` with this reason before anything is built."""
        return None

    def soft_target_refusal(self) -> str | None:
        """Why this method cannot train on soft targets (mixup, cutmix), or None when every loss it has reads them.
        The learner refuses such a run before its first step with this reason."""
        return None

    # -- training ------------------------------------------------------------------------------------------------
    def local_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        """Loss of block k given its output ``h``; the engine calls ``backward`` on it."""
        if k == self.num_blocks - 1:
            return LocalOutput(self.task_loss(h, batch), h)
        return self.aux_loss(k, h, batch)

    def task_loss(self, logits: Tensor, batch: Any) -> Tensor:
        """Cross-entropy of any classifier of the method (the network's own or an auxiliary one) against the batch's
        target: its soft targets when mixup or cutmix made them, else its labels with ``label_smoothing``
        (:func:`locallearn.losses.classification_loss`)."""
        return classification_loss(logits, batch.y, getattr(batch, "soft", None), self.label_smoothing)

    def aux_shape(self, k: int, info: SetupInfo) -> Shape:
        """Shape of what block k's heads read; MAN changes it (the next layer's output shape)."""
        return info.shapes[k]

    def aux_layout(self, k: int, info: SetupInfo) -> str:
        """Layout of what block k's heads read (see :mod:`locallearn.feature_heads`)."""
        return info.block_layout(k)

    def aux_input(self, k: int, h: Tensor) -> Tensor:
        """What block k's heads read, given the block's output; MAN adds the EMA and learnable copies here."""
        return h

    def aux_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        raise NotImplementedError(f"{self.name} defines no auxiliary loss for block {k}")

    def aux_segment(self, modules: tuple[nn.Module, ...], fn: Callable[..., Any], *args: Any) -> Any:
        """Run one segment of an auxiliary net (``fn(*args)``, which uses ``modules``). With ``recompute_aux`` its
        activations are recomputed in backward rather than kept (:func:`locallearn.recompute.checkpoint`), so the
        segments of a block's auxiliary net never hold their activations at the same time. Same arithmetic."""
        if not self.recompute_aux:
            return fn(*args)
        return recompute.checkpoint(fn, *args, modules=modules)

    def after_step(self, k: int) -> None:
        """Called after block k's optimizer step (MAN's EMA update lives here)."""

    # -- what crosses a block boundary (pipelining) ----------------------------------------------------------------
    def downstream_reads(self) -> dict[int, nn.Module]:
        """Modules of block k+1 whose live parameters block k's auxiliary state reads, by k (MAN: the first layer of
        block k+1). Empty for methods whose block k reads nothing of block k+1 (DGL, InfoPro, AugLocal).

        When block k+1 trains in another process (:mod:`locallearn.distributed.pipeline`), that process sends the
        module's parameters upstream after each of its steps; block k's process copies them into its own replica of
        the module and calls :meth:`downstream_stepped` (k), exactly as the sequential engine would."""
        return {}

    def downstream_stepped(self, k: int) -> None:
        """Block k+1 has just taken an optimizer step (its live parameters changed); block k may update what it keeps
        of them. Called by ``after_step(k + 1)``'s owner, or by a pipeline stage receiving block k+1's parameters."""

    def block_state(self, k: int) -> list[nn.Module | nn.Parameter]:
        """The modules and parameters whose state belongs to block k's auxiliary net (trainable or not): element k of
        every per-block ``ModuleList``/``ParameterList`` child. A pipeline stage sends these, with its blocks, to
        rank 0 for checkpoints and the final model; a method keeping per-block state elsewhere overrides this."""
        owned: list[nn.Module | nn.Parameter] = []
        for child in self.children():
            if isinstance(child, (nn.ModuleList, nn.ParameterList)) and k < len(child):
                owned.append(child[k])
        return owned

    # -- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def aux_logits(self, k: int, h: Tensor) -> Tensor | None:
        """Class scores of block k's auxiliary classifier, for per-block test accuracy; None if it has none."""
        return None


METHODS: Registry[type[LocalMethod]] = Registry("method")


def register_method(name: str) -> Callable[[type[LocalMethod]], type[LocalMethod]]:
    def decorator(cls: type[LocalMethod]) -> type[LocalMethod]:
        cls.name = name
        METHODS.register(name)(cls)
        return cls

    return decorator


def build_method_config(cls: type[LocalMethod], options: dict[str, Any] | None) -> MethodConfig:
    """Make ``cls.config_class`` from a dict, rejecting unknown keys and values of the wrong type."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UserError(
            f"method {cls.name!r} has no option(s) {', '.join(unknown)}: it takes "
            f"{', '.join(sorted(fields)) or 'no options'}"
        )
    defaults = cls.config_class()
    for key, value in options.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            options[key] = float(value)
        elif getattr(defaults, key) is not None and not isinstance(value, expected):
            raise UserError(f"method option {key}={value!r} should be a {expected.__name__}")
    return cls.config_class(**options)


def create_method(name: str, options: dict[str, Any] | None = None) -> LocalMethod:
    """``create_method("dgl", {"n_conv": 2})``: the method instance, not yet set up."""
    cls = METHODS.get(name)
    return cls(build_method_config(cls, options))
