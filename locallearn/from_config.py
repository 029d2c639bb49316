"""A model and a learner from a :class:`RunConfig`: what ``locallearn train`` builds, what ``locallearn eval`` rebuilds
from a checkpoint's config, and what the benchmarks build to compare with other code."""

from __future__ import annotations

import torch

from locallearn.config import RunConfig
from locallearn.data import DatasetInfo
from locallearn.learner import LocalLearner
from locallearn.mixing import BatchMixer
from locallearn.models import create_model


def build_learner(
    cfg: RunConfig, info: DatasetInfo, device: torch.device, total_steps: int | None, steps_per_epoch: int
) -> LocalLearner:
    """The configured model, cut into the configured blocks, with the method, optimizers, schedule, precision and
    regularisation of ``cfg``, for data described by ``info``."""
    model = create_model(
        cfg.model.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size[0] if info.image_size[0] == info.image_size[1] else tuple(info.image_size),
        **cfg.model.kwargs,
    )
    return LocalLearner(
        model,
        cfg.train.method,
        cfg.resolved_k(),
        cfg.train.split,
        input_shape=(info.in_channels, *info.image_size),
        method_options=cfg.method,
        optim=cfg.optim,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        step_order=cfg.train.step_order,
        device=device,
        amp=cfg.train.amp,  # "none", "bf16" or "fp16"; the learner checks and normalises it
        channels_last=cfg.train.channels_last,
        checkpointing=cfg.train.checkpointing,
        nonfinite=cfg.train.nonfinite,
        compile=cfg.train.compile,
        check_every=cfg.train.log_every,  # the guard is read with the logged metrics: no host read in a step
        label_smoothing=cfg.train.label_smoothing,
        mixing=build_mixer(cfg, info.num_classes),
    )


def build_mixer(cfg: RunConfig, num_classes: int) -> BatchMixer | None:
    """The run's mixup / cutmix (None when both α are 0)."""
    t = cfg.train
    if not (t.mixup or t.cutmix):
        return None
    return BatchMixer(
        num_classes, t.mixup, t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob, mode=t.mixup_mode,
        label_smoothing=t.label_smoothing, seed=t.seed,
    )  # fmt: skip
