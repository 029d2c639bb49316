"""Readers of the datasets' on-disk formats.

They check shapes and sizes but not torchvision's MD5 sums, so that tests can write small files of the same layout.
Each reader returns a :class:`RawData` of uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``; a missing, short or
corrupt file raises :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from locallearn.errors import DataError

DEFAULT_ROOT = "data"  # torchvision's customary root, relative to the working directory
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


@dataclass
class RawData:
    """Both splits of a dataset as read from disk."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: tuple[str, ...] | None = None


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"{path} is corrupt ({what}): delete it and re-install or re-download it")


def _check_labels(labels: np.ndarray, path: Path, num_classes: int) -> Tensor:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


def _check_pair(images: Tensor, labels: Tensor, images_path: Path, labels_path: Path) -> None:
    if len(images) != len(labels):
        raise _corrupt(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path.name}")


def _root(data_dir: str | None) -> Path:
    """The dataset root: ``data_dir`` (which must exist) or the default."""
    if data_dir is None:
        return Path(DEFAULT_ROOT)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist: create it with the dataset inside or fix --data-dir")
    return root


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (``.gz`` or uncompressed) and check its magic number, dimensions and byte length."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off gzip stream is an EOFError
        raise _corrupt(path, f"cannot decompress: {e}") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        raise _corrupt(path, f"magic number is not {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(path, "header is cut short")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(dims)):
        raise _corrupt(path, f"{len(data) - header} data bytes for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # copy: writable for torch


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_mnist_dirs(data_dir: str | None) -> list[Path]:
    root = _root(data_dir)
    return [root, root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]


def read_fashion_mnist(data_dir: str | None, download: bool = False) -> RawData:
    """Read Fashion-MNIST from the first of ``data_dir``, ``data_dir/FashionMNIST/raw`` and the Debian path."""
    dirs = _fashion_mnist_dirs(data_dir)

    def first_complete() -> Path | None:
        return next((d for d in dirs if all(_find_idx(d, s) for s in FASHION_MNIST_FILES)), None)

    found = first_complete()
    if found is None and download:
        _download("Fashion-MNIST", lambda tv, root: tv.FashionMNIST(root, download=True), dirs[0])
        found = first_complete()  # torchvision writes <root>/FashionMNIST/raw
    if found is None:
        names = ", ".join(s + "[.gz]" for s in FASHION_MNIST_FILES)
        raise DataError(
            f"Fashion-MNIST not found: looked for {names} in {', '.join(map(str, dirs))}; "
            "run `apt-get install -y dataset-fashion-mnist` or pass --download on a machine with internet"
        )
    paths = [_find_idx(found, s) for s in FASHION_MNIST_FILES]
    assert all(paths)  # found above
    splits = []
    for images_path, labels_path in (paths[0:2], paths[2:4]):
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = _check_labels(read_idx(labels_path, IDX_LABELS_MAGIC), labels_path, 10)
        images_t = torch.from_numpy(images).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
        _check_pair(images_t, labels, images_path, labels_path)
        splits += [images_t, labels]
    return RawData(*splits)


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"CIFAR-10 file {path} is missing: expected {path.parent}/data_batch_1..5 and test_batch (torchvision's "
            "layout); download it on a machine with internet or pass --download"
        )
    try:
        # Security: pickle can run code. These are the files torchvision itself unpickles (after an MD5 check when it
        # downloads them); only point --data-dir at CIFAR-10 copies you trust.
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - a bad pickle can raise almost any type (UnpicklingError, EOFError, ...)
        raise _corrupt(path, f"cannot unpickle: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "not a dict")
    # Accept str keys too, in case a copy was re-pickled by Python 3.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    batch = _unpickle(path)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError, TypeError):
        raise _corrupt(path, "no uint8 'data' and integer 'labels'") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"data has shape {data.shape}, expected (N, 3072)")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows hold the R, G, B planes in that order
    labels_t = _check_labels(labels.reshape(-1), path, 10)
    _check_pair(images, labels_t, path, path)
    return images, labels_t


def read_cifar10(data_dir: str | None, download: bool = False) -> RawData:
    """Read CIFAR-10 from ``<root>/cifar-10-batches-py`` (torchvision's layout)."""
    root = _root(data_dir)
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and download:
        _download("CIFAR-10", lambda tv, r: tv.CIFAR10(r, download=True), root)
    if not folder.is_dir():
        raise DataError(
            f"CIFAR-10 not found under {root}: expected {folder}/data_batch_1..5 and test_batch (torchvision's "
            "layout); download it on a machine with internet or pass --download"
        )
    train = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = _cifar_batch(folder / "test_batch")
    names = None
    if (folder / "batches.meta").is_file():
        label_names = _unpickle(folder / "batches.meta").get("label_names")
        if label_names is not None and len(label_names) == 10:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in label_names)
    return RawData(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels, names)


# ---------------------------------------------------------------------------------------------------- SVHN
def _svhn_split(path: Path) -> tuple[Tensor, Tensor]:
    import scipy.io  # imported here: only SVHN needs scipy

    if not path.is_file():
        raise DataError(
            f"SVHN file {path} is missing: expected train_32x32.mat and test_32x32.mat in {path.parent} "
            "(torchvision's layout); download them on a machine with internet or pass --download"
        )
    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    except Exception as e:  # noqa: BLE001 - loadmat raises ValueError, MatReadError, OSError, ... on bad files
        raise _corrupt(path, f"cannot read .mat: {type(e).__name__}") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise _corrupt(path, f"X has shape {x.shape} and dtype {x.dtype}, expected uint8 (32, 32, 3, N)")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # [H, W, C, N] -> [N, C, H, W]
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as label 10
    labels_t = _check_labels(labels, path, 10)
    _check_pair(images, labels_t, path, path)
    return images, labels_t


def read_svhn(data_dir: str | None, download: bool = False) -> RawData:
    """Read SVHN (cropped digits) from ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``."""
    root = _root(data_dir)
    paths = [root / "train_32x32.mat", root / "test_32x32.mat"]
    if download and not all(p.is_file() for p in paths):
        _download("SVHN", lambda tv, r: [tv.SVHN(r, split=s, download=True) for s in ("train", "test")], root)
    return RawData(*_svhn_split(paths[0]), *_svhn_split(paths[1]))


# ---------------------------------------------------------------------------------------------------- STL-10
STL10_SIDE = 96


def _stl10_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for p in (x_path, y_path):
        if not p.is_file():
            raise DataError(
                f"STL-10 file {p} is missing: expected train_X.bin, train_y.bin, test_X.bin and test_y.bin in {folder} "
                "(torchvision's layout); download them on a machine with internet or pass --download"
            )
    x = np.fromfile(x_path, dtype=np.uint8)
    per_image = 3 * STL10_SIDE * STL10_SIDE
    if x.size % per_image:
        raise _corrupt(x_path, f"{x.size} bytes is not a whole number of {per_image}-byte images")
    # The files are written column-major (MATLAB): each plane is stored transposed, so swap H and W back.
    images = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2)))
    y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if y.size and y.min() < 1:
        raise _corrupt(y_path, "labels outside 1..10")
    labels = _check_labels(y - 1, y_path, 10)  # files count classes 1..10
    _check_pair(images, labels, x_path, y_path)
    return images, labels


def read_stl10(data_dir: str | None, download: bool = False) -> RawData:
    """Read the labelled STL-10 splits from ``<root>/stl10_binary`` (the unlabelled split is not used)."""
    root = _root(data_dir)
    folder = root / "stl10_binary"
    if download and not (folder / "test_y.bin").is_file():
        _download("STL-10", lambda tv, r: tv.STL10(r, split="train", download=True), root)
    train, test = _stl10_split(folder, "train"), _stl10_split(folder, "test")
    names = None
    if (folder / "class_names.txt").is_file():
        lines = [s.strip() for s in (folder / "class_names.txt").read_text().splitlines() if s.strip()]
        names = tuple(lines) if len(lines) == 10 else None
    return RawData(*train, *test, names)


# ---------------------------------------------------------------------------------------------------- download
def _download(what: str, fetch: Callable[[Any, str], object], root: Path) -> None:
    """Let torchvision download (and MD5-check) a dataset into ``root``."""
    import torchvision.datasets as tv  # imported here: only downloads need torchvision

    root.mkdir(parents=True, exist_ok=True)
    try:
        fetch(tv, str(root))
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError on a bad MD5
        raise DataError(
            f"downloading {what} into {root} failed ({e}): check the internet connection, or copy the files there "
            "by hand and drop --download"
        ) from None
