"""Mixup and cutmix for local learning: one mixed batch, read by every block's loss.

timm's ``Mixup`` (Zhang et al., ICLR 2018; Yun et al., ICCV 2019) mixes the images and returns soft targets (label
smoothing included). Local learning needs two more things of it:

* InfoPro reconstructs the image its block was fed, so the un-normalised images (``Batch.raw``) are mixed with the
  same λ, partner and box as the normalised ones. They are mixed as one tensor (concatenated along the channels):
  mixing is affine per pixel, so the mixed normalised image is exactly the normalised mixed image.
* Runs resume exactly and data-parallel ranks agree: timm draws λ, the switch between mixup and cutmix and the box
  from NumPy's global generator, so each step's draw is made from a generator seeded by ``(seed, step)`` and
  NumPy's global state is restored afterwards — the mixing of a step is a pure function of those two numbers, as the
  loaders' augmentation is of ``(seed, epoch)``.

The soft targets (``Batch.soft``) reach every cross-entropy of every method through
:meth:`locallearn.methods.LocalMethod.task_loss`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from locallearn.data import Batch
from locallearn.errors import UserError
from locallearn.options import MIXUP_MODES

STEP_STRIDE = 1_000_003  # a prime, as the loaders' epoch stride: (seed, step) pairs get distinct generator seeds


@contextmanager
def numpy_seeded(seed: int):
    """NumPy's global generator seeded with ``seed`` inside the block, restored to its state before it after."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class BatchMixer:
    """Mix each training batch (timm's ``Mixup``); the step and the run's seed fix the draw.

    Args:
        num_classes: classes of the soft targets.
        mixup: mixup's α (Beta(α, α) draws λ); 0 turns mixup off.
        cutmix: cutmix's α; 0 turns cutmix off.
        prob: probability that a batch (pair, image) is mixed at all.
        switch_prob: with both on, probability of cutmix rather than mixup.
        mode: "batch", "pair" or "elem" (one λ per batch, pair or image).
        label_smoothing: smoothing folded into the soft targets.
        seed: the run's seed.
    """

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        *,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        if mixup < 0 or cutmix < 0 or not (mixup or cutmix):
            raise UserError(f"mixup={mixup} and cutmix={cutmix}: give a positive α for at least one (0 turns it off)")
        if mode not in MIXUP_MODES:
            raise UserError(f"unknown mixup_mode {mode!r}: use {', '.join(MIXUP_MODES)}")
        if not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise UserError(f"mixup_prob={prob} and mixup_switch_prob={switch_prob} must be in [0, 1]")
        try:
            from timm.data import Mixup
        except ImportError:
            raise UserError(
                "mixup and cutmix use timm's Mixup, and timm is not installed: pip install 'locallearn[timm]'"
            ) from None
        self.mix = Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
            label_smoothing=label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        self.seed = seed

    def __call__(self, batch: Batch, step: int) -> Batch:
        """``batch`` mixed (``x`` and ``raw`` alike) with its soft targets, for optimizer step ``step``."""
        n = batch.x.shape[0]
        if n % 2:
            raise UserError(f"mixup and cutmix pair a batch's images, and this one has {n}: use an even batch size")
        if batch.x.dim() != 4:
            raise UserError(f"mixup and cutmix mix images [B, C, H, W], got inputs of shape {tuple(batch.x.shape)}")
        channels = batch.x.shape[1]
        both = torch.cat([batch.x, batch.raw.to(batch.x.dtype)], dim=1).contiguous()  # one draw for both
        with numpy_seeded(self.seed * STEP_STRIDE + step):
            mixed, soft = self.mix(both, batch.y)
        nhwc = batch.x.is_contiguous(memory_format=torch.channels_last) and not batch.x.is_contiguous()
        x = mixed[:, :channels].contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        raw = mixed[:, channels:].to(batch.raw.dtype).contiguous()
        return replace(batch, x=x, raw=raw, soft=soft.to(batch.x.dtype))
