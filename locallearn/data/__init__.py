"""Datasets and loaders.

Small datasets are loaded whole as uint8 ``[N, C, H, W]`` tensors (:func:`load_arrays`) and served by an
:class:`InMemoryLoader` whose order and augmentation are a pure function of ``(seed, epoch)``. ImageNet is read from
image files by a :class:`FolderLoader` (:mod:`locallearn.data.imagenet`) with the same interface and guarantee.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from locallearn.data.config import DataConfig
from locallearn.data.datasets import DATASETS, load_arrays
from locallearn.data.imagenet import FolderLoader, build_imagenet
from locallearn.data.info import DatasetInfo
from locallearn.data.loader import Batch, InMemoryLoader

__all__ = [
    "DATASETS", "Batch", "as_batch", "unit_range",
    "DataConfig", "DatasetInfo", "FolderLoader", "InMemoryLoader", "build_data", "default_eval_batch_size",
    "load_arrays",
]  # fmt: skip


def as_batch(item, device: torch.device | str | None = None) -> Batch:
    """A :class:`Batch` from what loaders yield: a ``Batch``, or an ``(x, y)`` pair (a ``DataLoader``'s; extra
    items such as sample indices are ignored). Tensors are moved to ``device`` when given.

    Plain pairs carry no un-normalised images, which InfoPro's reconstruction targets must be (values in [0, 1]).
    Their ``raw`` is ``x`` mapped affinely onto [0, 1] over the batch (:func:`unit_range`): the same image up to one
    scale and shift, so nothing about the input is lost, and a normalised ``x`` no longer makes the BCE fail."""
    if isinstance(item, Batch):
        batch = item
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        batch = Batch(item[0], item[1], None)
    else:
        raise TypeError(
            f"a batch must be an (x, y) pair or a locallearn Batch, got {type(item).__name__}: yield (images, labels)"
        )
    if device is not None and batch.x.device != torch.device(device):
        moved = {
            name: None if t is None else t.to(device, non_blocking=True)
            for name, t in (("x", batch.x), ("y", batch.y), ("raw", batch.raw), ("soft", batch.soft))
        }
        batch = Batch(**moved)
    if batch.raw is None:
        batch = dataclasses.replace(batch, raw=unit_range(batch.x))
    return batch


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled and shifted onto [0, 1] by the batch's min and max (no host sync: tensor ops only). An ``x``
    already in [0, 1] with both ends present is returned as it is (up to rounding)."""
    lo, hi = x.amin(), x.amax()
    inside = (lo >= 0) & (hi <= 1)
    return torch.where(inside, x, (x - lo) / (hi - lo).clamp_min(1e-12))


EVAL_PIXEL_BUDGET = 1000 * 3 * 32 * 32
"""Input values one evaluation batch may hold by default: 1000 CIFAR images (a fast batch for small images)."""


def default_eval_batch_size(batch_size: int, image_shape: tuple[int, ...]) -> int:
    """The test batch size used when none is given: as many images as :data:`EVAL_PIXEL_BUDGET` input values
    allow, at most 1000 and never fewer than the training batch.

    Evaluation runs without autograd, so one batch holds a layer or two of activations at a time where a training
    step holds a whole block's; at the training batch size it therefore needs less memory than training. A fixed
    1000 did not: ResNet-101 at 224×224 evaluated 1000 images at once and its evaluation peak (+5.4 GiB) was above
    the training steps' (+5.0 GiB at batch 32). Results do not depend on it (BatchNorm uses running statistics).
    """
    pixels = max(1, math.prod(image_shape))
    return max(batch_size, min(1000, EVAL_PIXEL_BUDGET // pixels))


def build_data(
    cfg: DataConfig,
    batch_size: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    eval_batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[InMemoryLoader | FolderLoader, InMemoryLoader | FolderLoader, DatasetInfo]:
    """Load ``cfg``'s dataset and wrap it in a train and a test loader.

    ImageNet gets two :class:`FolderLoader` (images decoded and augmented per file, ``cfg.workers`` processes);
    every other dataset two :class:`InMemoryLoader`. Both yield :class:`Batch` and have the same interface.

    Args:
        cfg: The data configuration.
        batch_size: Training batch size (the last short batch is dropped).
        seed: Seed of the training order and augmentation (with the epoch, see ``set_epoch``).
        device: Where the data and batches live.
        eval_batch_size: Test batch size; None picks :func:`default_eval_batch_size`.
        dtype: Floating dtype of the batches.

    Returns:
        ``(train_loader, test_loader, info)``.

    Raises:
        UserError: Unknown dataset, bad option, or missing/corrupt files.
    """
    if cfg.name == "imagenet":
        return build_imagenet(cfg, batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size, dtype=dtype)
    train_x, train_y, test_x, test_y, info = load_arrays(cfg)
    train = InMemoryLoader(
        train_x, train_y, info, batch_size, train=True, seed=seed, device=device, dtype=dtype, augment=cfg.augment
    )
    eval_batch_size = eval_batch_size or default_eval_batch_size(batch_size, (info.in_channels, *info.image_size))
    test = InMemoryLoader(test_x, test_y, info, eval_batch_size, train=False, seed=seed, device=device, dtype=dtype)
    return train, test, info
