"""Dataset metadata: the one place each dataset's classes, shape, statistics and augmentation are written down."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

# CIFAR-10 per-channel statistics on the 0..255 scale, as used by the reference recipe. Kept as Python floats (double
# precision) so that dividing by 255 adds no float32 rounding before the tensors are built.
CIFAR10_MEAN: tuple[float, ...] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD: tuple[float, ...] = (63.0 / 255, 62.1 / 255, 66.7 / 255)

# Fashion-MNIST statistics of the 60000 training images scaled to [0, 1], computed once with
#   python -c "import gzip,numpy as n; d=n.frombuffer(gzip.open('/usr/share/datasets/fashion-mnist/
#   train-images-idx3-ubyte.gz').read()[16:],n.uint8)/255; print(d.mean(), d.std())"
# which prints 0.28604059... 0.35302424... (tests/test_data.py re-checks them against the real data).
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

# ImageNet per-channel statistics of the [0, 1] images, the constants every torchvision ImageNet model was trained with.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset as it is fed to the model.

    Attributes:
        name: Registered dataset name.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        in_channels: Channels of the images as the loader yields them.
        image_size: ``(height, width)`` of the images as the loader yields them.
        mean: Per-channel mean of the [0, 1] images, used for normalisation.
        std: Per-channel standard deviation of the [0, 1] images.
        crop_padding: Pixels of padding on each side before the random crop back to ``image_size`` (0: no crop).
        pad_mode: ``"constant"`` (zeros) or ``"reflect"``, how the crop padding is filled.
        hflip: Whether the standard augmentation flips horizontally at random.
        class_names: Human-readable class names, if known.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    pad_mode: str
    hflip: bool
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # These are programming errors in a registered dataset, not user input, hence plain ValueError.
        if self.pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {self.pad_mode!r}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"{self.name}: mean/std need {self.in_channels} entries, got {self.mean} / {self.std}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
SVHN_CLASSES = tuple(str(d) for d in range(10))

# Standard augmentation per dataset follows the reference recipe: CIFAR-10 reflect-pads, the others zero-pad.
FASHION_MNIST_INFO = DatasetInfo(
    "fashion-mnist", 10, 1, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD, 4, "constant", False,
    FASHION_MNIST_CLASSES,
)  # fmt: skip
CIFAR10_INFO = DatasetInfo("cifar10", 10, 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD, 4, "reflect", True, CIFAR10_CLASSES)
SVHN_INFO = DatasetInfo("svhn", 10, 3, (32, 32), (0.5,) * 3, (0.5,) * 3, 2, "constant", False, SVHN_CLASSES)
STL10_INFO = DatasetInfo("stl10", 10, 3, (96, 96), (0.5,) * 3, (0.5,) * 3, 4, "constant", True, STL10_CLASSES)
# ImageNet is file-backed (locallearn.data.imagenet): its RandomResizedCrop + flip run per image in the DataLoader, so
# crop_padding is 0. The 1000 classes and 224x224 size are the defaults; the loader takes the class count and names
# from the train folder (so a subset of class folders works) and the size from DataConfig.crop_size.
IMAGENET_INFO = DatasetInfo("imagenet", 1000, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 0, "constant", True)


def synthetic_info(image_size: int, in_channels: int, num_classes: int) -> DatasetInfo:
    """Metadata of the synthetic dataset, which has no augmentation (it is for smoke tests)."""
    return DatasetInfo(
        "synthetic", num_classes, in_channels, (image_size, image_size), (0.5,) * in_channels, (0.5,) * in_channels,
        0, "constant", False,
    )  # fmt: skip


def normalization_tensors(
    info: DatasetInfo, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Build ``mean`` and ``std`` as ``[1, C, 1, 1]`` tensors for ``x = (raw - mean) / std``.

    The mean is rounded from double precision to ``dtype`` and then nudged up by a few ulps where needed, so that
    un-normalising the normalised grey level 0 gives a value ``>= 0`` both as ``x * std + mean`` and with a fused
    multiply-add. Reconstruction targets and image dumps then never see a tiny negative black (callers should still
    clamp to [0, 1]). In float32 the nudge is at most a few ulps; in a half type it can reach 1e-2, so normalise in
    float32 (as :class:`InMemoryLoader` does) and cast afterwards.

    Args:
        info: The dataset's metadata.
        device: Where the tensors live.
        dtype: Floating dtype of the tensors.

    Returns:
        ``(mean, std)``, each of shape ``[1, C, 1, 1]``.
    """
    std = torch.tensor(info.std, dtype=torch.float64).to(dtype)
    mean = torch.tensor(info.mean, dtype=torch.float64).to(dtype)
    up = torch.tensor(float("inf"), dtype=dtype)
    for c in range(len(info.mean)):
        m, s = mean[c], std[c]
        for _ in range(64):
            x0 = (torch.zeros_like(m) - m) / s
            plain = float(x0 * s + m)
            # An FMA rounds only once, after the exact x0 * s + m: rational arithmetic on the (exact) Python floats.
            fused = Fraction(float(x0)) * Fraction(float(s)) + Fraction(float(m))
            if plain >= 0 and fused >= 0:
                break
            m = torch.nextafter(m, up)
        mean[c] = m
    return mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
