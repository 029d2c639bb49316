"""The dataset registry and :func:`load_arrays`, which turns a :class:`DataConfig` into in-memory tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from locallearn.data import readers
from locallearn.data.config import DataConfig
from locallearn.data.info import (
    CIFAR10_INFO,
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_INFO,
    STL10_INFO,
    SVHN_INFO,
    DatasetInfo,
    synthetic_info,
)
from locallearn.data.loader import EPOCH_STRIDE
from locallearn.errors import UserError
from locallearn.registry import Registry

Arrays = tuple[Tensor, Tensor, Tensor, Tensor, DatasetInfo]
"""``(train_images uint8 [N, C, H, W], train_labels int64 [N], test_images, test_labels, info)``."""

DATASETS: Registry[Arrays] = Registry("dataset")
NORMALIZATIONS = ("dataset", "cifar")
SYNTHETIC_CHUNK = 64  # images generated at once by the synthetic dataset (part of its definition: fixed)


def _from_raw(raw: readers.RawData, info: DatasetInfo) -> Arrays:
    if raw.class_names is not None:
        info = dataclasses.replace(info, class_names=raw.class_names)
    return raw.train_images, raw.train_labels, raw.test_images, raw.test_labels, info


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> Arrays:
    """Fashion-MNIST: 60000 + 10000 grey 28x28 images of 10 kinds of clothing."""
    return _from_raw(readers.read_fashion_mnist(cfg.data_dir, cfg.download), FASHION_MNIST_INFO)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> Arrays:
    """CIFAR-10: 50000 + 10000 colour 32x32 images of 10 classes."""
    return _from_raw(readers.read_cifar10(cfg.data_dir, cfg.download), CIFAR10_INFO)


@DATASETS.register("svhn")
def svhn(cfg: DataConfig) -> Arrays:
    """SVHN cropped digits: 73257 + 26032 colour 32x32 house-number digits (the extra split is not used)."""
    return _from_raw(readers.read_svhn(cfg.data_dir, cfg.download), SVHN_INFO)


@DATASETS.register("stl10")
def stl10(cfg: DataConfig) -> Arrays:
    """STL-10 labelled splits: 5000 + 8000 colour 96x96 images of 10 classes."""
    arrays = _from_raw(readers.read_stl10(cfg.data_dir, cfg.download), STL10_INFO)
    # A well-known reference implementation gave STL-10 100 classes; it has 10.
    assert arrays[4].num_classes == 10
    return arrays


@DATASETS.register("imagenet")
def imagenet(cfg: DataConfig) -> Arrays:
    """ImageNet (ILSVRC-2012) in torchvision's ImageFolder layout: file-backed, see :mod:`locallearn.data.imagenet`."""
    # Registered so that it is a known name (locallearn list, the CLI); build_data serves it from the files.
    raise UserError(
        "imagenet is read from image files, not loaded into memory: use locallearn.data.build_data, "
        "which returns FolderLoaders for it, instead of load_arrays"
    )


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig) -> Arrays:
    """Random images with a class-dependent low-frequency pattern: learnable, so above-chance accuracy means something.

    Each class gets a random 4x4 pattern per channel, upsampled to the image size, added on top of uniform noise.
    Its amplitude shrinks with the square root of the pixel count (6 grey levels at 3x32x32, at most 100) so the task
    is about equally hard at any size: a nearest-class-mean classifier gets roughly 90% at the defaults. The
    patterns come from a ``torch.Generator`` seeded 0, the train split from seed 1 and the test split from seed 2,
    so neither split depends on the other's size.

    The images are generated :data:`SYNTHETIC_CHUNK` at a time straight into the uint8 tensor, each chunk's noise
    from a generator seeded by (split seed, chunk index): the data stay a pure function of the seed, and no float
    copy of the whole set ever exists (at 3x224x224 a float copy of 2048 images was 1.2 GB, twice over, next to
    the 0.3 GB the uint8 set needs).
    """
    for field in ("image_size", "in_channels", "num_classes", "synthetic_train_size", "synthetic_test_size"):
        if getattr(cfg, field) < 1:
            raise UserError(f"synthetic data needs {field} >= 1, got {getattr(cfg, field)}: pass a positive value")
    size, channels, classes = cfg.image_size, cfg.in_channels, cfg.num_classes
    patterns = torch.rand(classes, channels, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    amplitude = min(100.0, 6.0 * (3 * 32 * 32 / (channels * size * size)) ** 0.5)

    def split(n: int, seed: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))
        images = torch.empty(n, channels, size, size, dtype=torch.uint8)
        for chunk, start in enumerate(range(0, n, SYNTHETIC_CHUNK)):
            y = labels[start : start + SYNTHETIC_CHUNK]
            g = torch.Generator().manual_seed(seed * EPOCH_STRIDE + chunk)
            noise = torch.rand(len(y), channels, size, size, generator=g).mul_(160).add_(48)
            noise += amplitude * F.interpolate(patterns[y], size=(size, size), mode="nearest")
            images[start : start + len(y)] = noise.round_().clamp_(0, 255).to(torch.uint8)
        return images, labels

    return (
        *split(cfg.synthetic_train_size, 1),
        *split(cfg.synthetic_test_size, 2),
        synthetic_info(size, channels, classes),
    )


def _check_config(cfg: DataConfig) -> None:
    for field in ("limit_train", "limit_test", "holdout", "pad_to", "channels"):
        value = getattr(cfg, field)
        if value is not None and value < 1:
            flag = "--" + field.replace("_", "-")
            raise UserError(f"{field} ({flag}) must be a positive integer or unset, got {value}: pass a positive value")
    if cfg.normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {cfg.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if cfg.workers < 0:
        raise UserError(f"workers must be >= 0, got {cfg.workers}: pass 0 or a positive number")
    if cfg.crop_pad_mode not in ("dataset", "constant", "reflect"):
        raise UserError(f"unknown crop_pad_mode {cfg.crop_pad_mode!r}: choose one of dataset, constant, reflect")


def _pad(images: Tensor, pad_to: int) -> Tensor:
    h, w = images.shape[-2:]
    top, left = (pad_to - h) // 2, (pad_to - w) // 2  # an odd remainder goes to the bottom/right
    return F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))  # zeros: black in uint8


def _repeat(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """Repeat or truncate per-channel constants to ``n`` channels."""
    return tuple(values[i % len(values)] for i in range(n))


def load_arrays(cfg: DataConfig) -> Arrays:
    """Load a dataset into memory and apply the configured limits, padding, channel repetition and normalisation.

    Args:
        cfg: The data configuration; ``cfg.name`` picks the dataset from :data:`DATASETS`.

    Returns:
        ``(train_images, train_labels, test_images, test_labels, info)``: uint8 images ``[N, C, H, W]``, int64
        labels ``[N]``, and the :class:`DatasetInfo` updated to describe the tensors as returned.

    Raises:
        UserError: Unknown dataset, bad option, or missing/corrupt files.
    """
    _check_config(cfg)
    loader: Callable[[DataConfig], Arrays] = DATASETS.get(cfg.name)
    train_x, train_y, test_x, test_y, info = loader(cfg)
    if cfg.holdout is not None:
        keep = len(train_x) - cfg.holdout
        if keep < 1:
            raise UserError(
                f"holdout={cfg.holdout} leaves no training examples ({info.name} has {len(train_x)}): "
                f"hold out fewer than {len(train_x)}"
            )
        # The test set is replaced by the held-out tail; it is never read, so no test figure can leak into a choice.
        test_x, test_y = train_x[keep:].clone(), train_y[keep:].clone()
        train_x, train_y = train_x[:keep], train_y[:keep]
    # Slicing keeps views of the full tensors; clone so the rest can be freed.
    if cfg.limit_train is not None and cfg.limit_train < len(train_x):
        train_x, train_y = train_x[: cfg.limit_train].clone(), train_y[: cfg.limit_train].clone()
    if cfg.limit_test is not None and cfg.limit_test < len(test_x):
        test_x, test_y = test_x[: cfg.limit_test].clone(), test_y[: cfg.limit_test].clone()

    if cfg.pad_to is not None:
        h, w = info.image_size
        if cfg.pad_to < max(h, w):
            raise UserError(f"pad_to={cfg.pad_to} is smaller than {info.name}'s {h}x{w} images: use >= {max(h, w)}")
        train_x, test_x = _pad(train_x, cfg.pad_to), _pad(test_x, cfg.pad_to)
        info = dataclasses.replace(info, image_size=(cfg.pad_to, cfg.pad_to))

    if cfg.channels is not None and cfg.channels != info.in_channels:
        if info.in_channels != 1:
            raise UserError(
                f"channels={cfg.channels} needs 1-channel images, but {info.name} has {info.in_channels}: "
                "drop the channels option"
            )
        train_x, test_x = train_x.repeat(1, cfg.channels, 1, 1), test_x.repeat(1, cfg.channels, 1, 1)
        info = dataclasses.replace(
            info, in_channels=cfg.channels, mean=info.mean * cfg.channels, std=info.std * cfg.channels
        )

    if cfg.normalization == "cifar":
        info = dataclasses.replace(
            info, mean=_repeat(CIFAR10_MEAN, info.in_channels), std=_repeat(CIFAR10_STD, info.in_channels)
        )
    if cfg.crop_pad_mode != "dataset":
        info = dataclasses.replace(info, pad_mode=cfg.crop_pad_mode)
    return train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long(), info
