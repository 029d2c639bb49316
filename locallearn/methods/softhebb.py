"""SoftHebb: feedback-free Hebbian learning by soft winner-take-all (Journé, Garcia Rodriguez, Guo, Moraitis,
"Hebbian Deep Learning Without Feedback", ICLR 2023, arXiv 2209.11883; the rule as described in
``shared/reference/softhebb.md`` §1).

Each Hebbian block (one :class:`locallearn.models.softhebb.SoftHebbBlock`) learns without labels, targets or any
error signal; only the last block, flatten → dropout → linear, learns by cross-entropy.

The rule, for a conv layer with weights W (channels k, filters w_k), input patches x̃_{b,p} (reflect-padded BN
output) and pre-activation u_{b,k,p} = w_k · x̃_{b,p}, competing over channels at every sample b and position p:

    s_{b,k,p} = softmax_k(u_{b,k,p} / τ)
    y = +s for the winner argmax_k u, −s for every other channel  (``softness="anti"``, the paper's presets;
        ``"soft"``: y = s)
    Δw_k = Σ_{b,p} y_{b,k,p} x̃_{b,p} − (Σ_{b,p} y_{b,k,p} u_{b,k,p}) w_k,   Δw ← Δw / max|Δw|
    w_k ← w_k + η_k Δw_k,   η_k = η0 (|‖w_k‖ − 1| + 1e-10)^q

How it reaches the weights through the engine's per-block step: the block's loss is the surrogate

    L = − Σ y·u + ½ Σ_k c_k ‖w_k‖²,   with y and c_k = Σ_{b,p} y u held constant,

whose gradient is exactly −Δw (BN has no parameters and the block's input is detached, so nothing else gets a
gradient), and the block's optimizer is :class:`HebbianStep`, which divides the gradient by its max-abs, scales each
filter by η_k from its current norm and steps with nothing else: no momentum, weight decay or cosine schedule. The
classifier has its own Adam (lr 1e-3) and the paper's step schedule. The convolution's input and u come from
:class:`ForwardTaps` (what autograd holds anyway).

Phases (``mode``): ``consecutive`` (default; the authors' README and ``demo.py``): every Hebbian block learns for
``hebbian_epochs`` at ``hebbian_batch_size``, then the classifier learns for the run's ``--epochs`` at its
``--batch-size`` on frozen features (Hebbian blocks in evaluation mode: BatchNorm's running statistics).
``successive`` (the paper's numbers): block 1 alone, then block 2 on frozen block 1, …, then the classifier.
``simultaneous``: every block on every batch, at the run's batch size, for ``--epochs``.

Controls (``shared/reference/softhebb.md`` §7): ``hebbian="off"`` runs the same phases with the weights left at their
random initialisation (norm r0) — BatchNorm still learns its statistics from the same pass, so the comparison is of
the rule alone; ``hebbian="none"`` is the paper's own Random baseline, which never runs the Hebbian blocks in
training mode, so it has neither learned weights nor learned input normalisation; ``--method e2e`` on the same
architecture is end-to-end backprop through the same widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from locallearn.errors import UserError
from locallearn.methods.base import (
    ForwardTaps,
    LocalMethod,
    LocalOutput,
    MethodConfig,
    Phase,
    SetupInfo,
    register_method,
)
from locallearn.models.softhebb import PRESETS, HebbClassifier, HebbConv2d, SoftHebbBlock, triangle

CONTROLS = {
    "off": "; OFF: random-initialisation control (BatchNorm statistics from the Hebbian pass)",
    "none": "; NONE: the paper's Random baseline (no Hebbian pass; BatchNorm at mean 0 / var 1)",
}
CONVERGED = 1e-2  # |‖w‖ − 1| under which a filter counts as converged ("R1 features" of the authors' logs)


@dataclass
class SoftHebbConfig(MethodConfig):
    """Options of ``--method softhebb`` (``--method.NAME=VALUE``).

    Attributes:
        hebbian: "on"; "off" for the random-initialisation control (same phases, weights never change, BatchNorm
            learns its statistics from the Hebbian pass); "none" for the paper's Random column (no Hebbian pass at
            all: BatchNorm keeps mean 0 / variance 1, ``shared/reference/softhebb.md`` §3).
        softness: "anti" (soft WTA with the anti-Hebbian sign for non-winners: the paper's presets) or "soft".
        mode: "consecutive", "successive" or "simultaneous" (module docstring).
        hebbian_epochs: epochs of each Hebbian phase (the paper: 1).
        hebbian_batch_size: batch size of the Hebbian phases (the paper: 10; the normalised step is the same at any
            batch size, so the number of steps sets convergence).
        classifier_lr: Adam's learning rate for the classifier (the paper: 1e-3).
        classifier_schedule: "step" (×0.5 at 20, 35, 50, 60, 70, 80, 90 % of the classifier's epochs for 50 or more,
            at 50 and 75 % for 20–49, none below 20: the authors' CustomStepLR) or "constant".
    """

    hebbian: str = "on"
    softness: str = "anti"
    mode: str = "consecutive"
    hebbian_epochs: int = 1
    hebbian_batch_size: int = 10
    classifier_lr: float = 1e-3
    classifier_schedule: str = "step"


class HebbianStep(torch.optim.Optimizer):
    """The SoftHebb step for the weights of one Hebbian conv: with g = the gradient of the surrogate loss (= −Δw),
    ``w_k ← w_k − lr · η_k · g_k / (max|g| + 1e-30)``, ``η_k = η0 (|‖w_k‖ − 1| + 1e-10)^q`` from the norms before the
    step. ``lr`` stays 1 (it is only there so a schedule could scale the rule); there is no other state."""

    def __init__(self, params: list[nn.Parameter], eta0: float, power_lr: float, lr: float = 1.0) -> None:
        super().__init__(params, {"lr": lr, "eta0": eta0, "power_lr": power_lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                normalised = g / (g.abs().max() + 1e-30)  # one global number: the largest element of Δw becomes 1
                norms = w.flatten(1).norm(dim=1)
                eta = group["eta0"] * ((norms - 1).abs() + 1e-10) ** group["power_lr"]
                w.sub_(group["lr"] * eta.view(-1, *([1] * (w.dim() - 1))) * normalised)


def step_lr(base: float, epoch: int, epochs: int) -> float:
    """The authors' CustomStepLR: halve ``base`` at fixed fractions of ``epochs`` (see :class:`SoftHebbConfig`).
    Our reading of the milestones: epoch index ``round(f · epochs)`` starts the halved rate."""
    if epochs >= 50:
        fractions = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)
    elif epochs >= 20:
        fractions = (0.5, 0.75)
    else:
        fractions = ()
    return base * 0.5 ** sum(epoch >= round(f * epochs) for f in fractions)


def soft_wta(v: Tensor, t_invert: float, anti_hebbian: bool) -> Tensor:
    """y: softmax over channels (dim 1) of ``t_invert · v`` at every sample and position; with ``anti_hebbian`` every
    channel but the winner gets the negated value."""
    s = torch.softmax(t_invert * v, dim=1)
    if not anti_hebbian:
        return s
    winner = F.one_hot(v.argmax(dim=1), v.shape[1]).movedim(-1, 1).bool()
    return torch.where(winner, s, -s)


def surrogate_loss(conv: HebbConv2d, u: Tensor, anti_hebbian: bool) -> Tensor:
    """The loss whose gradient with respect to ``conv.weight`` is −Δw of the rule (module docstring); ``u`` is the
    conv's output with its graph to the weights."""
    with torch.no_grad():
        v = triangle(u, 1.0) if conv.pre_triangle else u  # the preset's ``e1``: the competition and u·w use Triangle(1)
        y = soft_wta(v, conv.t_invert, anti_hebbian)
        c = (y * v).sum(dim=(0, 2, 3))  # c_k = Σ_{b,p} y u, per output channel
    norms2 = conv.weight.pow(2).flatten(1).sum(dim=1)
    return -(y * u).sum() + 0.5 * (c * norms2).sum()


@register_method("softhebb")
class SoftHebb(LocalMethod):
    """SoftHebb (module docstring): Hebbian blocks by the soft-WTA rule, the classifier by cross-entropy."""

    config_class = SoftHebbConfig
    any_model = False  # SoftHebb networks only (locallearn.models.softhebb)

    def compile_refusal(self) -> str | None:
        # Its Hebbian blocks learn through forward hooks (ForwardTaps) and a surrogate loss built under no_grad; a
        # SoftHebb layer is one conv, where a compiled graph has little to fuse.
        return "softhebb's blocks are not compiled (Hebbian updates read forward hooks): use --train.compile off"

    def setup(self, info: SetupInfo) -> None:
        cfg = self.config
        for name, value, choices in (
            ("hebbian", cfg.hebbian, ("on", "off", "none")),
            ("softness", cfg.softness, ("anti", "soft")),
            ("mode", cfg.mode, ("consecutive", "successive", "simultaneous")),
            ("classifier_schedule", cfg.classifier_schedule, ("step", "constant")),
        ):
            if value not in choices:
                raise UserError(f"--method.{name}={value!r}: use one of {', '.join(choices)}")
        if cfg.hebbian_epochs < 1 or cfg.hebbian_batch_size < 1:
            raise UserError("--method.hebbian_epochs and --method.hebbian_batch_size must be >= 1")
        self.convs = self._hebbian_convs(info.blocks)
        super().setup(info)
        self.taps = ForwardTaps()
        for k, conv in enumerate(self.convs):
            self.taps.watch(f"conv{k}", conv)
        layers = f"blocks 0-{len(self.convs) - 1}" if len(self.convs) > 1 else "block 0"
        self.aux_summary = (
            f"softhebb: {cfg.mode} phases; {layers} learn by the soft-WTA Hebbian rule "
            f"({'anti-Hebbian' if cfg.softness == 'anti' else 'soft, no anti-Hebbian sign'}"
            f"{CONTROLS.get(cfg.hebbian, '')}), the classifier by Adam "
            f"lr {cfg.classifier_lr:g} ({cfg.classifier_schedule} schedule); --lr, --momentum and --weight-decay are "
            "not used"
        )

    @staticmethod
    def _hebbian_convs(blocks: list[nn.Module]) -> list[HebbConv2d]:
        """Each block but the last must be exactly one SoftHebb layer, the last the classifier alone."""
        usage = (
            "softhebb trains SoftHebb networks cut one Hebbian layer per block: use --arch "
            f"{'|'.join(PRESETS)} with --split layerwise (K = Hebbian layers + 1)"
        )
        convs = []
        for k, block in enumerate(blocks):
            layers = list(block) if isinstance(block, nn.Sequential) else [block]
            last = k == len(blocks) - 1
            want = HebbClassifier if last else SoftHebbBlock
            if len(layers) != 1 or not isinstance(layers[0], want):
                got = ", ".join(type(layer).__name__ for layer in layers)
                raise UserError(f"{usage}; block {k} holds {got}, not one {want.__name__}")
            if not last:
                convs.append(layers[0].conv)
        if not convs:
            raise UserError(f"{usage}; this split has no Hebbian block")
        return convs

    def soft_target_refusal(self) -> str | None:
        return (
            "softhebb's Hebbian layers learn the statistics of the images themselves (the paper trains them on "
            "unmixed images): train it without mixup and cutmix"
        )

    # -- the engine's hooks ----------------------------------------------------------------------------------------
    def make_optimizer(self, k: int, params: list[nn.Parameter], optim: Any) -> torch.optim.Optimizer:
        if k == self.num_blocks - 1:
            return torch.optim.Adam(params, lr=self.config.classifier_lr)
        conv = self.convs[k]
        if [id(p) for p in params] != [id(conv.weight)]:
            raise UserError(f"softhebb block {k} has trainable parameters besides its conv weights: freeze them")
        return HebbianStep(params, conv.eta0, conv.power_lr)

    def block_lr(self, k: int, lr: float, phase: Phase | None, phase_epoch: int) -> float:
        if k < self.num_blocks - 1:
            return 1.0  # the rule's own η_k scales each filter's step
        if self.config.classifier_schedule == "constant" or phase is None:
            return self.config.classifier_lr
        return step_lr(self.config.classifier_lr, phase_epoch, phase.epochs)

    def phases(self, epochs: int) -> list[Phase]:
        cfg, hebbian = self.config, tuple(range(self.num_blocks - 1))
        classifier = Phase("classifier", (self.num_blocks - 1,), epochs)
        if cfg.hebbian == "none":  # the paper's Random column: no Hebbian pass, so BatchNorm keeps mean 0 / var 1
            return [classifier]
        if cfg.mode == "simultaneous":
            return [Phase("simultaneous", (*hebbian, self.num_blocks - 1), epochs)]
        if cfg.mode == "successive":
            return [Phase(f"hebbian{k + 1}", (k,), cfg.hebbian_epochs, cfg.hebbian_batch_size) for k in hebbian] + [
                classifier
            ]
        return [Phase("hebbian", hebbian, cfg.hebbian_epochs, cfg.hebbian_batch_size), classifier]

    def aux_loss(self, k: int, h: Tensor, batch: Any) -> LocalOutput:
        _, u = self.taps.pop(f"conv{k}")
        if u.dtype not in (torch.float32, torch.float64):
            raise UserError("softhebb needs full precision (--amp none): bf16 moves the winner and the softmax")
        if self.config.hebbian == "off":
            return LocalOutput(u.sum() * 0.0, None)  # the control: BatchNorm learns from the pass, W never moves
        return LocalOutput(surrogate_loss(self.convs[k], u, self.config.softness == "anti"), None)

    def report(self) -> dict[str, float]:
        """Filter-norm statistics and converged filters (|‖w‖ − 1| < 1e-2) per Hebbian layer."""
        out: dict[str, float] = {}
        for k, conv in enumerate(self.convs):
            norms = conv.weight.detach().flatten(1).norm(dim=1)
            out[f"hebb{k + 1}/norm_mean"] = norms.mean().item()
            out[f"hebb{k + 1}/norm_min"] = norms.min().item()
            out[f"hebb{k + 1}/norm_max"] = norms.max().item()
            out[f"hebb{k + 1}/converged"] = int(((norms - 1).abs() < CONVERGED).sum())
        return out

    def describe_report(self, report: dict[str, float]) -> str:
        """``hebb1 |w| 13.1 [6.7, 21.3] 0 converged; hebb2 ...``"""
        return "; ".join(
            f"hebb{k} |w| {report[f'hebb{k}/norm_mean']:.3g} [{report[f'hebb{k}/norm_min']:.3g}, "
            f"{report[f'hebb{k}/norm_max']:.3g}] {int(report[f'hebb{k}/converged'])} converged"
            for k in range(1, len(self.convs) + 1)
        )
