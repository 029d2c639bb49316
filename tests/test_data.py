"""Tests of locallearn.data on tiny files written here, plus the real Fashion-MNIST when it is installed."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from locallearn.data import DATASETS, DataConfig, DatasetInfo, InMemoryLoader, build_data, load_arrays
from locallearn.data.info import CIFAR10_INFO, FASHION_MNIST_INFO, STL10_INFO, SVHN_INFO, normalization_tensors
from locallearn.data.loader import crop_flip
from locallearn.data.readers import FASHION_MNIST_FILES, SYSTEM_FASHION_MNIST
from locallearn.errors import UserError

needs_fmnist = pytest.mark.skipif(not SYSTEM_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")


# ------------------------------------------------------------------------------------------------ tiny file writers
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = [
        (rng.integers(0, 256, (n_train, 28, 28)), 2051), (np.arange(n_train) % 10, 2049),
        (rng.integers(0, 256, (n_test, 28, 28)), 2051), (np.arange(n_test) % 10, 2049),
    ]  # fmt: skip
    for stem, (array, magic) in zip(FASHION_MNIST_FILES, arrays):
        data = idx_bytes(array, magic)
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return root


def write_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = np.full((n, 3072), i, dtype=np.uint8)
        data[:, 1024:2048] = 100  # the G plane
        labels = [(i + j) % 10 for j in range(n)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, f)
    return root


def write_svhn(root: Path) -> Path:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 11), ("test", 3)):
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[1, 2, 0, :] = np.arange(n)  # pixel at row 1, column 2 of the red channel
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, where 10 means the digit 0
        scipy.io.savemat(str(root / f"{name}_32x32.mat"), {"X": x, "y": y})
    return root


def write_stl(root: Path) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for name, n in (("train", 10), ("test", 4)):
        # Build images in [N, C, H, W] and write them column-major, as the real files are.
        images = np.zeros((n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, 5, 70] = 200  # row 5, column 70 of the red channel
        images.transpose(0, 1, 3, 2).tofile(folder / f"{name}_X.bin")
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{name}_y.bin")
    return root


# ------------------------------------------------------------------------------------------------ readers
def test_fashion_mnist_tiny(tmp_path: Path) -> None:
    for gz in (True, False):
        root = write_fmnist(tmp_path / str(gz), gz=gz)
        tx, ty, vx, _, info = load_arrays(DataConfig(name="fashion-mnist", data_dir=str(root)))
        assert tx.shape == (12, 1, 28, 28) and tx.dtype == torch.uint8 and vx.shape == (5, 1, 28, 28)
        assert ty.dtype == torch.int64 and ty.tolist() == [k % 10 for k in range(12)]
        assert info.num_classes == 10 and info.image_size == (28, 28)


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "FashionMNIST" / "raw", n_train=7)
    tx, *_ = load_arrays(DataConfig(name="fashion-mnist", data_dir=str(tmp_path)))
    assert len(tx) == 7


@pytest.mark.parametrize(
    "damage", ["truncated", "bad_magic", "not_gzip", "cut_gzip"],
)  # fmt: skip
def test_corrupt_idx(tmp_path: Path, damage: str) -> None:
    root = write_fmnist(tmp_path)
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(gzip.compress(data[:-10]))
    elif damage == "bad_magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + data[4:]))
    elif damage == "not_gzip":
        path.write_bytes(data)
    else:
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz"):
        load_arrays(DataConfig(name="fashion-mnist", data_dir=str(root)))


def test_cifar10_tiny(tmp_path: Path) -> None:
    tx, ty, vx, _, info = load_arrays(DataConfig(name="cifar10", data_dir=str(write_cifar(tmp_path))))
    assert tx.shape == (15, 3, 32, 32) and vx.shape == (4, 3, 32, 32)
    assert tx[:, 0, 0, 0].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3  # file order: batches 1..5
    assert (tx[:, 1] == 100).all() and (vx[:, 0] == 5).all()  # rows are R, then G, then B planes
    assert ty[:3].tolist() == [0, 1, 2] and info.class_names == tuple(f"c{k}" for k in range(10))


def test_cifar10_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_arrays(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_3"):
        load_arrays(DataConfig(name="cifar10", data_dir=str(tmp_path)))


def test_svhn_tiny(tmp_path: Path) -> None:
    tx, ty, vx, _, info = load_arrays(DataConfig(name="svhn", data_dir=str(write_svhn(tmp_path))))
    assert tx.shape == (11, 3, 32, 32) and vx.shape == (3, 3, 32, 32)
    assert ty.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # 10 -> 0
    assert tx[:, 0, 1, 2].tolist() == list(range(11)) and tx.sum() == sum(range(11))
    assert info.crop_padding == 2 and not info.hflip


def test_stl10_tiny(tmp_path: Path) -> None:
    tx, ty, vx, vy, info = load_arrays(DataConfig(name="stl10", data_dir=str(write_stl(tmp_path))))
    assert tx.shape == (10, 3, 96, 96) and vx.shape == (4, 3, 96, 96)
    assert ty.tolist() == list(range(10)) and vy.tolist() == [0, 1, 2, 3]  # 1..10 -> 0..9
    assert (tx[:, 0, 5, 70] == 200).all() and tx.sum() == 200 * 10  # column-major files transposed back
    assert info.num_classes == 10 and info.image_size == (96, 96)
    assert info.pad_mode == "constant"  # InfoPro's STL-10 recipe; SoftHebb's reflects (its preset sets it)
    *_, reflected = load_arrays(DataConfig(name="stl10", data_dir=str(tmp_path), crop_pad_mode="reflect"))
    assert reflected.pad_mode == "reflect" and reflected.crop_padding == info.crop_padding


def test_stl10_truncated(tmp_path: Path) -> None:
    write_stl(tmp_path)
    path = tmp_path / "stl10_binary" / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match="train_X.bin"):
        load_arrays(DataConfig(name="stl10", data_dir=str(tmp_path)))


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_arrays(DataConfig(name="cifar10", data_dir=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="imagenet"):
        load_arrays(DataConfig(name="imagenet"))
    bad = [
        {"limit_train": 0},
        {"limit_test": -1},
        {"normalization": "imagenet"},
        {"pad_to": 16},
        {"channels": 1},
        {"crop_pad_mode": "zeros"},
    ]
    for kw in bad:
        with pytest.raises(UserError):
            load_arrays(DataConfig(name="synthetic", **kw))
    assert set(DATASETS.names()) == {"fashion-mnist", "cifar10", "svhn", "stl10", "synthetic", "imagenet"}


def test_fashion_mnist_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("locallearn.data.readers.SYSTEM_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_arrays(DataConfig(name="fashion-mnist", data_dir=str(tmp_path)))


def test_fashion_mnist_download_uses_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr("locallearn.data.readers.SYSTEM_FASHION_MNIST", tmp_path / "absent")
    calls = []

    def fake(root: str, download: bool) -> None:  # stands in for the network: writes torchvision's layout
        calls.append((root, download))
        write_fmnist(Path(root) / "FashionMNIST" / "raw", n_train=3)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake)
    tx, *_ = load_arrays(DataConfig(name="fashion-mnist", data_dir=str(tmp_path), download=True))
    assert calls == [(str(tmp_path), True)] and len(tx) == 3

    def offline(root: str, download: bool) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="downloading CIFAR-10"):
        load_arrays(DataConfig(name="cifar10", data_dir=str(tmp_path), download=True))


# ------------------------------------------------------------------------------------------------ transforms
def test_pad_channels_limit(tmp_path: Path) -> None:
    cfg = DataConfig(name="fashion-mnist", data_dir=str(write_fmnist(tmp_path)), pad_to=32, channels=3, limit_train=4)
    tx, ty, vx, _, info = load_arrays(cfg)
    assert tx.shape == (4, 3, 32, 32) and vx.shape == (5, 3, 32, 32) and ty.tolist() == [0, 1, 2, 3]
    assert info.in_channels == 3 and info.image_size == (32, 32) and info.mean == FASHION_MNIST_INFO.mean * 3
    assert (tx[:, :, :2] == 0).all() and (tx[:, :, 30:] == 0).all() and (tx[:, 0] == tx[:, 2]).all()
    original, *_ = load_arrays(DataConfig(name="fashion-mnist", data_dir=str(tmp_path)))
    assert torch.equal(tx[:, 1, 2:30, 2:30], original[:4, 0])
    cifar = load_arrays(DataConfig(name="fashion-mnist", data_dir=str(tmp_path), normalization="cifar"))[4]
    assert cifar.mean == CIFAR10_INFO.mean[:1] and cifar.std == CIFAR10_INFO.std[:1]


def test_holdout_evaluates_on_the_training_tail_and_never_on_the_test_set(tmp_path: Path) -> None:
    root = str(write_fmnist(tmp_path, n_train=12, n_test=5))
    full_x, full_y, *_ = load_arrays(DataConfig(name="fashion-mnist", data_dir=root))
    tx, ty, vx, vy, _ = load_arrays(DataConfig(name="fashion-mnist", data_dir=root, holdout=4, limit_train=5))
    # limit_train keeps the first 5, the held-out set is the last 4: disjoint, and the test file is not read into it
    assert torch.equal(tx, full_x[:5]) and torch.equal(ty, full_y[:5])
    assert torch.equal(vx, full_x[8:]) and torch.equal(vy, full_y[8:])
    tx, _, vx, _, _ = load_arrays(DataConfig(name="fashion-mnist", data_dir=root, holdout=4, limit_test=3))
    assert torch.equal(tx, full_x[:8]) and torch.equal(vx, full_x[8:11])
    for bad in (12, 0):
        with pytest.raises(UserError, match="holdout"):
            load_arrays(DataConfig(name="fashion-mnist", data_dir=root, holdout=bad))
    with pytest.raises(UserError, match="holdout applies to in-memory"):
        build_data(DataConfig(name="imagenet", data_dir=str(tmp_path), holdout=10), 4)


def test_synthetic() -> None:
    cfg = DataConfig(name="synthetic", image_size=8, in_channels=1, num_classes=4, synthetic_train_size=40)
    tx, ty, vx, _, info = load_arrays(cfg)
    assert tx.shape == (40, 1, 8, 8) and vx.shape == (512, 1, 8, 8) and int(ty.max()) < 4
    assert torch.equal(tx, load_arrays(cfg)[0])  # fixed seed
    assert info.crop_padding == 0 and not info.hflip and info.num_classes == 4


def test_normalization_constants() -> None:
    assert CIFAR10_INFO.mean[0] == 125.3 / 255 and CIFAR10_INFO.std[2] == 66.7 / 255
    for info in (CIFAR10_INFO, FASHION_MNIST_INFO, SVHN_INFO, STL10_INFO):
        for dtype in (torch.float32, torch.float64):
            mean, std = normalization_tensors(info, dtype=dtype)
            x0 = (torch.zeros_like(mean) - mean) / std  # grey level 0, normalised
            assert (x0 * std + mean >= 0).all() and (torch.addcmul(mean, x0, std) >= 0).all()
            assert torch.allclose(mean.double().flatten(), torch.tensor(info.mean, dtype=torch.float64), atol=1e-6)


def test_crop_flip_matches_pad_and_slice() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 7, (16,), generator=g), torch.randint(0, 7, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    for mode in ("constant", "reflect"):
        out = crop_flip(images, dy, dx, flip, 3, mode)
        padded = F.pad(images.float(), (3, 3, 3, 3), mode=mode)
        for i in range(16):
            want = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
            assert torch.equal(out[i].float(), want.flip(-1) if flip[i] else want)


# ------------------------------------------------------------------------------------------------ loader
def synthetic_loaders(batch_size: int = 32, **kw: object) -> tuple[InMemoryLoader, InMemoryLoader, DatasetInfo]:
    return build_data(DataConfig(name="synthetic", synthetic_train_size=100, synthetic_test_size=50), batch_size, **kw)


def augmented_info() -> DatasetInfo:
    return DatasetInfo("t", 10, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, 4, "reflect", True)


def batches(loader: InMemoryLoader) -> list[torch.Tensor]:
    return [torch.cat([b.x.flatten(1), b.y[:, None].float()], 1) for b in loader]


def test_loader_determinism() -> None:
    tx, ty, *_ = load_arrays(DataConfig(name="synthetic", synthetic_train_size=100))
    a = InMemoryLoader(tx, ty, augmented_info(), 32, train=True, seed=3)
    b = InMemoryLoader(tx, ty, augmented_info(), 32, train=True, seed=3)
    assert len(a) == 3 and a.num_examples == 100  # drop_last in train mode
    for epoch in (0, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        first, again, other = batches(a), batches(a), batches(b)
        assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(first, again, other))
    a.set_epoch(0)
    e0 = batches(a)
    a.set_epoch(1)
    assert not torch.equal(e0[0], batches(a)[0])
    c = InMemoryLoader(tx, ty, augmented_info(), 32, train=True, seed=4)
    assert not torch.equal(e0[0], batches(c)[0])


def test_loader_values() -> None:
    tx, ty, *_ = load_arrays(DataConfig(name="synthetic", synthetic_train_size=100))
    loader = InMemoryLoader(tx, ty, augmented_info(), 32, train=True)
    mean, std = normalization_tensors(augmented_info())
    for batch in loader:
        assert batch.x.shape == (32, 3, 32, 32) and batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64
        assert batch.raw.min() >= 0 and batch.raw.max() <= 1
        assert torch.equal(batch.x, (batch.raw - mean) / std)
        assert torch.allclose(loader.denormalize(batch.x), batch.raw, atol=1e-6)
    half = InMemoryLoader(tx, ty, augmented_info(), 32, train=True, dtype=torch.bfloat16)
    for batch, ref in zip(half, loader):
        assert batch.x.dtype == batch.raw.dtype == torch.bfloat16
        assert torch.equal(batch.x, ref.x.to(torch.bfloat16)) and torch.equal(batch.raw, ref.raw.to(torch.bfloat16))


def test_loader_without_augmentation_is_a_permutation() -> None:
    tx, ty, *_ = load_arrays(DataConfig(name="synthetic", synthetic_train_size=64))
    info = DatasetInfo("t", 10, 3, (32, 32), (0.5,) * 3, (0.5,) * 3, 0, "constant", False)
    loader = InMemoryLoader(tx, ty, info, 16, train=True)
    raw = torch.cat([b.raw for b in loader])
    labels = torch.cat([b.y for b in loader])
    as_bytes = (raw * 255).round().to(torch.uint8)
    order = [next(j for j in range(64) if torch.equal(as_bytes[i], tx[j])) for i in range(64)]
    assert sorted(order) == list(range(64)) and order != list(range(64))
    assert torch.equal(labels, ty[order])


def test_eval_loader_in_order() -> None:
    train, test, info = synthetic_loaders(batch_size=32, eval_batch_size=20)
    assert len(test) == 3 and test.num_examples == 50  # no drop_last in eval mode: 20 + 20 + 10
    _, _, vx, vy, _ = load_arrays(DataConfig(name="synthetic", synthetic_train_size=100, synthetic_test_size=50))
    got = torch.cat([b.raw for b in test])
    assert torch.equal(torch.cat([b.y for b in test]), vy) and torch.equal((got * 255).round().to(torch.uint8), vx)
    assert len(train) == 3 and info.name == "synthetic"


def test_loader_too_small() -> None:
    with pytest.raises(UserError, match="batch"):
        synthetic_loaders(batch_size=1000)


# ------------------------------------------------------------------------------------------------ real data
@needs_fmnist
def test_real_fashion_mnist() -> None:
    tx, ty, vx, vy, info = load_arrays(DataConfig(name="fashion-mnist", augment=False))
    assert tx.shape == (60000, 1, 28, 28) and vx.shape == (10000, 1, 28, 28)
    assert sorted(ty.unique().tolist()) == list(range(10)) and torch.bincount(vy).tolist() == [1000] * 10
    # The hard-coded constants in info.py must match the training set to 3 decimals.
    # Exact statistics from the grey-level histogram (fast: no float copy of the 47M pixels).
    counts = torch.bincount(tx.flatten(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * levels).sum() / counts.sum()
    std = ((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt()
    assert round(mean.item(), 3) == info.mean[0] == 0.286
    assert round(std.item(), 3) == info.std[0] == 0.353
