"""The data section of a run's configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """What to load and how to present it to the model.

    Attributes:
        name: Registered dataset name (see ``locallearn.data.DATASETS.names()``).
        data_dir: Root directory; ``None`` means the dataset's default search path.
        download: Let torchvision download the files (machines with internet only).
        limit_train: Keep the first N training examples in file order.
        limit_test: Keep the first N test examples in file order (of the held-out examples with ``holdout``).
        holdout: Hold the last N training examples (in file order) out of training and evaluate on them in place
            of the test set: a validation split, for choosing hyper-parameters without reading the test set.
            ``limit_train`` then keeps the first N of the rest, so the two never overlap. In-memory datasets only
            (ImageNet's val split is its own); the held-out examples get the test set's treatment (no augmentation).
        augment: Apply the dataset's standard train augmentation.
        pad_to: Zero-pad images symmetrically to this square size (e.g. 28 -> 32).
        channels: Repeat a 1-channel image to this many channels (e.g. 3).
        normalization: ``"dataset"`` (the dataset's own mean/std) or ``"cifar"`` (CIFAR-10 constants).
        crop_pad_mode: How the random crop's padding is filled: ``"dataset"`` (the dataset's standard recipe: CIFAR-10
            reflects, the others pad zeros), ``"constant"`` (zeros) or ``"reflect"`` (SoftHebb's STL-10 recipe).
        workers: DataLoader worker processes of file-backed datasets (imagenet); in-memory loaders ignore it.
        crop_size: ImageNet only: side of the square crop (RandomResizedCrop for training; resize to
            ``crop_size * 256 / 224`` and centre crop for evaluation). ``image_size`` is the synthetic one.
        image_size: Synthetic only: side of the square images.
        in_channels: Synthetic only: number of channels.
        num_classes: Synthetic only: number of classes.
        synthetic_train_size: Synthetic only: number of training examples.
        synthetic_test_size: Synthetic only: number of test examples.
    """

    name: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    holdout: int | None = None
    augment: bool = True
    pad_to: int | None = None
    channels: int | None = None
    normalization: str = "dataset"
    crop_pad_mode: str = "dataset"
    workers: int = 0
    crop_size: int = 224  # imagenet only
    # synthetic only
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    synthetic_train_size: int = 2048
    synthetic_test_size: int = 512
