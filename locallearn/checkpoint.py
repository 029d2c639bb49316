"""Loading a run's ``checkpoint.pt`` back into a learner, e.g. for ``locallearn eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from locallearn.config import RunConfig, from_dict
from locallearn.data import build_data
from locallearn.durable import verify
from locallearn.errors import CheckpointError
from locallearn.from_config import build_learner
from locallearn.learner import LocalLearner
from locallearn.metrics import resolve_device
from locallearn.rng import rng_state, set_rng_state  # noqa: F401 (their former home: kept importable here)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``locallearn train`` (tensors and plain data only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass the checkpoint.pt of a finished run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} could not be read ({err.__class__.__name__}): it is damaged or not a "
            "locallearn checkpoint; use another run's checkpoint.pt"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, 2) or "learner" not in ckpt:
        raise CheckpointError(
            f"{path} is not a locallearn checkpoint: use a checkpoint.pt or checkpoints/step-*.pt from locallearn train"
        )
    return ckpt


def restore_learner(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", batch_size: int | None = None
) -> tuple[LocalLearner, RunConfig, Any]:
    """The run's learner, rebuilt from the checkpoint's config (model, method, split) with its weights, and the run's
    test loader (after checking the file against its manifest, which both kinds of checkpoint have:
    :mod:`locallearn.durable`). For ``locallearn eval`` and ``locallearn export``."""
    manifest = Path(path).with_suffix(".json")
    if manifest.is_file() and (problem := verify(manifest)) is not None:
        raise CheckpointError(f"checkpoint {path} does not verify against {manifest.name}: {problem}")
    ckpt = load_checkpoint(path)
    cfg: RunConfig = from_dict(ckpt["config"])
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    dev = resolve_device(device)
    _, test_loader, info = build_data(
        cfg.data,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        device=dev,
        eval_batch_size=batch_size or cfg.train.eval_batch_size,
    )
    learner: LocalLearner = build_learner(cfg, info, dev, None, 1)
    learner.load_state_dict(ckpt["learner"])
    return learner, cfg, test_loader


def evaluate_checkpoint(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", batch_size: int | None = None
) -> dict[str, Any]:
    """Rebuild the run's model, method and split from the checkpoint and evaluate on its test set."""
    learner, cfg, test_loader = restore_learner(path, data_dir=data_dir, device=device, batch_size=batch_size)
    report = learner.evaluate(test_loader)
    return {
        "checkpoint": str(path),
        "method": cfg.train.method,
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "K": len(learner.blocks),
        "step": learner.step,
        **report,
    }
