"""Datasets and loaders.

Small datasets are loaded whole as uint8 ``[N, C, H, W]`` tensors (:func:`load_arrays`) and served by an
:class:`InMemoryLoader` whose order and augmentation are a pure function of ``(seed, epoch)``. ImageNet is read from
image files by a :class:`FolderLoader` (:mod:`locallearn.data.imagenet`) with the same interface and guarantee.
"""

from __future__ import annotations

import torch

from locallearn.data.config import DataConfig
from locallearn.data.datasets import DATASETS, load_arrays
from locallearn.data.imagenet import FolderLoader, build_imagenet
from locallearn.data.info import DatasetInfo
from locallearn.data.loader import Batch, InMemoryLoader

__all__ = [
    "DATASETS", "Batch", "as_batch",
    "DataConfig", "DatasetInfo", "FolderLoader", "InMemoryLoader", "build_data", "load_arrays",
]  # fmt: skip


def as_batch(item, device: torch.device | str | None = None) -> Batch:
    """A :class:`Batch` from what loaders yield: a ``Batch``, or an ``(x, y)`` pair (a ``DataLoader``'s; extra
    items such as sample indices are ignored). Plain pairs carry no un-normalised images, so ``raw`` is ``x``.
    Tensors are moved to ``device`` when given."""
    if isinstance(item, Batch):
        batch = item
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        batch = Batch(item[0], item[1], item[0])
    else:
        raise TypeError(
            f"a batch must be an (x, y) pair or a locallearn Batch, got {type(item).__name__}: yield (images, labels)"
        )
    if device is not None and batch.x.device != torch.device(device):
        x = batch.x.to(device, non_blocking=True)
        raw = x if batch.raw is batch.x else batch.raw.to(device, non_blocking=True)
        batch = Batch(x, batch.y.to(device, non_blocking=True), raw)
    return batch


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
        eval_batch_size: Test batch size; defaults to ``batch_size``.
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
    test = InMemoryLoader(
        test_x, test_y, info, eval_batch_size or batch_size, train=False, seed=seed, device=device, dtype=dtype
    )
    return train, test, info
