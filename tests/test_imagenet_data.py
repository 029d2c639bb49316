"""The file-backed ImageNet dataset on a tiny ImageFolder tree of PNG/JPEG files written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.cli import main
from locallearn.data import DATASETS, DataConfig, DatasetInfo, FolderLoader, build_data, load_arrays
from locallearn.data.info import IMAGENET_INFO, normalization_tensors
from locallearn.errors import UserError

CLASSES = ("n01440764", "n01443537", "n01484850")  # sorted, as ImageFolder sorts them


def write_tree(root: Path, per_class: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES) -> Path:
    """3 classes x 4 train and 2 val images of 40x30, colour-coded by class and index; JPEG and PNG mixed."""
    per_class = per_class or {"train": 4, "val": 2}
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    # Smooth ramps (which survive JPEG) in green and blue, so that any crop or flip changes the pixels.
    pixels[..., 1] = np.arange(40)[None, :] * 6
    pixels[..., 2] = np.arange(30)[:, None] * 8
    for split, n in per_class.items():
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels[..., 0] = 80 * c + 10 * i  # a flat red plane: a fingerprint of (class, index), also in crops
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.{ext}", quality=100)
    return root


def loaders(
    root: Path, batch_size: int = 4, seed: int = 0, **kw: Any
) -> tuple[FolderLoader, FolderLoader, DatasetInfo]:
    train, test, info = build_data(
        DataConfig(name="imagenet", data_dir=str(root), crop_size=32, **kw), batch_size, seed=seed, eval_batch_size=4
    )
    assert isinstance(train, FolderLoader) and isinstance(test, FolderLoader)
    return train, test, info


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imagenet"))


def epoch_batches(loader: FolderLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(b.raw, b.y) for b in loader]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_shapes_values_and_info(tree: Path) -> None:
    train, test, info = loaders(tree)
    assert info.num_classes == 3 and info.class_names == CLASSES and info.image_size == (32, 32)
    assert info.mean == IMAGENET_INFO.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert train.num_examples == 12 and len(train) == 3 and test.num_examples == 6 and len(test) == 2
    mean, std = normalization_tensors(info)
    for loader in (train, test):
        for batch in loader:
            assert batch.x.shape == batch.raw.shape == (len(batch.y), 3, 32, 32) and batch.x.dtype == torch.float32
            assert batch.y.dtype == torch.int64 and 0 <= int(batch.y.min()) and int(batch.y.max()) < 3
            assert batch.raw.min() >= 0 and batch.raw.max() <= 1
            assert torch.equal(batch.x, (batch.raw - mean) / std)
            assert torch.allclose(loader.denormalize(batch.x), batch.raw, atol=1e-6)


def test_eval_is_deterministic_and_in_folder_order(tree: Path) -> None:
    _, test, _ = loaders(tree)
    first = epoch_batches(test, 0)
    assert torch.cat([y for _, y in first]).tolist() == [0, 0, 1, 1, 2, 2]
    assert same(first, epoch_batches(test, 7))  # no randomness in evaluation, whatever the epoch
    # Resize 30x40 -> 36x48 and centre crop: the flat red plane of image (c, i) survives as 80c + 10i.
    red = torch.cat([r for r, _ in first])[:, 0].flatten(1)
    assert torch.allclose(red.mean(1) * 255, torch.tensor([0.0, 10, 80, 90, 160, 170]), atol=3)


def test_train_order_is_a_function_of_seed_and_epoch(tree: Path) -> None:
    a, _, _ = loaders(tree)
    b, _, _ = loaders(tree)
    e0 = epoch_batches(a, 0)
    assert same(e0, epoch_batches(b, 0)) and same(e0, epoch_batches(a, 0))  # two loaders; a second pass
    assert same(epoch_batches(a, 3), epoch_batches(b, 3))
    assert not same(e0, epoch_batches(a, 1))
    labels = torch.cat([y for _, y in e0])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 and labels.tolist() != sorted(labels.tolist())
    c = FolderLoader(a.dataset, a.info, 4, train=True, seed=1)
    assert not same(e0, epoch_batches(c, 0))


def test_augmentation_does_not_depend_on_workers_or_global_rng(tree: Path) -> None:
    # Per-example seeds: workers (persistent, seeded once) give the main process's batches, epoch by epoch.
    main_process, _, _ = loaders(tree)
    workers, _, _ = loaders(tree, workers=2)
    torch.manual_seed(123)
    want = [epoch_batches(main_process, e) for e in (0, 1)]
    state = torch.get_rng_state()
    epoch_batches(main_process, 0)
    assert torch.equal(state, torch.get_rng_state())  # loading leaves the training process's RNG alone
    torch.manual_seed(456)
    assert same(epoch_batches(workers, 0), want[0]) and same(epoch_batches(workers, 1), want[1])


def test_limits(tree: Path) -> None:
    train, test, info = loaders(tree, limit_train=5, limit_test=3)
    assert train.num_examples == 5 and len(train) == 1 and test.num_examples == 3 and info.num_classes == 3
    # Spread evenly over ImageFolder's class-sorted order: every class keeps its share (the first 5 of the 12
    # training images would be 4 of class 0 and 1 of class 1; the first 3 of the 6 val images classes 0, 0, 1).
    assert sorted(torch.cat([b.y for b in test]).tolist()) == [0, 1, 2]
    assert sorted(train.dataset[i][1] for i in range(train.num_examples)) == [0, 0, 1, 1, 2]


def test_no_augment_gives_the_eval_crop(tree: Path) -> None:
    plain, _, _ = loaders(tree, augment=False)
    augmented, _, _ = loaders(tree)
    # Without augmentation the train transform is deterministic, so dataset[i] is the image each batch must hold.
    refs = [plain.dataset[i][0] for i in range(plain.num_examples)]

    def known(raw: torch.Tensor) -> bool:
        return any(torch.equal(raw, ref) for ref in refs)

    assert all(known(r) for b in plain for r in b.raw)
    assert not all(known(r) for b in augmented for r in b.raw)


def test_num_classes_from_the_folder(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"train": 2, "val": 1}, classes=("a", "b"))
    train, _, info = loaders(root, batch_size=2)
    assert info.num_classes == 2 and info.class_names == ("a", "b") and len(train) == 2


def test_load_arrays_refuses_imagenet(tree: Path) -> None:
    assert "imagenet" in DATASETS
    with pytest.raises(UserError, match="build_data"):
        load_arrays(DataConfig(name="imagenet", data_dir=str(tree)))


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_dir", "needs --data-dir"),
        ("missing_dir", "does not exist"),
        ("no_val", r"val is not a folder: expected <root>/train/<class>/\*\.JPEG"),
        ("flat_val", "the val images must be sorted into class folders"),
        ("empty_class", "n01440764"),
        ("classes_differ", "give val/ the same class folders as train/"),
        ("download", "ImageNet cannot be downloaded automatically: "),
        ("crop", "crop_size must be >= 1"),
        ("pad_to", "pad_to does not apply to imagenet"),
        ("batch", "fewer than one batch of 64"),
    ],
)
def test_errors(tmp_path: Path, case: str, match: str) -> None:
    root = tmp_path / "in"
    cfg = DataConfig(name="imagenet", data_dir=str(root), crop_size=32)
    batch_size = 4
    if case != "missing_dir":
        write_tree(root, {"train": 1, "val": 1})
    if case == "no_dir":
        cfg.data_dir = None
    elif case == "missing_dir":
        cfg.data_dir = str(tmp_path / "absent")
    elif case == "no_val":
        for f in (root / "val").rglob("*.*"):
            f.unlink()
        for d in (root / "val").iterdir():
            d.rmdir()
        (root / "val").rmdir()
    elif case == "flat_val":  # as ILSVRC-2012 unpacks: 50000 images directly in val/
        for f in list((root / "val").rglob("*.*")):
            f.rename(root / "val" / f.name)
            if not any(f.parent.iterdir()):
                f.parent.rmdir()
    elif case == "empty_class":
        for f in (root / "train" / CLASSES[0]).iterdir():
            f.unlink()
    elif case == "classes_differ":
        (root / "val" / CLASSES[2]).rename(root / "val" / "n09999999")
    elif case == "download":
        cfg.download = True
    elif case == "crop":
        cfg.crop_size = 0
    elif case == "pad_to":
        cfg.pad_to = 64
    else:
        batch_size = 64
    with pytest.raises(UserError, match=match) as err:
        build_data(cfg, batch_size)
    assert "\n" not in str(err.value)


def test_cli_end_to_end(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "imagenet", "--data-dir", str(tree), "--data.crop_size=32", "--arch", "resnet18"]
    args += ["--method", "dgl", "--K", "2", "--batch-size", "4", "--max-steps", "2", "--out", str(out)]
    assert main([*args, "--no-progress", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "imagenet" and summary["steps"] == 2 and summary["K"] == 2
    model = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]["model"]
    heads = [w for k, w in model.items() if k.endswith("fc.weight")]
    assert heads and all(w.shape[0] == 3 for w in heads)  # num_classes = 3, from the folder
