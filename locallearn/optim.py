"""One optimizer per block, built from one spec, and the learning rate as a pure function of the step (nanoGPT /
airbench style).

The spec (:class:`OptimConfig`) names the optimizer: torch's ``sgd`` (the InfoPro/MAN recipe and the default),
``adamw``, ``adam``, ``rmsprop``, or any of timm's (``lamb``, ``lion``, ``adan``, …, through
``timm.optim.create_optimizer_v2``). Each of the K blocks gets its own instance over its block's and its auxiliary
net's parameters (DGL's layout), so a block steps as soon as its own backward is done.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from locallearn.errors import UserError

TORCH_OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimConfig:
    """The optimizer of every block and the run's learning-rate schedule.

    The defaults are the InfoPro/MAN ``train.py`` recipe: SGD with Nesterov momentum, weight decay on every parameter,
    cosine schedule.

    Attributes:
        name: "sgd", "adamw", "adam", "rmsprop" (torch), or a timm optimizer name ("lamb", "lion", "adan", …; needs
            ``pip install 'locallearn[timm]'``).
        lr: base learning rate (lr0). The reference uses 0.8 at batch 1024 and 0.1 at batch 128 (SGD).
        momentum: momentum of sgd, rmsprop and timm's momentum optimizers (ignored by the Adam family).
        nesterov: Nesterov momentum (sgd).
        weight_decay: decoupled for adamw (and timm's "w" optimizers), an L2 penalty for the others.
        betas: (β1, β2) of the Adam family, lamb, lion, …; None keeps the optimizer's own default ((0.9, 0.999) for
            torch's Adam and AdamW).
        eps: the optimizer's ε; None keeps its default.
        filter_bias_and_bn: timm's weight-decay groups: no decay on 1-D parameters (norm weights, biases, MAN++'s
            scale) nor on the parameters the model names in ``no_weight_decay()`` (a ViT's position embedding and class
            token). False (default): decay on every parameter, as the CIFAR reference code does.
        kwargs: further constructor arguments of the optimizer (e.g. ``{alpha: 0.9}`` for rmsprop).
        schedule: "cosine" (to ``min_lr``), "step" (× ``gamma`` at each of ``milestones``) or "constant".
        schedule_unit: "step" (smooth, per iteration) or "epoch" (the reference code: lr changes once per epoch and
            the cosine is evaluated at e = epoch + 1, so the last epoch runs at ``min_lr``).
        min_lr: the floor the cosine ends at.
        milestones: epochs at which the "step" schedule multiplies the rate by ``gamma`` (e.g. [30, 60, 80]).
        gamma: the "step" schedule's factor.
        warmup_epochs: linear warm-up length in epochs (the reference uses 10); 0 disables it.
        warmup_fraction: warm-up length as a fraction of the run instead (0.1: the first 10 % of the steps); 0 disables
            it. At most one of the two is set.
        warmup_start_lr: learning rate at the start of the warm-up (the reference uses 0.01; 0 for AdamW recipes).
        clip_grad_norm: clip each block's gradient to this total L2 norm after its backward, before its step (None:
            no clipping); the fraction of steps each block clipped is logged.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    betas: list[float] | None = None
    eps: float | None = None
    filter_bias_and_bn: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    schedule: str = "cosine"
    schedule_unit: str = "step"
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0
    warmup_start_lr: float = 0.01
    clip_grad_norm: float | None = None


def lr_at(step: int, cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    With t the position in the schedule's unit, T its length and W the warm-up length: the cosine is
    ``min_lr + (lr0 − min_lr)/2 · (1 + cos(π u / T))``, the step schedule ``lr0 · gamma^(milestones ≤ t in
    epochs)``, the constant ``lr0``; for t < W, ``lr = sched(u)·t/W + warmup_start_lr·(W − t)/W``, else sched(u).
    In "epoch" units u = t + 1 (MAN/InfoPro's e = epoch + 1); in "step" units u = t.
    """
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}: use {', '.join(SCHEDULES)}")
    if cfg.schedule_unit == "epoch":
        t, total, per_unit = step // steps_per_epoch, total_steps / steps_per_epoch, 1
        u = t + 1
    elif cfg.schedule_unit == "step":
        t, total, per_unit = step, total_steps, steps_per_epoch
        u = t
    else:
        raise UserError(f"unknown schedule_unit {cfg.schedule_unit!r}: use step or epoch")
    warm = cfg.warmup_epochs * per_unit if cfg.warmup_epochs else cfg.warmup_fraction * total
    if cfg.schedule == "cosine":
        value = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(u, total) / max(total, 1)))
    elif cfg.schedule == "step":
        epoch = t / per_unit  # epochs done (0-based), so a milestone m applies from the start of epoch m on
        value = cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    else:
        value = cfg.lr
    if t < warm:
        return value * t / warm + cfg.warmup_start_lr * (warm - t) / warm
    return value


def check_optim(cfg: OptimConfig) -> None:
    """Reject a spec that cannot build an optimizer, before any work, naming the field and the fix."""
    name = cfg.name.lower()
    if name not in TORCH_OPTIMIZERS:
        timm_optim = _timm_optim(name)
        if name not in timm_optim.list_optimizers():
            raise UserError(
                f"unknown optimizer optim.name={cfg.name!r}: use {', '.join(TORCH_OPTIMIZERS)} or one of timm's "
                "(`python -c 'import timm.optim; print(timm.optim.list_optimizers())'`)"
            )
    if cfg.betas is not None and (len(cfg.betas) not in (2, 3) or not all(0 <= b < 1 for b in cfg.betas)):
        raise UserError(f"optim.betas must be 2 (or, for adan, 3) numbers in [0, 1), got {cfg.betas!r}")
    if cfg.eps is not None and not cfg.eps > 0:
        raise UserError(f"optim.eps must be > 0, got {cfg.eps}")
    if cfg.warmup_epochs and cfg.warmup_fraction:
        raise UserError(
            f"optim.warmup_epochs={cfg.warmup_epochs} and optim.warmup_fraction={cfg.warmup_fraction} both set: give "
            "the warm-up in one of them"
        )
    if not 0 <= cfg.warmup_fraction <= 1:
        raise UserError(f"optim.warmup_fraction must be in [0, 1], got {cfg.warmup_fraction}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise UserError(f"optim.min_lr must be in [0, optim.lr={cfg.lr}], got {cfg.min_lr}")
    if not cfg.gamma > 0 or sorted(cfg.milestones) != list(cfg.milestones):
        raise UserError(f"optim.gamma must be > 0 and optim.milestones ascending, got {cfg.gamma}, {cfg.milestones}")
    if cfg.clip_grad_norm is not None and not cfg.clip_grad_norm > 0:
        raise UserError(f"optim.clip_grad_norm must be > 0 (None: no clipping), got {cfg.clip_grad_norm}")


def _timm_optim(name: str):
    try:
        import timm.optim
    except ImportError:
        raise UserError(
            f"optimizer {name!r} comes from timm, which is not installed: pip install 'locallearn[timm]', or use "
            f"one of {', '.join(TORCH_OPTIMIZERS)}"
        ) from None
    return timm.optim


def no_weight_decay_ids(model: nn.Module | None) -> set[int]:
    """Parameters of ``model`` that its ``no_weight_decay()`` names (timm's convention: exact names or wildcards, a
    module name covering its parameters), as ``id``s."""
    names = getattr(model, "no_weight_decay", None)
    if model is None or not callable(names):
        return set()
    patterns = set(names())
    return {
        id(p)
        for name, p in model.named_parameters()
        if any(fnmatch.fnmatch(name, pat) or name.startswith(f"{pat}.") for pat in patterns)
    }


def param_groups(params: list[nn.Parameter], cfg: OptimConfig, no_decay: set[int] | None = None) -> list[Any]:
    """The optimizer's parameter list: ``params`` as they are, or with ``filter_bias_and_bn`` two groups, the second
    (1-D parameters and the ``no_decay`` ids) without weight decay."""
    if not cfg.filter_bias_and_bn:
        return params  # one group, exactly as before the option existed (the parity fingerprints depend on it)
    skip = no_decay or set()
    decay = [p for p in params if p.ndim > 1 and id(p) not in skip]
    free = [p for p in params if p.ndim <= 1 or id(p) in skip]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if free:
        groups.append({"params": free, "weight_decay": 0.0})
    return groups


def build_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, no_decay: set[int] | None = None
) -> torch.optim.Optimizer:
    """Block k's optimizer over ``params`` (its block's and its auxiliary net's), as ``cfg`` names it."""
    name = cfg.name.lower()
    groups = param_groups(params, cfg, no_decay)
    extra: dict[str, Any] = {}
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    if cfg.eps is not None:
        extra["eps"] = cfg.eps
    extra.update(cfg.kwargs)
    try:
        if name == "sgd":
            return torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                **cfg.kwargs,
            )  # fmt: skip
        if name in ("adamw", "adam"):
            kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
        if name == "rmsprop":
            return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **extra)
        return _timm_optim(name).create_optimizer_v2(
            groups, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
        )
    except (TypeError, ValueError) as err:  # an argument the optimizer does not take, or a value it refuses
        why = f"optimizer {cfg.name!r} cannot be built from the optim section ({err}): fix the option"
        raise UserError(why) from None


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
