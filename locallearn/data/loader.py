"""A loader over tensors held in memory, which augments whole batches at once on the device (airbench style).

Per-image PIL transforms in worker processes are the bottleneck for small images; indexing a uint8 tensor that already
lives on the device is not. All random numbers come from a CPU ``torch.Generator`` seeded from ``(seed, epoch)``, so
the data order and augmentation of an epoch are a pure function of those two numbers, on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from locallearn.data.info import DatasetInfo, normalization_tensors
from locallearn.errors import UserError

EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds for epoch < 1_000_003


@dataclass
class Batch:
    """One batch, on the loader's device.

    Attributes:
        x: Normalised float images ``[B, C, H, W]``.
        y: int64 labels ``[B]``.
        raw: The same augmented images un-normalised, in [0, 1] (the target of reconstruction losses).
        soft: ``[B, classes]`` target distributions when mixup or cutmix mixed the batch
            (:mod:`locallearn.mixing`); every classifier's loss then reads them instead of ``y``. None otherwise.
    """

    x: Tensor
    y: Tensor
    raw: Tensor
    soft: Tensor | None = None


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int, pad_mode: str) -> Tensor:
    """Pad, crop back to size and optionally flip each image, all in one gather.

    The crop window of image ``i`` starts at ``(dy[i], dx[i])`` in the padded image (``0 .. 2 * padding``). Instead of
    materialising the padded batch, each output pixel's source index is computed (reflected, or masked to zero) and
    gathered; this works for uint8 on any device, where ``F.pad(mode="reflect")`` does not.

    Args:
        images: ``[B, C, H, W]``.
        dy: ``[B]`` integer vertical offsets in ``0 .. 2 * padding``.
        dx: ``[B]`` integer horizontal offsets in ``0 .. 2 * padding``.
        flip: ``[B]`` bool, flip that image horizontally.
        padding: Pixels of padding on each side.
        pad_mode: ``"constant"`` (zeros) or ``"reflect"`` (mirror without repeating the edge, as ``F.pad``).

    Returns:
        ``[B, C, H, W]``, same dtype and device as ``images``.
    """
    b, _, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev) + (dy.to(dev) - padding)[:, None]  # [B, H] source rows
    cols = torch.arange(w, device=dev) + (dx.to(dev) - padding)[:, None]  # [B, W] source columns
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)  # flipping the crop = reading its columns backwards
    if pad_mode == "reflect":
        if padding >= min(h, w):
            raise ValueError(f"reflect padding {padding} needs images larger than {h}x{w}")
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        valid = None
    else:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # [B, H, W]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = images[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [B, H, W, C]
    if valid is not None:
        out = out * valid[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous()


class InMemoryLoader:
    """Iterate over ``(images, labels)`` held on a device in batches of normalised, optionally augmented images.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: integer ``[N]``.
        info: The dataset's metadata (normalisation and augmentation).
        batch_size: Examples per batch.
        train: Shuffle and augment (train) or keep file order without augmentation (eval).
        seed: Base seed; with the epoch it fixes the order and augmentation.
        device: Where the data and the batches live; the uint8 tensors are moved there once.
        drop_last: Drop a final short batch; defaults to ``train``.
        dtype: Floating dtype of ``Batch.x`` and ``Batch.raw``.
        augment: Apply ``info``'s standard augmentation in train mode.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool | None = None,
        dtype: torch.dtype = torch.float32,
        augment: bool = True,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}: pass a positive batch size")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.info = info
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.dtype = dtype
        # Normalise in at least float32: rounding the constants to a half type would move them by several ulps.
        self.compute_dtype = torch.promote_types(dtype, torch.float32)
        self.augment = augment and train and (info.crop_padding > 0 or info.hflip)
        self.mean, self.std = normalization_tensors(info, self.device, self.compute_dtype)
        self.epoch = 0
        self.start_batch = 0
        self.rank, self.world = 0, 1
        if train and len(self) == 0:
            raise UserError(
                f"the training set has {len(images)} examples, fewer than one batch of {batch_size}: "
                "lower --batch-size or raise --limit-train"
            )

    @property
    def num_examples(self) -> int:
        """Number of examples in the underlying data (including any dropped by ``drop_last``)."""
        return len(self.images)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iterations produce, from batch ``start_batch`` on
        (a run resumed mid-epoch: the batches are those of an uninterrupted pass, the first ones left out)."""
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self, rank: int, world: int) -> None:
        """Yield only rank ``rank``'s part of every batch: ``torch.tensor_split(batch, world)[rank]`` of the batch a
        single process would see (data-parallel training). Training needs a batch size divisible by ``world``, so
        every rank trains on as many examples; evaluation batches may split unevenly (counts are summed)."""
        if self.train and self.batch_size % world:
            raise UserError(
                f"--batch-size {self.batch_size} is the global batch and must split evenly over {world} processes: "
                f"use a multiple of {world}"
            )
        self.rank, self.world = rank, world

    def set_batch_size(self, batch_size: int) -> None:
        """Batches of ``batch_size`` from the next epoch on (a method's phases may train at their own batch size);
        under sharding it must still split evenly over the processes."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}: pass a positive batch size")
        self.batch_size = batch_size
        if self.world > 1:
            self.shard(self.rank, self.world)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.num_examples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, raw: Tensor) -> Tensor:
        """``(raw - mean) / std`` with this loader's constants, in ``raw``'s dtype."""
        return ((raw.to(self.compute_dtype) - self.mean) / self.std).to(raw.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Invert :meth:`normalize` and clamp to [0, 1], in ``x``'s dtype."""
        return (x.to(self.compute_dtype) * self.std + self.mean).clamp(0, 1).to(x.dtype)

    def __iter__(self) -> Iterator[Batch]:
        """Yield the batches of the current epoch; iterating again repeats them exactly."""
        n, bs = self.num_examples, self.batch_size
        if self.train:
            # Draw every random number of the epoch up front, from one CPU generator, so the result does not depend
            # on the device or on how far a previous iteration got.
            g = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch)
            order = torch.randperm(n, generator=g).to(self.device)
            p = self.info.crop_padding
            offsets = torch.randint(0, 2 * p + 1, (2, n), generator=g).to(self.device)  # one copy per epoch
            flips = torch.rand(n, generator=g) < 0.5 if self.info.hflip else torch.zeros(n, dtype=torch.bool)
            flips = flips.to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(self.start_batch, len(self)):
            positions = torch.arange(i * bs, min((i + 1) * bs, n))
            if self.world > 1:
                positions = positions.tensor_split(self.world)[self.rank]
            idx = order[positions.to(order.device)]
            images = self.images[idx]
            if self.augment:
                pos = positions.to(self.device)
                images = crop_flip(images, offsets[0, pos], offsets[1, pos], flips[pos], p, self.info.pad_mode)
            raw = images.to(self.compute_dtype).div_(255).clamp_(0, 1)
            x = self.normalize(raw)
            yield Batch(x=x.to(self.dtype), y=self.labels[idx], raw=raw.to(self.dtype))

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"InMemoryLoader({self.info.name}, {mode}, n={self.num_examples}, batch_size={self.batch_size}, "
            f"batches={len(self)}, device={self.device})"
        )
