"""Measurements shared by training and benchmarks: peak memory, a weight fingerprint, running means."""

from __future__ import annotations

import hashlib
import resource
from pathlib import Path

import torch
from torch import Tensor, nn

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from locallearn.errors import UserError

        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from locallearn.errors import UserError

        raise UserError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or on CPU the kernel's peak-RSS mark (VmHWM, Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets the peak resident set size (proc(5), /proc/pid/clear_refs)
        except OSError:
            pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes since the last reset, and what was measured.

    CUDA: ``max_memory_allocated`` (tensors only, the field's headline number). CPU: peak resident memory of the whole
    process (VmHWM), which includes the interpreter, libraries and the dataset, so compare CPU figures between runs
    of one configuration, not as absolute activation sizes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "cpu_peak_rss"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss_lifetime"


def fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every tensor in ``module.state_dict()``: equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().numpy().tobytes()
            if tensor.dtype != torch.bfloat16
            else tensor.detach().float().cpu().numpy().tobytes()
        )
    return digest.hexdigest()[:16]


class RunningMeans:
    """Sums of per-step statistics kept on the device; ``.means()`` syncs once instead of every step."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, stats: dict[str, Tensor]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value.item() / max(self.count, 1) for key, value in self.sums.items()}
