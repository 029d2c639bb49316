"""One SGD optimizer per block, and the learning rate as a pure function of the step (nanoGPT / airbench style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from locallearn.errors import UserError


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum and a cosine schedule with linear warm-up (InfoPro/MAN ``train.py`` recipe).

    Attributes:
        lr: base learning rate (lr0). The reference uses 0.8 at batch 1024 and 0.1 at batch 128.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty on every trainable parameter (the reference decays BN parameters too).
        schedule: "cosine" or "constant".
        schedule_unit: "step" (smooth, per iteration) or "epoch" (the reference code: lr changes once per epoch and
            the cosine is evaluated at e = epoch + 1, so the last epoch runs at lr 0).
        warmup_epochs: linear warm-up length (the reference uses 10); 0 disables it.
        warmup_start_lr: learning rate at the start of the warm-up (the reference uses 0.01).
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    schedule_unit: str = "step"
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.01


def lr_at(step: int, cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    With t the position in the schedule's unit, T its length and W the warm-up length:
    ``cos(u) = lr0/2 · (1 + cos(π u / T))``; for t < W, ``lr = cos(u)·t/W + warmup_start_lr·(W − t)/W``, else cos(u).
    In "epoch" units u = t + 1 (MAN/InfoPro's e = epoch + 1); in "step" units u = t.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise UserError(f"unknown schedule {cfg.schedule!r}: use cosine or constant")
    if cfg.schedule_unit == "epoch":
        t, total, warm = step // steps_per_epoch, total_steps / steps_per_epoch, cfg.warmup_epochs
        u = t + 1
    elif cfg.schedule_unit == "step":
        t, total, warm = step, total_steps, cfg.warmup_epochs * steps_per_epoch
        u = t
    else:
        raise UserError(f"unknown schedule_unit {cfg.schedule_unit!r}: use step or epoch")
    cosine = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(u, total) / max(total, 1)))
    if t < warm:
        return cosine * t / warm + cfg.warmup_start_lr * (warm - t) / warm
    return cosine


def build_optimizers(groups: list[list[nn.Parameter]], cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """One SGD per block over that block's parameters plus its auxiliary net's (DGL's layout)."""
    return [
        torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        for params in groups
    ]


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
