"""A whole training run from a :class:`RunConfig`: data → model → learner → epochs → run directory.

The run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` and ``summary.json``. Every file is written atomically (temporary file, then rename), so a run
that fails half-way never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from locallearn.config import RunConfig, dump_yaml
from locallearn.data import build_data
from locallearn.errors import UserError
from locallearn.learner import LocalLearner
from locallearn.metrics import MemoryReport, RunningMeans, fingerprint, peak_memory, resolve_device
from locallearn.models import create_model

log = logging.getLogger("locallearn")


def atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _describe_checkout() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when the code is imported: a run records the commit of the code it is running, even if the checkout
# moves on while it trains (a long benchmark outlives several commits); "-dirty" marks uncommitted changes.
_CODE_COMMIT = _describe_checkout()


def git_commit() -> str | None:
    """The commit of the locallearn code this process imported (``<sha>`` or ``<sha>-dirty``), None outside git."""
    return _CODE_COMMIT


def prepare_run_dir(cfg: RunConfig) -> Path:
    k = cfg.resolved_k()
    arch = cfg.model.arch.replace(":", "-")  # torchvision:resnet18 → torchvision-resnet18 (no ':' in paths)
    out = Path(cfg.train.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.train.method}-{arch}-K{k}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory path")
    if out.is_dir() and any(out.iterdir()) and not cfg.train.overwrite:
        raise UserError(f"--out {out} already holds files: choose a new directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_learner(
    cfg: RunConfig, info, device: torch.device, total_steps: int | None, steps_per_epoch: int
) -> LocalLearner:
    model = create_model(
        cfg.model.arch,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size[0] if info.image_size[0] == info.image_size[1] else tuple(info.image_size),
        **cfg.model.kwargs,
    )
    return LocalLearner(
        model,
        cfg.train.method,
        cfg.resolved_k(),
        cfg.train.split,
        input_shape=(info.in_channels, *info.image_size),
        method_options=cfg.method,
        optim=cfg.optim,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        step_order=cfg.train.step_order,
        device=device,
        amp=cfg.train.amp,  # "none" or "bf16"; the learner checks and normalises it
        channels_last=cfg.train.channels_last,
        checkpointing=cfg.train.checkpointing,
    )


def _epoch(learner: LocalLearner, loader, epoch: int, steps_left: int, cfg: RunConfig) -> tuple[dict, int, float]:
    loader.set_epoch(epoch)
    means, seen, start = RunningMeans(), 0, time.perf_counter()
    last_key = f"loss/{len(learner.blocks) - 1}"
    bar = tqdm(
        total=min(len(loader), steps_left),
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=not cfg.train.progress,
        leave=False,
        dynamic_ncols=True,
    )
    for i, batch in enumerate(loader):
        if i >= steps_left:
            break
        means.update(learner.train_step(batch))
        seen += batch.y.numel()
        bar.update(1)
        if i % 20 == 0 or i == len(loader) - 1:
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{means.sums[last_key].item() / means.count:.3f}", img_s=f"{rate:.0f}")
    bar.close()
    if learner.device.type == "cuda":
        torch.cuda.synchronize(learner.device)
    return means.means(), seen, time.perf_counter() - start


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the configured training and return the summary (also written to ``<out>/summary.json``)."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    train_loader, test_loader, info = build_data(
        cfg.data, cfg.train.batch_size, seed=cfg.train.seed, device=device, eval_batch_size=cfg.train.eval_batch_size
    )
    if len(train_loader) == 0:
        raise UserError(
            f"the training set ({train_loader.num_examples} examples) is smaller than one batch of "
            f"{cfg.train.batch_size}: lower --batch-size or raise --limit-train"
        )
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    learner = build_learner(cfg, info, device, total_steps, steps_per_epoch)
    if cfg.data.limit_train is not None and cfg.data.name != "synthetic":
        log.warning(
            "training on the first %d examples of %s (--limit-train; 'all' for the full set)",
            train_loader.num_examples,
            cfg.data.name,
        )
    out = prepare_run_dir(cfg)
    dump_yaml(cfg, out / "config.yaml")
    log.info(
        "run %s: %s on %s, %s, K=%d on %s",
        out,
        cfg.train.method,
        cfg.model.arch,
        cfg.data.name,
        len(learner.blocks),
        device,
    )
    for line in learner.describe():
        log.info("  %s", line)
    if learner.method.aux_summary:
        log.info("  %s", learner.method.aux_summary)

    history: list[dict[str, Any]] = []
    train_images, train_seconds, wall_start = 0, 0.0, time.perf_counter()
    memory = MemoryReport(device)
    for epoch in range(cfg.train.epochs):
        if learner.step >= total_steps:
            break
        with memory.window("train"):
            train_stats, seen, seconds = _epoch(learner, train_loader, epoch, total_steps - learner.step, cfg)
        train_images, train_seconds = train_images + seen, train_seconds + seconds
        with memory.window("eval"):
            report = learner.evaluate(test_loader)
        row = {
            "epoch": epoch + 1,
            "step": learner.step,
            "lr": learner.current_lr(),
            **train_stats,
            **report,
            "train_seconds": seconds,
            "images_per_second": seen / max(seconds, 1e-9),
        }
        history.append(row)
        atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        blocks = " ".join("-" if a is None else f"{a:.3f}" for a in report["block_accuracies"])
        log.info(
            "epoch %d/%d step %d  train loss %.4f  test acc %.4f  blocks [%s]  %.0f img/s",
            epoch + 1,
            cfg.train.epochs,
            learner.step,
            train_stats.get(f"loss/{len(learner.blocks) - 1}", 0.0),
            report["test_accuracy"],
            blocks,
            row["images_per_second"],
        )
    _, peak_kind = peak_memory(device)
    log.info("memory: %s", memory.describe())

    summary = {
        "method": cfg.train.method,
        "arch": cfg.model.arch,
        "dataset": cfg.data.name,
        "K": len(learner.blocks),
        "split": cfg.train.split,
        "boundaries": learner.bounds,
        "epochs": len(history),
        "steps": learner.step,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in history), default=None),
        "block_accuracies": history[-1]["block_accuracies"] if history else [],
        "peak_memory_bytes": memory.peak,
        "peak_memory_kind": peak_kind,
        **memory.summary(),
        "images_per_second": train_images / max(train_seconds, 1e-9),
        **learner.num_params(),
        "wall_seconds": time.perf_counter() - wall_start,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "fingerprint": fingerprint(learner.model),
        "out": str(out),
    }
    if cfg.train.save_checkpoint:
        atomic_torch_save(
            {"format": 1, "config": cfg.to_dict(), "learner": learner.state_dict(), "summary": summary},
            out / "checkpoint.pt",
        )
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
