"""ImageNet read from image files: torchvision's ImageFolder, per-image transforms in DataLoader workers.

1.28M JPEGs do not fit in memory as uint8 tensors, so unlike the small datasets this one is decoded and augmented
per image (RandomResizedCrop + horizontal flip for training; resize to ``crop * 256 / 224`` and centre crop for
evaluation, the reference recipe) and served by a :class:`FolderLoader` with :class:`InMemoryLoader`'s interface.
The images stay un-normalised in [0, 1] until they reach the device, where ``x = (raw - mean) / std`` is computed,
so ``Batch.raw`` is the reconstruction target of InfoPro/MAN decoders (the crop, not the full image).

Determinism: the order of an epoch comes from a ``torch.Generator`` seeded ``seed * 1_000_003 + epoch`` (as
in-memory), which also draws one seed per example; each image is augmented under its own seed (see
:class:`SeededItems`). Order and augmentation are therefore a pure function of ``(seed, epoch)``, for any number of
workers, and even with persistent workers, whose own RNGs are seeded only once when they start.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from locallearn.data.config import DataConfig
from locallearn.data.datasets import _check_config
from locallearn.data.info import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_INFO, DatasetInfo, normalization_tensors
from locallearn.data.loader import EPOCH_STRIDE, Batch
from locallearn.errors import DataError, UserError

if TYPE_CHECKING:  # torchvision is imported where it is used: it costs 1.6 s at start-up
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

log = logging.getLogger("locallearn")

LAYOUT = (
    "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (torchvision's ImageFolder layout; "
    "the val images must be sorted into class folders)"
)


def imagenet_transform(crop_size: int, train: bool) -> v2.Compose:
    """The per-image transform: PIL image -> float32 ``[3, crop, crop]`` in [0, 1], not normalised."""
    from torchvision.transforms import v2

    if train:
        geometry = [v2.RandomResizedCrop(crop_size), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(crop_size * 256 / 224)), v2.CenterCrop(crop_size)]
    # Geometry on the PIL image (the reference order), then a plain tensor: ToPureTensor drops the tv_tensors.Image
    # subclass, which default_collate would otherwise carry into the batch.
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


class SeededSampler(Sampler[tuple[int, int]]):
    """Pair each index of ``base`` with a seed for that example's augmentation, both drawn from ``generator``."""

    def __init__(self, base: Sampler[int], generator: torch.Generator) -> None:
        self.base = base
        self.generator = generator
        self.skip = 0  # leading examples left out (a run resumed mid-epoch); drawn all the same

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Seeds first, then the order: RandomSampler draws its permutation from the same generator when iterated.
        seeds = torch.randint(2**62, (len(self),), generator=self.generator).tolist()
        return itertools.islice(zip(self.base, seeds), self.skip, None)


class ShardedBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``sampler``'s keys, each cut to rank ``rank``'s part (``tensor_split`` of the whole batch, as
    :meth:`InMemoryLoader.shard`); with ``world`` 1 these are the plain batches."""

    def __init__(self, sampler: SeededSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world = 0, 1

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = iter(self.sampler)
        for _ in range(len(self) - self.sampler.skip // self.batch_size):
            batch = list(itertools.islice(keys, self.batch_size))
            if not batch or (self.drop_last and len(batch) < self.batch_size):
                return
            if self.world > 1:
                bounds = torch.arange(len(batch)).tensor_split(self.world)[self.rank].tolist()
                batch = [batch[j] for j in bounds]
            yield batch


class SeededItems(Dataset):
    """Look up ``base[index]`` with the CPU RNG seeded from the key ``(index, seed)`` of :class:`SeededSampler`.

    torchvision's random transforms draw from the global CPU generator. Seeding it per example makes augmentation
    independent of which worker (or the main process) loads the image; ``fork_rng`` restores the previous state, so
    the training process's own random numbers are untouched when ``workers=0``. Only the CPU generator is seeded
    (not ``torch.manual_seed``, which would also reset CUDA's).
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.base[index]


class FolderLoader:
    """Batches of an image-folder dataset on a device, with :class:`InMemoryLoader`'s interface.

    Args:
        dataset: Yields ``(image float32 [C, H, W] in [0, 1], label)``, e.g. an ``ImageFolder`` or a ``Subset``.
        info: The dataset's metadata (normalisation constants).
        batch_size: Examples per batch.
        train: Shuffle (train) or keep the dataset order (eval); augmentation lives in the dataset's transform.
        seed: Base seed; with the epoch it fixes the order and the per-example augmentation seeds.
        device: Where the batches go.
        workers: DataLoader worker processes (0: load in the main process).
        drop_last: Drop a final short batch; defaults to ``train``.
        dtype: Floating dtype of ``Batch.x`` and ``Batch.raw``.
    """

    def __init__(
        self,
        dataset: Dataset,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        workers: int = 0,
        drop_last: bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}: pass a positive batch size")
        self.dataset, self.info, self.batch_size, self.train, self.seed = dataset, info, batch_size, train, seed
        self.device, self.dtype = torch.device(device), dtype
        self.compute_dtype = torch.promote_types(dtype, torch.float32)  # normalise in float32 at least, as in-memory
        self.mean, self.std = normalization_tensors(info, self.device, self.compute_dtype)
        self.epoch = 0
        self.generator = torch.Generator()
        base = RandomSampler(dataset, generator=self.generator) if train else SequentialSampler(dataset)
        self.batches = ShardedBatches(
            SeededSampler(base, self.generator), batch_size, train if drop_last is None else drop_last
        )
        self.loader = DataLoader(
            SeededItems(dataset),
            batch_sampler=self.batches,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            # Worker seeds (torch, random) come from this generator; augmentation does not depend on them (the
            # per-example seeds do that), but seeding it keeps any other randomness in a worker reproducible.
            generator=torch.Generator(),
        )
        if train and len(self) == 0:
            raise UserError(
                f"the training set has {self.num_examples} examples, fewer than one batch of {batch_size}: "
                "lower --batch-size or raise --limit-train"
            )

    @property
    def num_examples(self) -> int:
        """Number of examples in the dataset (including any dropped by ``drop_last``)."""
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iterations produce, from batch ``start_batch`` on
        (a run resumed mid-epoch: the batches are those of an uninterrupted pass, the first ones left out)."""
        self.epoch = epoch
        self.batches.sampler.skip = start_batch * self.batch_size

    def set_batch_size(self, batch_size: int) -> None:
        """Batches of ``batch_size`` from the next epoch on (see :meth:`InMemoryLoader.set_batch_size`)."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}: pass a positive batch size")
        self.batch_size = self.batches.batch_size = batch_size
        if self.batches.world > 1:
            self.shard(self.batches.rank, self.batches.world)

    def shard(self, rank: int, world: int) -> None:
        """Yield only rank ``rank``'s part of every batch (data-parallel training; see
        :meth:`InMemoryLoader.shard`)."""
        if self.train and self.batch_size % world:
            raise UserError(
                f"--batch-size {self.batch_size} is the global batch and must split evenly over {world} processes: "
                f"use a multiple of {world}"
            )
        self.batches.rank, self.batches.world = rank, world

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return len(self.batches)

    def normalize(self, raw: Tensor) -> Tensor:
        """``(raw - mean) / std`` with this loader's constants, in ``raw``'s dtype."""
        return ((raw.to(self.compute_dtype) - self.mean) / self.std).to(raw.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Invert :meth:`normalize` and clamp to [0, 1], in ``x``'s dtype."""
        return (x.to(self.compute_dtype) * self.std + self.mean).clamp(0, 1).to(x.dtype)

    def __iter__(self) -> Iterator[Batch]:
        """Yield the batches of the current epoch; iterating again repeats them exactly."""
        # Reseeded on every iteration, not only in set_epoch, so that a second pass over an epoch repeats it.
        epoch_seed = self.seed * EPOCH_STRIDE + self.epoch
        self.generator.manual_seed(epoch_seed)
        self.loader.generator.manual_seed(epoch_seed)
        for images, labels in self.loader:
            raw = images.to(self.device, non_blocking=True).to(self.compute_dtype)
            x = (raw - self.mean) / self.std  # on the device, so the workers ship only the [0, 1] images
            yield Batch(x=x.to(self.dtype), y=labels.to(self.device, non_blocking=True), raw=raw.to(self.dtype))

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"FolderLoader({self.info.name}, {mode}, n={self.num_examples}, batch_size={self.batch_size}, "
            f"batches={len(self)}, workers={self.loader.num_workers}, device={self.device})"
        )


def _folder(path: Path, transform: v2.Compose) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"{path} is not a folder: expected {LAYOUT}")
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as err:  # no class folders, or a class folder without a single image
        raise DataError(f"{path}: {str(err).rstrip('.')}: expected {LAYOUT}") from None


def _spread(dataset: ImageFolder, limit: int | None) -> ImageFolder | Subset:
    """``limit`` images spread evenly over ImageFolder's order (sorted by class, then file name), so every class keeps
    its share: the first N would keep only the first classes. Deterministic, no seed: the same images every run."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])


def imagenet_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Open ``<data_dir>/train`` and ``<data_dir>/val`` as ImageFolders with the train and eval transforms.

    ``limit_train`` / ``limit_test`` keep N images spread evenly over ImageFolder's order (sorted by class, then file
    name), so every class keeps its share; the first N, as for the shuffled in-memory datasets, would keep only the
    first classes (shared/reference/softhebb.md §3 notes that flaw in the SoftHebb code's subset). ``num_classes``
    and ``class_names`` come from the train folder, not the 1000 of the full dataset, so a subset of class folders
    is a valid (smaller) task.

    Raises:
        UserError: No or a missing ``data_dir``, a wrong layout, differing classes, or an unsupported option.
    """
    _check_config(cfg)
    if cfg.download:
        raise UserError(
            "ImageNet cannot be downloaded automatically: get ILSVRC-2012 from image-net.org (it needs an account), "
            f"lay it out as {LAYOUT}, and pass <root> with --data-dir (without --download)"
        )
    for field in ("pad_to", "channels"):
        if getattr(cfg, field) is not None:
            raise UserError(f"{field} does not apply to imagenet (use crop_size): drop the {field} option")
    if cfg.holdout is not None:
        raise UserError(
            "holdout applies to in-memory datasets, not imagenet: evaluate on its val split, or lay a validation "
            "split of train/ out as another <root> and pass that with --data-dir"
        )
    if cfg.crop_pad_mode != "dataset":  # RandomResizedCrop does not pad
        raise UserError("crop_pad_mode does not apply to imagenet (its crop does not pad): drop the option")
    if cfg.crop_size < 1:
        raise UserError(f"crop_size must be >= 1, got {cfg.crop_size}: pass e.g. --data.crop_size=224")
    if cfg.data_dir is None:
        raise UserError(f"imagenet needs --data-dir <root>, a folder holding {LAYOUT}: pass --data-dir")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist: pass the folder <root> holding {LAYOUT}")
    # Without augmentation, training images get the evaluation crop.
    train = _folder(root / "train", imagenet_transform(cfg.crop_size, train=cfg.augment))
    val = _folder(root / "val", imagenet_transform(cfg.crop_size, train=False))
    if train.classes != val.classes:  # both sorted, so equal lists <=> equal sets
        only = ", ".join(sorted(set(train.classes) ^ set(val.classes))[:3])
        raise DataError(
            f"{root}/train has {len(train.classes)} classes and {root}/val has {len(val.classes)}, and they differ "
            f"(e.g. {only}): give val/ the same class folders as train/"
        )
    size, classes = (cfg.crop_size, cfg.crop_size), tuple(train.classes)
    info = dataclasses.replace(IMAGENET_INFO, num_classes=len(classes), image_size=size, class_names=classes)
    if cfg.normalization == "cifar":
        info = dataclasses.replace(info, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    train_set, val_set = _spread(train, cfg.limit_train), _spread(val, cfg.limit_test)
    if isinstance(train_set, Subset):
        covered = len({train.targets[i] for i in train_set.indices})
        if covered < len(train.classes):  # fewer images than classes
            msg = "limit_train=%d keeps images of only %d of %d classes: raise it or use --data.limit_train=None"
            log.warning(msg, cfg.limit_train, covered, len(classes))
    return train_set, val_set, info


def build_imagenet(
    cfg: DataConfig,
    batch_size: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    eval_batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[FolderLoader, FolderLoader, DatasetInfo]:
    """:func:`locallearn.data.build_data` for imagenet: a train and a val :class:`FolderLoader` and the info."""
    train_set, val_set, info = imagenet_datasets(cfg)
    common: dict[str, Any] = {"seed": seed, "device": device, "workers": cfg.workers, "dtype": dtype}
    train = FolderLoader(train_set, info, batch_size, train=True, **common)
    test = FolderLoader(val_set, info, eval_batch_size or batch_size, train=False, **common)
    return train, test, info
