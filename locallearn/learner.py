"""``LocalLearner``: the object a user holds — a model cut into K blocks, a method, and one optimizer per block.

Example::

    model = locallearn.create_model("resnet32", num_classes=10, in_channels=1)
    learner = locallearn.LocalLearner(model, method="dgl", K=4, input_shape=(1, 28, 28))
    stats = learner.train_step(x, y)          # {"loss/0": ..., "acc/3": ...}
    report = learner.evaluate(test_batches)   # {"test_accuracy": ..., "block_accuracies": [...]}
    history = learner.fit(train_loader, epochs=5, test=test_loader)  # the same, epoch after epoch

Every bit of training state (backbone, auxiliary nets, EMA copies, optimizer momenta, step counter) is in
``state_dict()``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from locallearn import engine, recompute
from locallearn.assembly import setup_info
from locallearn.compiled import CompiledBlocks
from locallearn.data import Batch, as_batch
from locallearn.early_exit import EarlyExit
from locallearn.errors import CheckpointError, UserError
from locallearn.heads import Shape
from locallearn.memory import balanced_boundaries, split_costs
from locallearn.methods import LocalMethod, Phase, SetupInfo, create_method
from locallearn.metrics import RunningMeans
from locallearn.models import LayeredModel, as_layered, describe_split, resolve_split, split_model
from locallearn.nonfinite import NonFiniteGuard, OptimizerSnapshot
from locallearn.optim import OptimConfig, build_optimizer, check_optim, lr_at, no_weight_decay_ids, set_lr
from locallearn.options import AMP, CHECKPOINTING, COMPILE_MODES, NONFINITE, STEP_ORDERS


class CheckpointedSequential(nn.Module):
    """Runs ``segments`` in order, recomputing all but the last in the backward pass (activation checkpointing)."""

    def __init__(self, segments: list[nn.Module]) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)

    def forward(self, x: Tensor) -> Tensor:
        for segment in self.segments[:-1]:
            if self.training and torch.is_grad_enabled():
                x = recompute.checkpoint(segment, x, modules=(segment,))
            else:
                x = segment(x)
        return self.segments[-1](x)


def checkpoint_by_stage(model: LayeredModel, block: nn.Sequential, start: int) -> nn.Module:
    """Group a block's layers by stage (stem, stage 1, …) and checkpoint each group but the last.

    The recomputation restores BatchNorm running statistics (see :mod:`locallearn.recompute`), so a step leaves
    parameters and buffers bit-identical to a step without checkpointing.
    """
    groups: list[list[nn.Module]] = []
    last_stage = None
    for offset, layer in enumerate(block):
        stage = model.stage_of[start + offset]
        if stage != last_stage:
            groups.append([])
            last_stage = stage
        groups[-1].append(layer)
    return CheckpointedSequential([nn.Sequential(*g) for g in groups])


def balanced_split(
    model: LayeredModel,
    method: str,
    options: dict | None,
    input_shape: tuple,
    k: int | None,
    recompute_aux: bool = False,
) -> list[int]:
    """Memory-balanced boundaries for ``k`` blocks (see :mod:`locallearn.memory`)."""
    if k is None:
        raise UserError("--split balanced needs --K")
    if k == 1:
        return []
    return balanced_boundaries(*split_costs(model, method, options, input_shape, recompute_aux), k)


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)`` only when something is elsewhere (a no-op ``.to`` still rebuilds fake tensors, which
    memory estimation under ``FakeTensorMode`` cannot swap)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.device != device for t in tensors):
        module.to(device)
    return module


class LocalLearner:
    """Train ``model`` as K gradient-isolated blocks with a local-learning ``method``.

    Args:
        model: any ``nn.Module`` classifier (a torchvision or timm network, your own), cut by tracing at its valid
            cut points (:mod:`locallearn.models.traced`), or a :class:`LayeredModel` (``locallearn.create_model``).
            Your module is trained in place: it holds the trained weights under its own ``state_dict`` keys.
        method: a registered method name ("e2e", "dgl", …) or a ``LocalMethod`` instance.
        K: number of blocks actually trained (``None``: 1 for e2e, else required by the split).
        split: "even", "layerwise", "balanced", a named preset ("infopro", "man", …), a list of K−1 boundaries
            (indices into the model's segments), or module names to cut after (``["layer2", "layer3.1"]``, or one
            comma-separated string).
        input_shape: (C, H, W) of one input. Optional: without it the model is cut and the auxiliary nets are built
            on the first batch ``train_step`` (or ``evaluate``) sees.
        method_options: options of the method's config dataclass.
        optim: optimizer and schedule settings.
        total_steps: length of the run, for the schedule; ``None`` keeps the learning rate at ``optim.lr``.
        steps_per_epoch: optimizer steps per epoch (for warm-up and epoch-unit schedules).
        step_order: "per_block" or "after_all" (see :mod:`locallearn.engine`).
        device: where the model and the method live; batches are moved there.
        amp: None (or "none") for full precision, "bf16" for bfloat16 autocast, "fp16" for float16 autocast with one
            ``GradScaler`` per block (CUDA only: a block whose scaler skips a step on overflow holds back no other).
        label_smoothing: ε of every classifier's cross-entropy, the network's and every auxiliary one's.
        mixing: mixes each training batch and gives it soft targets (a :class:`locallearn.mixing.BatchMixer`: mixup,
            cutmix), which every cross-entropy of the method reads; None trains on the batches as they come.
        checkpointing: what to recompute in the backward pass instead of storing (:mod:`locallearn.recompute`):
            "none"; "stage" (each stage of each block: the memory-saving alternative local learning is measured
            against); "aux" (each segment of each auxiliary net: MAN's copies, heads, decoders); "stage+aux".
        channels_last: keep weights and inputs in NHWC memory format. Same arithmetic, different kernels: on a
            2-core CPU (oneDNN) it made ResNet-32 end-to-end 19 % faster and InfoPro+MAN K=15 40 % faster; on GPUs it
            is the tensor-core layout.
        nonfinite: before each block's optimizer step its loss and gradient norm are checked: "stop" raises
            :class:`locallearn.errors.NonFiniteError` naming the block and step; "skip" skips that block's step
            (counted in ``skipped_steps``); "off" checks nothing.
        check_every: where the check is decided (:mod:`locallearn.nonfinite`): 1, on the host before each block's
            step (one host read per block per step); N > 1, on the device with no host read in the step, read every
            N steps ("stop" then raises at that read, naming the first non-finite step; "skip" still skips exactly);
            0, on the device, read only when asked (``check_nonfinite()``, ``skipped_steps``, ``state_dict()``). A run
            passes its ``--log-every``.
        compile: "off", or a ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune"): each block's
            forward and local loss compiled as one graph of its own (:mod:`locallearn.compiled`); the first step
            compiles (``compile_seconds``), a batch of another size than the first runs eagerly.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | LocalMethod = "dgl",
        K: int | None = None,
        split: str | list[int] | list[str] = "even",
        *,
        input_shape: Shape | None = None,
        method_options: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int = 1,
        step_order: str = "per_block",
        device: torch.device | str = "cpu",
        amp: str | None = None,
        channels_last: bool = False,
        checkpointing: str = "none",
        nonfinite: str = "stop",
        check_every: int = 1,
        label_smoothing: float = 0.0,
        mixing: Callable[[Batch, int], Batch] | None = None,
        compile: str = "off",
    ) -> None:
        if compile not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {compile!r}: use one of {', '.join(COMPILE_MODES)}")
        if step_order not in STEP_ORDERS:
            raise UserError(f"unknown step_order {step_order!r}: use one of {', '.join(STEP_ORDERS)}")
        if checkpointing not in CHECKPOINTING:
            raise UserError(f"unknown checkpointing {checkpointing!r}: use one of {', '.join(CHECKPOINTING)}")
        if nonfinite not in NONFINITE:
            raise UserError(f"unknown nonfinite {nonfinite!r}: use one of {', '.join(NONFINITE)}")
        if not isinstance(check_every, int) or check_every < 0:
            raise UserError(f"check_every must be a whole number >= 0, got {check_every!r}")
        if amp is not None and amp not in AMP:
            # checked here, not only by the CLI's choices: the autocast helper reads any other value as bf16
            raise UserError(f"unknown amp {amp!r}: use None or one of {', '.join(AMP)}")
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.device = torch.device(device)
        if amp == "fp16" and self.device.type != "cuda":
            raise UserError(
                f"amp fp16 runs on CUDA only (float16 autocast with a gradient scaler per block), not on "
                f"{self.device.type}: use --amp bf16 there, or none"
            )
        self.source_model = _to_device(model, self.device)
        self.method = create_method(method, method_options) if isinstance(method, str) else method
        self.method.label_smoothing = label_smoothing
        if mixing is not None and (why := self.method.soft_target_refusal()):
            raise UserError(why)
        self.mixing = mixing
        if compile != "off" and (why := self.method.compile_refusal()):
            raise UserError(why)
        self.compile = compile
        self.compiled: CompiledBlocks | None = None  # made by build() when compile is not "off"
        if K is None and self.method.name == "e2e":
            K = 1
        self.K, self.split, self.method_options, self.checkpointing = K, split, method_options, checkpointing
        self.channels_last = channels_last
        self.optim_cfg = optim or OptimConfig()
        check_optim(self.optim_cfg)
        self.scalers: list[torch.amp.GradScaler] | None = None  # fp16: one per block, made by build()
        self.total_steps, self.steps_per_epoch = total_steps, max(1, steps_per_epoch)
        self.step_order, self.amp = step_order, None if amp == "none" else amp
        self.step = 0
        self.nonfinite, self.check_every = nonfinite, check_every
        self.guard: NonFiniteGuard | None = None  # per-block non-finite records (made by build, on the device)
        # Set by locallearn.distributed: averages block k's gradients (and loss) across processes before its step;
        # `where` names the process in error messages (" on rank 1").
        self.grad_sync: Callable[[int, torch.optim.Optimizer, Tensor | None], Tensor | None] | None = None
        # Set with grad_sync when the exchange can run behind later work: starts block k's average without waiting;
        # the engine then steps block k after block k+1's backward, and grad_sync waits for it (engine.train_blocks).
        self.grad_sync_start: Callable[[int, torch.optim.Optimizer, Tensor | None], None] | None = None
        self.where = ""
        self.eval_reduce: Callable[[Tensor], None] | None = None  # sums evaluation counts across processes
        self.phase: Phase | None = None  # the method's phase in progress (None: every block learns)
        self.phase_epoch = 0
        self.input_shape: Shape | None = None
        if input_shape is not None:
            self.build(tuple(input_shape))

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes that do not exist yet: the ones build() creates
        if name in ("model", "blocks", "bounds", "optimizers"):
            raise AttributeError(
                f"LocalLearner.{name} does not exist before the model is cut: it is built on the first batch "
                "(train_step or evaluate), or at once when input_shape=(C, H, W) is given"
            )
        raise AttributeError(name)

    @property
    def skipped_by_block(self) -> list[int]:
        """Steps the non-finite guard skipped (``nonfinite="skip"``), per block (a read of the device's records)."""
        if self.guard is None:
            return []
        if self.guard.on_device:
            self.guard.read()
        return self.guard.skipped

    @skipped_by_block.setter
    def skipped_by_block(self, counts: list[int]) -> None:
        self.guard.skipped = [int(n) for n in counts]

    @property
    def skipped_steps(self) -> int:
        """Block steps the non-finite guard skipped (``nonfinite="skip"``), all blocks together."""
        return sum(self.skipped_by_block)

    def check_nonfinite(self) -> None:
        """Read the guard's device records (one host read) and, under ``nonfinite="stop"``, raise
        :class:`~locallearn.errors.NonFiniteError` for the first non-finite step among them. A no-op with
        ``check_every=1``, where every step was checked on the host already."""
        if self.guard is not None:
            self.guard.check(self.where)

    @property
    def built(self) -> bool:
        return self.input_shape is not None

    def build(self, input_shape: Shape) -> None:
        """Cut the model into blocks and build the auxiliary nets and optimizers for inputs of ``input_shape``
        (C, H, W). Called by the constructor when ``input_shape`` is given, else by the first batch."""
        if self.built:
            if tuple(input_shape) != self.input_shape:
                raise UserError(
                    f"this learner was built for inputs of shape {self.input_shape}, got {tuple(input_shape)}: "
                    "feed images of one size, or build another learner"
                )
            return
        K, split, checkpointing = self.K, self.split, self.checkpointing
        self.model = as_layered(self.source_model, tuple(input_shape), whole_ok=K == 1)
        if isinstance(split, list) and all(isinstance(b, int) for b in split):
            self.bounds = list(split)
        elif split == "balanced":
            self.bounds = balanced_split(
                self.model,
                self.method.name,
                self.method_options,
                tuple(input_shape),
                K,
                recompute_aux="aux" in checkpointing,
            )
        else:
            self.bounds = resolve_split(self.model, split, K)
        self.blocks = split_model(self.model, self.bounds)
        if "stage" in checkpointing:
            self.blocks = [
                checkpoint_by_stage(self.model, block, start) for block, start in zip(self.blocks, [0, *self.bounds])
            ]
        self.method.recompute_aux = "aux" in checkpointing
        if K is not None and len(self.blocks) != K:
            raise UserError(f"split {split!r} gives {len(self.blocks)} blocks, not K={K}")
        self.input_shape = tuple(input_shape)
        self.method.setup(self._probe())
        _to_device(self.method, self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.method.to(memory_format=torch.channels_last)
        no_decay = no_weight_decay_ids(self.source_model)  # a ViT's position embedding, class token (timm)
        self.optimizers = [  # the method's own optimizer for a block where it has one, else the run's
            self.method.make_optimizer(k, params, self.optim_cfg) or build_optimizer(params, self.optim_cfg, no_decay)
            for k, params in enumerate(self.block_params(k) for k in range(len(self.blocks)))
        ]
        if self.amp == "fp16":
            self.scalers = [torch.amp.GradScaler(self.device.type) for _ in self.blocks]
        self.guard = NonFiniteGuard(self.nonfinite, self.check_every, len(self.blocks), self.device)
        if self.compile != "off":
            self.compiled = CompiledBlocks(self.blocks, self.method, self.compile)
        self._check_param_ownership()

    # -- construction helpers ------------------------------------------------------------------------------------
    def _probe(self) -> SetupInfo:
        """What the method needs to build its auxiliary nets (:func:`locallearn.assembly.setup_info`)."""
        return setup_info(self.model, self.blocks, self.bounds, self.input_shape, self.device)

    def block_params(self, k: int) -> list[nn.Parameter]:
        """What optimizer k owns: block k's parameters and its auxiliary net's."""
        own = [p for p in self.blocks[k].parameters() if p.requires_grad]
        return own + [p for p in self.method.block_params(k) if p.requires_grad]

    def _check_param_ownership(self) -> None:
        """Every trainable parameter belongs to exactly one optimizer; a bug here would silently freeze a layer."""
        seen: dict[int, int] = {}
        for k, opt in enumerate(self.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise RuntimeError(f"a parameter is owned by blocks {seen[id(p)]} and {k}")
                    seen[id(p)] = k
        trainable = [p for p in [*self.model.parameters(), *self.method.parameters()] if p.requires_grad]
        missing = [p for p in trainable if id(p) not in seen]
        if missing:
            raise RuntimeError(f"{len(missing)} trainable parameters are in no optimizer (method {self.method.name})")

    # -- training ------------------------------------------------------------------------------------------------
    def autocast(self) -> ContextManager:
        return engine.autocast_context(self.device, self.amp)

    def current_lr(self) -> float:
        """The run's schedule at this step (what a block steps with unless its method sets its own)."""
        if self.total_steps is None:
            return self.optim_cfg.lr
        return lr_at(self.step, self.optim_cfg, self.total_steps, self.steps_per_epoch)

    def block_lrs(self) -> list[float]:
        """Each block's learning rate for the next step (:meth:`LocalMethod.block_lr`)."""
        lr = self.current_lr()
        return [self.method.block_lr(k, lr, self.phase, self.phase_epoch) for k in range(len(self.blocks))]

    def set_phase(self, phase: Phase | None, phase_epoch: int = 0) -> None:
        """Train only ``phase.learning`` from now on (None: every block); ``phase_epoch`` is the epoch within it,
        for the method's schedules. See :meth:`LocalMethod.phases`."""
        if phase is not None:
            self._require_built("set_phase")
            bad = [k for k in phase.learning if not 0 <= k < len(self.blocks)]
            if bad or not phase.learning:
                raise UserError(
                    f"phase {phase.name!r} names blocks {list(phase.learning)}: use 0 .. {len(self.blocks) - 1}"
                )
        self.phase, self.phase_epoch = phase, phase_epoch

    def learns(self, k: int) -> bool:
        """Block k learns in the phase in progress."""
        return self.phase is None or k in self.phase.learning

    def train_step(
        self, x: Tensor | Any, y: Tensor | None = None, *, target: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One step of every block on a batch: ``x, y`` tensors, an ``(x, y)`` pair, or a :class:`Batch`.

        ``target`` is what reconstruction losses (InfoPro and its MAN variants) rebuild: the images un-normalised,
        in [0, 1], the shape of ``x``. Without it a :class:`Batch` brings its own (``raw``), and plain tensors use
        ``x`` mapped onto [0, 1] over the batch (:func:`locallearn.data.unit_range`), which accepts any input range."""
        batch = as_batch((x, y) if y is not None else x, self.device)
        if target is not None:
            batch = Batch(batch.x, batch.y, self._checked_target(target, batch.x))
        self.build(tuple(batch.x.shape[1:]))
        batch = self.prepare_batch(batch)
        stats, _ = self.train_blocks(batch, batch.x, range(len(self.blocks)))
        return stats

    def prepare_batch(self, batch: Batch) -> Batch:
        """A training batch as the blocks read it: mixed (mixup / cutmix, drawn for this step) when the learner has a
        ``mixing``, and in channels-last memory format when the learner is. The first block's process calls it once
        per step (a pipeline's stage 0 too), so every block trains on the same mixed batch."""
        if self.mixing is not None:
            batch = self.mixing(batch, self.step)
        if self.channels_last and batch.x.dim() == 4:
            batch = replace(batch, x=batch.x.contiguous(memory_format=torch.channels_last))
        return batch

    def train_blocks(
        self,
        batch: Batch,
        h: Tensor,
        blocks: range,
        before_block: Callable[[int], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One step of the contiguous ``blocks`` on ``h`` (the output of the block before them); advances the step
        counter. Returns their statistics and their detached output. A pipeline stage trains its own blocks with
        this (:mod:`locallearn.distributed.pipeline`); :meth:`train_step` trains them all. The hooks run before
        block k's forward and after its optimizer step (see :func:`locallearn.engine.train_blocks`)."""
        for opt, lr in zip(self.optimizers, self.block_lrs()):
            set_lr([opt], lr)
        self.model.train()
        self.method.train()
        for k, block in enumerate(self.blocks):
            if not self.learns(k):
                block.eval()  # a block that does not learn in this phase keeps its BatchNorm statistics too
        compiling = self.compiled is not None and self.compiled.compiles(h.shape[0])
        start = time.perf_counter()
        stats, out = engine.train_blocks(self, batch, h, blocks, before_block, after_step)
        if compiling:  # the step that compiled every block: reported apart from the training throughput
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compiled.seconds = time.perf_counter() - start
        self.step += 1
        if self.check_every > 1 and self.step % self.check_every == 0:
            self.check_nonfinite()  # the one host read of the guard's records in check_every steps
        return stats, out

    def _checked_target(self, target: Tensor, x: Tensor) -> Tensor:
        if not isinstance(target, Tensor) or tuple(target.shape) != tuple(x.shape):
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise UserError(
                f"train_step(target=...) must be a tensor of the inputs' shape {tuple(x.shape)}, got {got}: pass the "
                "images to reconstruct, un-normalised in [0, 1]"
            )
        target = target.to(self.device, x.dtype if target.is_floating_point() else torch.float32)
        lo, hi = target.aminmax()
        if lo.item() < 0 or hi.item() > 1:  # one sync, only when a target is given
            raise UserError(
                f"train_step(target=...) holds values in [{lo.item():.3g}, {hi.item():.3g}], outside [0, 1]: the "
                "reconstruction decoder ends in a sigmoid and is trained by binary cross-entropy, so pass the "
                "un-normalised images scaled to [0, 1] (or no target: x mapped onto [0, 1] is used)"
            )
        return target

    def forward_loss(self, k: int, h: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        """Block k's forward on ``h`` and its local loss: ``(out, loss, logits)``; compiled when the learner is."""
        if self.compiled is not None:
            return self.compiled(k, h, batch)
        out = self.blocks[k](h)
        loss, logits = self.method.local_loss(k, out, batch)
        return out, loss, logits

    @property
    def compile_seconds(self) -> float:
        """Wall time of the step that compiled the blocks (0 when not compiled, or before the first step)."""
        return self.compiled.seconds if self.compiled is not None else 0.0

    def backward(self, k: int, loss: Tensor) -> None:
        """Block k's backward pass (its loss scaled by its own ``GradScaler`` under fp16)."""
        (loss if self.scalers is None else self.scalers[k].scale(loss)).backward()

    def step_block(self, k: int, loss: Tensor | None = None, stats: dict[str, Tensor] | None = None) -> Tensor | None:
        """Step block k's optimizer (after the non-finite guard, given its ``loss``) and free its gradients.

        With a ``grad_sync`` set (data-parallel training, :mod:`locallearn.distributed.data_parallel`) block k's
        gradients and loss are first averaged across processes, so the guard decides alike on every rank. Under fp16
        the gradients are unscaled first; an overflow is the block's scaler's to handle (it skips that block's step
        and lowers its scale), so the guard then reads the loss only. With ``optim.clip_grad_norm`` the gradients are
        clipped to that total norm, and ``stats["clip/k"]`` says whether they were. Returns the loss the guard saw
        (the average, under data parallelism)."""
        if self.grad_sync is not None:
            loss = self.grad_sync(k, self.optimizers[k], loss)
        opt = self.optimizers[k]
        scaler = self.scalers[k] if self.scalers is not None else None
        if scaler is not None:
            scaler.unscale_(opt)
        clip = self.optim_cfg.clip_grad_norm
        check = self.nonfinite != "off" and loss is not None and not is_fake(loss)  # fake tensors hold no values
        norm = self._grad_norm(opt, loss) if check or clip is not None else None
        if check:
            ok = NonFiniteGuard.finite(loss, norm if scaler is None else None)  # an overflow is the scaler's
        snapshot = None
        if check and self.guard.on_device:  # decided on the device: nothing read here (locallearn.nonfinite)
            self.guard.record(k, ok, loss, self.step)
            if self.nonfinite == "skip":
                snapshot = OptimizerSnapshot(opt, _with_grad(opt))
        elif check and not bool(ok):  # check_every=1: one host read, before the step
            if self.nonfinite == "stop":
                raise self.guard.error(k, self.step, loss.item(), self.where)
            self.guard.skipped[k] += 1
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # unscale_ was called: the scaler expects its update before the next scale
            return loss
        if clip is not None:
            torch.nn.utils.clip_grads_with_norm_(_with_grad(opt), clip, norm)
            if stats is not None:
                stats[f"clip/{k}"] = (norm > clip).float()  # averaged over the epoch: the fraction of steps clipped
        if scaler is not None:
            scaler.step(opt)  # skipped when this block's gradients overflowed
            scaler.update()
        else:
            opt.step()
        if snapshot is not None:
            snapshot.restore_unless(ok)  # a non-finite step does not count
        opt.zero_grad(set_to_none=True)  # frees block k's gradients before block k+1 runs
        self.method.after_step(k)
        return loss

    @staticmethod
    def _grad_norm(opt: torch.optim.Optimizer, loss: Tensor | None) -> Tensor:
        """Total L2 norm of the gradients ``opt`` steps with (a device tensor: no host sync)."""
        grads = [p.grad for p in _with_grad(opt)]
        if grads:
            return torch.nn.utils.get_total_norm(grads)
        return torch.zeros((), device=loss.device if loss is not None else None)

    def fit(
        self,
        train: Iterable | Callable[[int], Iterable],
        epochs: int,
        *,
        test: Iterable | None = None,
        batch_size: int = 64,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Train for ``epochs`` epochs, through the method's phases if it has any, and return one record per epoch.

        ``train`` is read once per epoch: a ``DataLoader`` of ``(x, y)`` pairs (or any re-iterable of batches), or a
        function of the batch size that returns one, ``lambda b: DataLoader(dataset, b, shuffle=True)``. A method
        whose phases train at their own batch size (:meth:`LocalMethod.phases`; SoftHebb's Hebbian phase at 10, then
        its classifier) needs the function, or one of locallearn's loaders (:func:`locallearn.build_data`), which
        fit resizes and gives each epoch's index (``set_batch_size``, ``set_epoch``) as ``locallearn train`` does;
        ``batch_size`` is what the function is called with for a phase without its own.
        Each record has ``epoch`` (from 1), ``phase`` (its name, or None), ``steps``, every block's mean ``loss/k``
        and ``acc/k`` over the epoch, and with ``test`` the :meth:`evaluate` figures; ``on_epoch`` sees each record as
        it is made. The learning-rate schedule is the learner's (``total_steps``, ``steps_per_epoch``); ``fit``
        neither changes it nor checkpoints: ``locallearn train`` does both. It is the loop a user writes by hand::

            for phase, e in learner.method.epoch_phases(epochs):   # phase None: every block learns
                learner.set_phase(phase, e)
                for batch in loader_of(phase.batch_size if phase else None):
                    learner.train_step(batch)
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise UserError(f"fit(epochs={epochs!r}): use a whole number of epochs, at least 1")

        own_size = getattr(train, "batch_size", None)
        resizable = not callable(train) and hasattr(train, "set_batch_size")  # locallearn's loaders (build_data)

        def loader(size: int | None, epoch: int = 0) -> Iterable:
            if callable(train):
                return train(size or batch_size)
            if resizable:
                train.set_batch_size(size or own_size)
            elif size is not None and own_size != size:
                raise UserError(
                    f"{self.method.name} trains a phase at batch {size}, but fit() was given a loader of batch "
                    f"{own_size}: pass train as a function of the batch size, e.g. lambda b: DataLoader(dataset, b, "
                    "shuffle=True)"
                )
            if hasattr(train, "set_epoch"):  # locallearn's loaders: each epoch's order is a function of its index
                train.set_epoch(epoch)
            return train

        if not self.built:  # the method's phases depend on the blocks: cut the model on a first batch
            first = next(iter(loader(None)), None)
            if first is None:
                raise UserError("fit() was given an empty training set: its loader yielded no batch")
            self.build(tuple(as_batch(first, self.device).x.shape[1:]))
        records: list[dict] = []
        try:
            for phase, phase_epoch in self.method.epoch_phases(epochs):
                self.set_phase(phase, phase_epoch)
                means = RunningMeans()  # the runner's per-epoch means: sums on the device, one sync per epoch
                for batch in loader(phase.batch_size if phase is not None else None, len(records)):
                    means.update(self.train_step(batch))
                if means.count == 0:
                    raise UserError(f"fit(): epoch {len(records) + 1}'s loader yielded no batch")
                record: dict[str, Any] = {"epoch": len(records) + 1, "phase": phase.name if phase else None}
                record["steps"] = means.count
                record.update(means.means())
                if test is not None:
                    record.update(self.evaluate(test))
                records.append(record)
                if on_epoch is not None:
                    on_epoch(record)
        finally:
            self.set_phase(None)  # afterwards every block learns again, as before the call
            if resizable:
                train.set_batch_size(own_size)
        return records

    def evaluate(self, batches: Iterable) -> dict:
        """Test accuracy and per-block auxiliary accuracies over ``batches``: a ``DataLoader`` of ``(x, y)`` pairs,
        or any iterable of pairs or :class:`Batch` objects. An unbuilt learner is cut on the first batch, as
        :meth:`train_step` does (the accuracy at initialisation is a normal first call)."""
        batches = (as_batch(b, self.device) for b in batches)
        if not self.built:
            first = next(batches, None)
            if first is None:
                raise UserError("evaluate() was given no batch: pass a non-empty loader")
            self.build(tuple(first.x.shape[1:]))
            batches = itertools.chain([first], batches)
        return engine.evaluate(self, batches, reduce=self.eval_reduce)

    def early_exit(self, threshold: float) -> EarlyExit:
        """This learner's blocks and auxiliary classifiers as an early-exit inference module (:mod:`locallearn.
        early_exit`): each sample is answered by the first auxiliary classifier whose top softmax probability reaches
        ``threshold``, else by the network's own; ``module(x)`` returns ``(logits, exit block per sample)``. An
        unbuilt learner is cut on the module's first batch. Refused for e2e and softhebb (no auxiliary classifiers)."""
        return EarlyExit(self, threshold)

    # -- reporting and state -------------------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts split into the backbone (kept for inference) and the auxiliary nets (dropped)."""
        self._require_built("num_params")
        return {
            "params_backbone": sum(p.numel() for p in self.model.parameters()),
            "params_aux": sum(p.numel() for p in self.method.parameters()),
        }

    def describe(self) -> list[str]:
        self._require_built("describe")
        return describe_split(self.model, self.bounds)

    def state_dict(self) -> dict[str, Any]:
        self._require_built("state_dict")
        return {
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "skipped_by_block": list(self.skipped_by_block),
            **({"scalers": [s.state_dict() for s in self.scalers]} if self.scalers is not None else {}),
            "bounds": list(self.bounds),
            "input_shape": list(self.input_shape),
        }

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise UserError(
                f"LocalLearner.{what}() needs the model cut into blocks: call train_step first, or build the learner "
                "with input_shape=(C, H, W)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.built and state.get("input_shape"):
            self.build(tuple(state["input_shape"]))
        self._require_built("load_state_dict")
        if list(state["bounds"]) != self.bounds:
            raise CheckpointError(
                f"checkpoint was trained with block boundaries {state['bounds']}, this learner has "
                f"{self.bounds}: build the learner with the same --split and --K"
            )
        try:  # strict: a checkpoint of another model, method or class count is refused, never half-loaded
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            if len(state["optimizers"]) != len(self.optimizers):
                raise ValueError(f"{len(state['optimizers'])} optimizers in the checkpoint, {len(self.optimizers)} now")
            for opt, opt_state in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(opt_state)
            for scaler, scaler_state in zip(self.scalers or [], state.get("scalers") or []):
                scaler.load_state_dict(scaler_state)
        except (RuntimeError, ValueError, KeyError) as err:
            detail = " ".join(str(err).split())[:400]
            raise CheckpointError(
                f"the checkpoint does not fit this learner ({detail}): build it with the run's arch, method, K, split "
                "and classes"
            ) from None
        self.step = int(state["step"])
        skipped = state.get("skipped_by_block")
        if skipped is None:  # checkpoints of earlier versions held one total ("skipped_steps"), or nothing
            skipped = [int(state.get("skipped_steps", 0))] + [0] * (len(self.blocks) - 1)
        self.skipped_by_block = [int(n) for n in skipped]


def _with_grad(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``opt`` steps that hold a gradient."""
    return [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
