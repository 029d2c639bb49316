"""Random-number generator states of a process: what a checkpoint saves so a resumed run draws what an uninterrupted
run would have drawn (the data order and augmentation are pure functions of (seed, epoch) and need none of this)."""

from __future__ import annotations

from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """This process's random-number generator states (CPU, and every CUDA device when there is one)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
